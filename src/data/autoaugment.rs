//! AutoAugment (Cubuk et al., 2019) with the CIFAR-10 policy, on planar `[3, S, S]`
//! `u8` images of any side `S` (translations scale with it, as torchvision's do).
//!
//! The operations, magnitudes and rounding follow torchvision's tensor implementation
//! (`torchvision.transforms.AutoAugment(AutoAugmentPolicy.CIFAR10)`, nearest
//! interpolation, zero fill), so a model trained here sees the same augmented images a
//! PyTorch recipe would; `tests/core/autoaugment.rs` compares every op against torchvision's
//! output on real images.

use super::transforms::side_of;
use crate::rng::Rng;

/// One AutoAugment image operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
    Invert,
}

use Op::*;

/// Magnitude bins of the search space (torchvision's `num_bins`).
pub const BINS: usize = 10;

/// The 25 CIFAR-10 sub-policies: two (operation, probability, magnitude bin) steps each.
pub const CIFAR10_POLICY: [[(Op, f32, usize); 2]; 25] = [
    [(Invert, 0.1, 0), (Contrast, 0.2, 6)],
    [(Rotate, 0.7, 2), (TranslateX, 0.3, 9)],
    [(Sharpness, 0.8, 1), (Sharpness, 0.9, 3)],
    [(ShearY, 0.5, 8), (TranslateY, 0.7, 9)],
    [(AutoContrast, 0.5, 0), (Equalize, 0.9, 0)],
    [(ShearY, 0.2, 7), (Posterize, 0.3, 7)],
    [(Color, 0.4, 3), (Brightness, 0.6, 7)],
    [(Sharpness, 0.3, 9), (Brightness, 0.7, 9)],
    [(Equalize, 0.6, 0), (Equalize, 0.5, 0)],
    [(Contrast, 0.6, 7), (Sharpness, 0.6, 5)],
    [(Color, 0.7, 7), (TranslateX, 0.5, 8)],
    [(Equalize, 0.3, 0), (AutoContrast, 0.4, 0)],
    [(TranslateY, 0.4, 3), (Sharpness, 0.2, 6)],
    [(Brightness, 0.9, 6), (Color, 0.2, 8)],
    [(Solarize, 0.5, 2), (Invert, 0.0, 0)],
    [(Equalize, 0.2, 0), (AutoContrast, 0.6, 0)],
    [(Equalize, 0.2, 0), (Equalize, 0.6, 0)],
    [(Color, 0.9, 9), (Equalize, 0.6, 0)],
    [(AutoContrast, 0.8, 0), (Solarize, 0.2, 8)],
    [(Brightness, 0.1, 3), (Color, 0.7, 0)],
    [(Solarize, 0.4, 5), (AutoContrast, 0.9, 0)],
    [(TranslateY, 0.9, 9), (TranslateY, 0.7, 9)],
    [(AutoContrast, 0.9, 0), (Solarize, 0.8, 3)],
    [(Equalize, 0.8, 0), (Invert, 0.1, 0)],
    [(TranslateY, 0.7, 9), (AutoContrast, 0.9, 0)],
];

/// `torch.linspace(lo, hi, BINS)[bin]` in f32, computed the way torch does.
fn linspace(lo: f32, hi: f32, bin: usize) -> f32 {
    let step = (hi - lo) / (BINS - 1) as f32;
    if bin < BINS / 2 {
        lo + step * bin as f32
    } else {
        hi - step * (BINS - 1 - bin) as f32
    }
}

impl Op {
    pub const ALL: [Op; 14] = [
        ShearX,
        ShearY,
        TranslateX,
        TranslateY,
        Rotate,
        Brightness,
        Color,
        Contrast,
        Sharpness,
        Posterize,
        Solarize,
        AutoContrast,
        Equalize,
        Invert,
    ];

