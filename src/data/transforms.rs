//! Image transforms on raw square images (`[3, S, S]` planar `u8`; S = 32 for
//! CIFAR-10), applied per sample by the loader before normalisation.

use super::autoaugment::auto_augment;
pub use crate::backend::Geometry;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The side of a square 3-channel planar image of `img.len()` bytes.
pub fn side_of(img: &[u8]) -> usize {
    (img.len() / 3).isqrt()
}

/// The crop padding that corresponds at `side` pixels to `padding` at 32 (the padding
/// timm and torchvision use for CIFAR-10 is 4): `padding × side / 32`, rounded, so the
/// random shift covers the same fraction of the image at every size.
pub fn scaled_padding(padding: usize, side: usize) -> usize {
    (padding * side + 16) / 32
}

/// Which random augmentation the training loader applies. Written as a comma-separated
/// list of `crop`, `flip`, `autoaugment`, or `none` (flags and config files).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Augment {
    /// Random crop of a zero-padded image (torchvision `RandomCrop(32, padding)`), the
    /// padding given for 32 × 32 images (scaled with the image: [`scaled_padding`]); 0: off.
    pub crop_padding: usize,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
    /// AutoAugment with the CIFAR-10 policy, after crop and flip.
    pub auto_augment: bool,
}

impl std::str::FromStr for Augment {
    type Err = Error;
    fn from_str(s: &str) -> Result<Augment> {
        Augment::parse(s)
    }
}

impl std::fmt::Display for Augment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let crop = match self.crop_padding {
            0 => None,
            4 => Some("crop".to_string()),
            p => Some(format!("crop{p}")),
        };
        let parts: Vec<String> = crop
            .into_iter()
            .chain(self.flip.then(|| "flip".into()))
            .chain(self.auto_augment.then(|| "autoaugment".into()))
            .collect();
        match parts.is_empty() {
            true => f.write_str("none"),
            false => f.write_str(&parts.join(",")),
        }
    }
}

impl TryFrom<String> for Augment {
    type Error = Error;
    fn try_from(s: String) -> Result<Augment> {
        Augment::parse(&s)
    }
}

impl From<Augment> for String {
    fn from(a: Augment) -> String {
        a.to_string()
    }
}

impl Augment {
    pub fn is_identity(&self) -> bool {
        self.crop_padding == 0 && !self.flip && !self.auto_augment
    }

    /// Parses a comma-separated list of `crop` (pad 4), `flip`, `autoaugment`, or
    /// `none` (as the CLI and config files spell it).
    pub fn parse(spec: &str) -> Result<Augment> {
        let mut a = Augment::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "none" => {}
                "crop" => a.crop_padding = 4,
                "flip" => a.flip = true,
                "autoaugment" => a.auto_augment = true,
                // `cropN`: another padding (how a library-set padding is written)
                p if p.strip_prefix("crop").is_some_and(|n| n.parse::<usize>().is_ok()) => {
                    a.crop_padding = p[4..].parse().unwrap_or(4)
                }
                other => {
                    return Err(Error::Config(format!(
                        "unknown augmentation `{other}` in `{spec}` (expected a comma-separated list of crop, flip, autoaugment, or none)"
                    )))
                }
            }
        }
        Ok(a)
    }

    /// This augmentation for `side` × `side` images: the crop padding scaled from 32
    /// ([`scaled_padding`]; unchanged at 32).
    pub fn for_side(self, side: usize) -> Augment {
        Augment {
            crop_padding: scaled_padding(self.crop_padding, side),
            ..self
        }
    }

    /// Draws the crop offsets, then the flip (the first numbers [`Augment::apply`]
    /// draws from `rng`).
    pub fn draw_geometry(&self, rng: &mut Rng) -> Geometry {
        let mut g = Geometry::default();
        if self.crop_padding > 0 {
            let span = 2 * self.crop_padding as u64 + 1;
            g.dy = (rng.next_u64() % span) as i32 - self.crop_padding as i32;
            g.dx = (rng.next_u64() % span) as i32 - self.crop_padding as i32;
        }
        g.flip = self.flip && rng.next_u64() & 1 == 1;
        g
    }

    /// Applies the augmentation to one image, drawing from `rng` in a fixed order
    /// (crop offsets, then the flip, then AutoAugment), so results depend only on the
    /// RNG's seed.
    pub fn apply(&self, img: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut out = self.draw_geometry(rng).apply(img);
        if self.auto_augment {
            out = auto_augment(&out, rng);
        }
        out
    }
}

// The type is the augment op's (the backend crops and flips on a device); applying it
// to one image on the host is data's.
impl Geometry {
    /// The image shifted by (`dy`, `dx`), then mirrored if `flip`.
    pub fn apply(&self, img: &[u8]) -> Vec<u8> {
        let out = if (self.dy, self.dx) == (0, 0) {
            img.to_vec()
        } else {
            shift(img, self.dy as isize, self.dx as isize)
        };
        if self.flip {
            hflip(&out)
        } else {
            out
        }
    }
}