    /// torchvision's name of the operation.
    pub fn name(self) -> &'static str {
        match self {
            ShearX => "ShearX",
            ShearY => "ShearY",
            TranslateX => "TranslateX",
            TranslateY => "TranslateY",
            Rotate => "Rotate",
            Brightness => "Brightness",
            Color => "Color",
            Contrast => "Contrast",
            Sharpness => "Sharpness",
            Posterize => "Posterize",
            Solarize => "Solarize",
            AutoContrast => "AutoContrast",
            Equalize => "Equalize",
            Invert => "Invert",
        }
    }

    /// Whether the magnitude is negated with probability 1/2.
    pub fn signed(self) -> bool {
        matches!(
            self,
            ShearX
                | ShearY
                | TranslateX
                | TranslateY
                | Rotate
                | Brightness
                | Color
                | Contrast
                | Sharpness
        )
    }

    /// The unsigned magnitude of `bin` (0..BINS) for 32 × 32 images
    /// ([`Op::magnitude_at`] with side 32).
    pub fn magnitude(self, bin: usize) -> f32 {
        self.magnitude_at(bin, 32)
    }

    /// The unsigned magnitude of `bin` (0..BINS) for `side` × `side` images: shear as a
    /// slope, translation in pixels (torchvision: up to 150/331 of the side), rotation
    /// in degrees, enhancement as the factor minus 1, posterize in bits kept, solarize
    /// as the threshold; 0 for ops without one.
    pub fn magnitude_at(self, bin: usize, side: usize) -> f32 {
        let bin = bin.min(BINS - 1);
        match self {
            ShearX | ShearY => linspace(0.0, 0.3, bin),
            TranslateX | TranslateY => linspace(0.0, 150.0 / 331.0 * side as f32, bin),
            Rotate => linspace(0.0, 30.0, bin),
            Brightness | Color | Contrast | Sharpness => linspace(0.0, 0.9, bin),
            Posterize => 8.0 - (bin as f32 / ((BINS - 1) as f32 / 4.0)).round_ties_even(),
            Solarize => linspace(255.0, 0.0, bin),
            AutoContrast | Equalize | Invert => 0.0,
        }
    }

    /// The operation at a (signed) magnitude, as [`Op::magnitude`] defines it.
    pub fn apply(self, img: &[u8], m: f32) -> Vec<u8> {
        let side = side_of(img);
        let half = side as f32 * 0.5;
        let pixels = side * side;
        match self {
            // torchvision: shear angle atan(m) about the top-left corner
            ShearX => affine(
                img,
                inverse_affine([-half, -half], 0.0, [0.0, 0.0], [m, 0.0]),
            ),
            ShearY => affine(
                img,
                inverse_affine([-half, -half], 0.0, [0.0, 0.0], [0.0, m]),
            ),
            // whole pixels, truncated toward zero
            TranslateX => affine(
                img,
                inverse_affine([0.0; 2], 0.0, [m.trunc(), 0.0], [0.0; 2]),
            ),
            TranslateY => affine(
                img,
                inverse_affine([0.0; 2], 0.0, [0.0, m.trunc()], [0.0; 2]),
            ),
            // counter-clockwise about the centre
            Rotate => affine(img, inverse_affine([0.0; 2], -m, [0.0; 2], [0.0; 2])),
            Brightness => blend(img, |_, _| 0.0, m),
            Color => {
                let gray = grayscale(img);
                blend(img, |_, p| gray[p] as f32, m)
            }
            Contrast => {
                let gray = grayscale(img);
                let mean = gray.iter().map(|&v| v as f32).sum::<f32>() / pixels as f32;
                blend(img, |_, _| mean, m)
            }
            Sharpness => {
                let blurred = smooth(img);
                blend(img, |i, _| blurred[i] as f32, m)
            }
            Posterize => {
                let mask = !((1u16 << (8 - (m as u16).min(8))) - 1) as u8;
                img.iter().map(|v| v & mask).collect()
            }
            Solarize => img
                .iter()
                .map(|&v| if v as f32 >= m { 255 - v } else { v })
                .collect(),
            AutoContrast => img.chunks(pixels).flat_map(autocontrast_plane).collect(),
            Equalize => img.chunks(pixels).flat_map(equalize_plane).collect(),
            Invert => img.iter().map(|v| 255 - v).collect(),
        }
    }
}

/// One AutoAugment draw with the CIFAR-10 policy: a random sub-policy, each of its two
/// steps applied with its probability at its magnitude (negated with probability 1/2
/// for signed ops). Draws from `rng` in a fixed order: sub-policy, then per step the
/// probability and the sign.
pub fn auto_augment(img: &[u8], rng: &mut Rng) -> Vec<u8> {
    let policy = &CIFAR10_POLICY[(rng.next_u64() % CIFAR10_POLICY.len() as u64) as usize];
    let mut out = img.to_vec();
    for &(op, p, bin) in policy {
        let draw = rng.uniform(0.0, 1.0);
        let negative = rng.next_u64() & 1 == 0;
        if draw <= p {
            let m = op.magnitude_at(bin, side_of(&out));
            out = op.apply(&out, if op.signed() && negative { -m } else { m });
        }
    }
    out
}

/// torchvision's `_get_inverse_affine_matrix`: the map from output to input
/// coordinates (origin at the image centre) of rotation by `angle` degrees about
/// `center`, translation, and shear with slopes `shear` (x, y).
fn inverse_affine(center: [f32; 2], angle: f32, translate: [f32; 2], shear: [f32; 2]) -> [f32; 6] {
    let rot = (angle as f64).to_radians();
    let (sx, sy) = ((shear[0] as f64).atan(), (shear[1] as f64).atan());
    let (cx, cy) = (center[0] as f64, center[1] as f64);
    let (tx, ty) = (translate[0] as f64, translate[1] as f64);
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0];
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx;
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy;
    m.map(|v| v as f32)
}