/// The image moved by (`dy`, `dx`) with zeros shifted in: the same as cropping a
/// zero-padded image at offset (`pad + dy`, `pad + dx`).
pub fn shift(img: &[u8], dy: isize, dx: isize) -> Vec<u8> {
    let mut out = vec![0u8; img.len()];
    let side = side_of(img);
    let (s, pixels) = (side as isize, side * side);
    for c in 0..img.len() / pixels.max(1) {
        for y in 0..s {
            let sy = y + dy;
            if !(0..s).contains(&sy) {
                continue;
            }
            for x in 0..s {
                let sx = x + dx;
                if (0..s).contains(&sx) {
                    out[c * pixels + (y * s + x) as usize] =
                        img[c * pixels + (sy * s + sx) as usize];
                }
            }
        }
    }
    out
}

/// Mirror image (left ↔ right).
pub fn hflip(img: &[u8]) -> Vec<u8> {
    let mut out = img.to_vec();
    for row in out.chunks_mut(side_of(img).max(1)) {
        row.reverse();
    }
    out
}

/// `u8` pixels to f32, `(v / 255 - mean[c]) / std[c]` per channel, appended to `out`.
pub fn normalize_into(img: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut Vec<f32>) {
    for (c, plane) in img.chunks((img.len() / 3).max(1)).enumerate() {
        out.extend(plane.iter().map(|&v| (v as f32 / 255.0 - mean[c]) / std[c]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIXELS: usize = 32 * 32;

    /// A 3-channel image whose pixel value encodes its position (and channel).
    fn ramp() -> Vec<u8> {
        (0..3 * PIXELS)
            .map(|i| ((i % PIXELS) % 251) as u8 + (i / PIXELS) as u8)
            .collect()
    }

    #[test]
    fn hflip_mirrors_rows_and_is_an_involution() {
        let img = ramp();
        let f = hflip(&img);
        assert_eq!(f[0], img[31]);
        assert_eq!(f[PIXELS + 5 * 32 + 2], img[PIXELS + 5 * 32 + 29]);
        assert_eq!(hflip(&f), img);
    }

    #[test]
    fn shift_moves_content_and_fills_zeros() {
        let img = ramp();
        let s = shift(&img, 2, -3);
        // out(y, x) = in(y + 2, x - 3)
        assert_eq!(s[10 * 32 + 10], img[12 * 32 + 7]);
        assert_eq!(s[2 * PIXELS + 10 * 32 + 10], img[2 * PIXELS + 12 * 32 + 7]);
        assert!(
            (0..3).all(|x| s[5 * 32 + x] == 0),
            "left columns shifted in as zeros"
        );
        assert!(
            (0..32).all(|x| s[31 * 32 + x] == 0 && s[30 * 32 + x] == 0),
            "bottom rows zero"
        );
        assert_eq!(shift(&img, 0, 0), img);
    }

    #[test]
    fn augment_is_seeded_and_covers_all_offsets() {
        let img = ramp();
        let aug = Augment::parse("crop,flip").unwrap();
        assert_eq!(
            aug.apply(&img, &mut Rng::new(5)),
            aug.apply(&img, &mut Rng::new(5))
        );
        let mut seen = std::collections::HashSet::new();
        let mut rng = Rng::new(1);
        for _ in 0..2000 {
            seen.insert(aug.apply(&img, &mut rng));
        }
        // 9 × 9 offsets × 2 flips, all reachable
        assert_eq!(seen.len(), 162);
        assert!(Augment::default().is_identity());
        assert!(Augment::parse("none").unwrap().is_identity());
        assert!(Augment::parse("crop,autoaugment").unwrap().auto_augment);
        let e = Augment::parse("crop,rotate").unwrap_err().to_string();
        assert!(e.contains("`rotate`"), "{e}");
        assert_eq!(Augment::default().apply(&img, &mut Rng::new(0)), img);
    }

    #[test]
    fn normalize_uses_per_channel_mean_and_std() {
        let mut img = vec![0u8; 3 * PIXELS];
        img[0] = 255;
        img[PIXELS] = 51;
        let mut out = Vec::new();
        normalize_into(&img, &[0.5, 0.2, 0.0], &[0.25, 0.1, 1.0], &mut out);
        assert_eq!(out.len(), 3 * PIXELS);
        assert!((out[0] - 2.0).abs() < 1e-6);
        assert!((out[1] + 2.0).abs() < 1e-6);
        assert!((out[PIXELS] - 0.0).abs() < 1e-6);
        assert_eq!(out[2 * PIXELS], 0.0);
    }
}