/// Nearest-neighbour resampling through the inverse map `m`, zeros outside (torch's
/// affine grid + `grid_sample(align_corners=False)`, evaluated in f32 in its order).
fn affine(img: &[u8], m: [f32; 6]) -> Vec<u8> {
    let side = side_of(img);
    let (pixels, half) = (side * side, side as f32 * 0.5);
    let r = m.map(|v| v / half);
    let unnormalize = |g: f32| ((g + 1.0) * side as f32 - 1.0) / 2.0;
    let mut out = vec![0u8; img.len()];
    for y in 0..side {
        let yc = y as f32 - half + 0.5;
        for x in 0..side {
            let xc = x as f32 - half + 0.5;
            let sx = unnormalize(xc * r[0] + yc * r[1] + r[2]).round_ties_even();
            let sy = unnormalize(xc * r[3] + yc * r[4] + r[5]).round_ties_even();
            if (0.0..side as f32).contains(&sx) && (0.0..side as f32).contains(&sy) {
                let src = sy as usize * side + sx as usize;
                for c in 0..img.len() / pixels {
                    out[c * pixels + y * side + x] = img[c * pixels + src];
                }
            }
        }
    }
    out
}

/// `factor · img + (1 − factor) · other` with `factor = 1 + m`, clamped and truncated to `u8` (torchvision's
/// `_blend`); `other(i, p)` gives the second image at element `i`, pixel `p`.
fn blend(img: &[u8], other: impl Fn(usize, usize) -> f32, m: f32) -> Vec<u8> {
    // torchvision forms 1 + m and its complement in f64, then computes in f32
    let factor = 1.0 + m as f64;
    let (a, b) = (factor as f32, (1.0 - factor) as f32);
    let pixels = img.len() / 3;
    img.iter()
        .enumerate()
        .map(|(i, &v)| (a * v as f32 + b * other(i, i % pixels)).clamp(0.0, 255.0) as u8)
        .collect()
}

/// ITU-R 601 luma, truncated to `u8`.
fn grayscale(img: &[u8]) -> Vec<u8> {
    let pixels = img.len() / 3;
    (0..pixels)
        .map(|p| {
            (0.2989 * img[p] as f32
                + 0.587 * img[pixels + p] as f32
                + 0.114 * img[2 * pixels + p] as f32) as u8
        })
        .collect()
}

/// PIL's SMOOTH filter (3 × 3, centre weight 5) on interior pixels, rounded; the border
/// keeps its values.
fn smooth(img: &[u8]) -> Vec<u8> {
    let side = side_of(img);
    let pixels = side * side;
    let mut out = img.to_vec();
    for (c, plane) in img.chunks(pixels).enumerate() {
        for y in 1..side.saturating_sub(1) {
            for x in 1..side.saturating_sub(1) {
                let mut s = 0.0f32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let w = if dy == 1 && dx == 1 { 5.0 } else { 1.0 } / 13.0;
                        s += w * plane[(y + dy - 1) * side + x + dx - 1] as f32;
                    }
                }
                out[c * pixels + y * side + x] = s.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Stretches a channel to the full 0..=255 range (unchanged when it is constant).
fn autocontrast_plane(plane: &[u8]) -> Vec<u8> {
    let lo = plane.iter().copied().min().unwrap_or(0);
    let hi = plane.iter().copied().max().unwrap_or(0);
    if lo == hi {
        return plane.to_vec();
    }
    let scale = 255.0 / (hi - lo) as f32;
    plane
        .iter()
        .map(|&v| ((v as f32 - lo as f32) * scale).clamp(0.0, 255.0) as u8)
        .collect()
}

/// Histogram equalisation of a channel (PIL's `ImageOps.equalize` integer recipe).
fn equalize_plane(plane: &[u8]) -> Vec<u8> {
    let mut hist = [0u32; 256];
    for &v in plane {
        hist[v as usize] += 1;
    }
    let nonzero: Vec<u32> = hist.iter().copied().filter(|&h| h > 0).collect();
    let step = nonzero[..nonzero.len().saturating_sub(1)]
        .iter()
        .sum::<u32>()
        / 255;
    if step == 0 {
        return plane.to_vec();
    }
    let mut lut = [0u8; 256];
    let mut cum = step / 2;
    for (v, &h) in hist.iter().enumerate() {
        lut[v] = (cum / step).min(255) as u8;
        cum += h;
    }
    plane.iter().map(|&v| lut[v as usize]).collect()
}
