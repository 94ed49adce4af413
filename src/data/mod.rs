//! Data sets: the CIFAR-10 binary format (the embedded default data set,
//! `data/digits`, uses the same format) and image folders; the download/extract path
//! for the real CIFAR-10; transforms; the sampler and loader.

pub mod autoaugment;
pub mod cifar10;
pub mod folder;
mod loader;
pub mod mixup;
pub mod transforms;

pub use crate::backend::Normalize;
pub use loader::{Batch, Epoch, Loader, Sampler};
use transforms::normalize_into;
pub use transforms::{Augment, Geometry};

use crate::backend::Mix;
use crate::backend::{AugmentBatch, AugmentMix};
use crate::error::{Error, Result};
use crate::files::read_regular_file;
use crate::rng::Rng;
use crate::tensor::Tensor;
use std::path::{Path, PathBuf};

/// Bytes per CIFAR-10 record: one label byte, then 3 × 32 × 32 pixel bytes (planar RGB).
pub const RECORD: usize = 1 + 3 * 32 * 32;
/// Per-channel mean and std used to normalise images by default (CIFAR-10's, as
/// torchvision tutorials use them: [`Normalize::CIFAR10`]).
pub const MEAN: [f32; 3] = Normalize::CIFAR10.mean;
pub const STD: [f32; 3] = Normalize::CIFAR10.std;
/// Smallest and largest image side a data set is brought to.
pub const MIN_IMAGE_SIDE: usize = 1;
pub const MAX_IMAGE_SIDE: usize = 1024;

/// Largest CIFAR-10 binary file read (the real ones are 30 MB; 1.4 M records fit).
pub const MAX_DATA_FILE_BYTES: u64 = 4 << 30;
/// Largest `batches.meta.txt` read (up to 256 class names).
const MAX_META_BYTES: u64 = 1 << 20;

/// Class names, one a line (`batches.meta.txt`): 1 to 256 of them, none twice.
fn read_class_names(meta: &Path) -> Result<Vec<String>> {
    let bytes = read_regular_file(meta, MAX_META_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|_| Error::Format {
        path: meta.to_path_buf(),
        msg: "is not UTF-8 text".into(),
    })?;
    let classes: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if classes.is_empty() || classes.len() > 256 {
        return Err(Error::Format {
            path: meta.to_path_buf(),
            msg: format!("expected 1..=256 class names, found {}", classes.len()),
        });
    }
    if let Some(dup) = first_duplicate(&classes) {
        return Err(Error::Format {
            path: meta.to_path_buf(),
            msg: format!("class name {dup:?} appears twice: class names must differ"),
        });
    }
    Ok(classes)
}

/// The first name that appears more than once.
pub fn first_duplicate(names: &[String]) -> Option<&str> {
    let mut seen = std::collections::HashSet::new();
    names
        .iter()
        .find(|n| !seen.insert(n.as_str()))
        .map(String::as_str)
}

/// Square images as raw bytes `[n, 3, side, side]`, their labels, and how batches
/// normalise them.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub classes: Vec<String>,
    /// The images' side in pixels (32 for CIFAR-10 binary data).
    pub side: usize,
    /// The per-channel normalisation of [`Dataset::batch`] and [`RawImages`].
    pub norm: Normalize,
}

impl Default for Dataset {
    fn default() -> Self {
        Dataset {
            images: Vec::new(),
            labels: Vec::new(),
            classes: Vec::new(),
            side: 32,
            norm: Normalize::default(),
        }
    }
}

/// The default data set shipped with the repository (found where the crate was built,
/// or under the current directory when the binary runs elsewhere, as on a GPU machine
/// that runs binaries built on another one).
pub fn default_data_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits");
    if built.is_dir() {
        built
    } else {
        PathBuf::from("data/digits")
    }
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Reads CIFAR-10 binary files; every record is checked (size, label range).
    pub fn read_cifar(files: &[PathBuf], classes: Vec<String>) -> Result<Dataset> {
        let mut ds = Dataset {
            classes,
            ..Dataset::default()
        };
        for path in files {
            let bytes = read_regular_file(path, MAX_DATA_FILE_BYTES)?;
            if bytes.is_empty() || bytes.len() % RECORD != 0 {
                return Err(Error::Format {
                    path: path.clone(),
                    msg: format!(
                        "size {} is not a positive multiple of the {RECORD}-byte record (truncated or not CIFAR-10 binary?)",
                        bytes.len()
                    ),
                });
            }
            for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
                if rec[0] as usize >= ds.classes.len() {
                    return Err(Error::Format {
                        path: path.clone(),
                        msg: format!(
                            "record {i}: label {} is out of range for {} classes",
                            rec[0],
                            ds.classes.len()
                        ),
                    });
                }
                ds.labels.push(rec[0]);
                ds.images.extend_from_slice(&rec[1..]);
            }
        }
        Ok(ds)
    }

    /// The train and test splits of a CIFAR-10 binary directory
    /// (`data_batch_*.bin`, `test_batch.bin`, `batches.meta.txt`).
    pub fn cifar_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
        let classes = read_class_names(&dir.join("batches.meta.txt"))?;
        let mut train: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("data_batch_") && n.ends_with(".bin"))
            })
            .collect();
        train.sort();
        if train.is_empty() {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: "no data_batch_*.bin files".into(),
            });
        }
        let train = Dataset::read_cifar(&train, classes.clone())?;
        let test = Dataset::read_cifar(&[dir.join("test_batch.bin")], classes)?;
        Ok((train, test))
    }

    /// The train and test splits of a data directory at 32 × 32 ([`Dataset::open_at`]).
    pub fn open(dir: &Path) -> Result<(Dataset, Dataset)> {
        Dataset::open_at(dir, 32)
    }

    /// The train and test splits of a data directory, images `side` × `side`: CIFAR-10
    /// binary files when it has `batches.meta.txt` (32 × 32, resized to `side` as an
    /// image folder's images are: bilinear), otherwise an image folder with `train/`
    /// and `test/` (each image's shorter side resized to `side`, the centre cropped).
    pub fn open_at(dir: &Path, side: usize) -> Result<(Dataset, Dataset)> {
        if !(MIN_IMAGE_SIDE..=MAX_IMAGE_SIDE).contains(&side) {
            return Err(Error::Config(format!(
                "image size {side}: must be in {MIN_IMAGE_SIDE}..={MAX_IMAGE_SIDE}"
            )));
        }
        let (train, test) = Dataset::open_native(dir, side)?;
        Ok((train.resized(side), test.resized(side)))
    }

    /// The splits as stored: CIFAR-10 binary data at 32, an image folder at `side`.
    fn open_native(dir: &Path, side: usize) -> Result<(Dataset, Dataset)> {
        if !dir.is_dir() {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: "data directory does not exist (or is not a directory)".into(),
            });
        }
        // whatever its kind: a pipe or a dangling link is refused by name when read
        if std::fs::symlink_metadata(dir.join("batches.meta.txt")).is_ok() {
            Dataset::cifar_dir(dir)
        } else if dir.join("train").is_dir() {
            folder::read_image_folder_at(dir, side)
        } else {
            Err(Error::Format {
                path: dir.to_path_buf(),
                msg: "neither CIFAR-10 binary data (no batches.meta.txt) nor an image folder (no train/ sub-folder)".into(),
            })
        }
    }

    /// These images brought to `side` × `side` (bilinear, as an image folder's are;
    /// unchanged at their own side).
    pub fn resized(self, side: usize) -> Dataset {
        if side == self.side {
            return self;
        }
        use rayon::prelude::*;
        let images = self
            .images
            .par_chunks(3 * self.side * self.side)
            .flat_map_iter(|img| folder::resize_planar(img, self.side, side))
            .collect();
        Dataset {
            images,
            side,
            ..self
        }
    }

    /// These images normalised by `norm` in batches.
    pub fn with_norm(self, norm: Normalize) -> Dataset {
        Dataset { norm, ..self }
    }

    /// Bytes of one image.
    fn image_bytes(&self) -> usize {
        3 * self.side * self.side
    }

    /// Normalised f32 images `[b, 3, side, side]` and labels for the given indices. With
    /// `augment = Some((aug, key))`, each image is augmented from its own random stream
    /// keyed by (`key`, sample index), so an image's augmentation does not depend on
    /// which batch, worker or data-parallel rank builds it. The crop padding is for
    /// 32 × 32 and scales with the side ([`Augment::for_side`]).
    pub fn batch(
        &self,
        idx: &[usize],
        augment: Option<(Augment, u64)>,
    ) -> Result<(Tensor, Vec<usize>)> {
        let mut out = Vec::with_capacity(idx.len() * self.image_bytes());
        let (mean, std) = (&self.norm.mean, &self.norm.std);
        for &i in idx {
            let img = self.image(i)?;
            match augment {
                Some((aug, key)) if !aug.is_identity() => {
                    let mut rng = sample_rng(key, i);
                    let aug = aug.for_side(self.side);
                    normalize_into(&aug.apply(img, &mut rng), mean, std, &mut out)
                }
                _ => normalize_into(img, mean, std, &mut out),
            }
        }
        let labels = self.labels_of(idx)?;
        let s = self.side;
        Ok((Tensor::from_vec(out, [idx.len(), 3, s, s])?, labels))
    }

    /// As [`Dataset::batch`] for a device that crops, flips and normalises itself: the
    /// raw pixels and each sample's crop/flip (drawn from the same random streams, so
    /// the images are the same). AutoAugment cannot be deferred: it is refused.
    pub fn raw_batch(
        &self,
        idx: &[usize],
        augment: Option<(Augment, u64)>,
    ) -> Result<(RawImages, Vec<usize>)> {
        let mut raw = RawImages {
            pixels: Vec::with_capacity(idx.len() * self.image_bytes()),
            geometry: Vec::with_capacity(idx.len()),
            side: self.side,
            norm: self.norm,
            mix: None,
        };
        for &i in idx {
            raw.pixels.extend_from_slice(self.image(i)?);
            raw.geometry.push(match augment {
                Some((aug, _)) if aug.auto_augment => {
                    return Err(Error::Config(
                        "AutoAugment runs on the CPU: it cannot be deferred to the device".into(),
                    ))
                }
                Some((aug, key)) => aug
                    .for_side(self.side)
                    .draw_geometry(&mut sample_rng(key, i)),
                None => Geometry::default(),
            });
        }
        Ok((raw, self.labels_of(idx)?))
    }

    fn image(&self, i: usize) -> Result<&[u8]> {
        let n = self.image_bytes();
        self.images.get(i * n..(i + 1) * n).ok_or_else(|| {
            Error::Config(format!(
                "sample {i} is out of range for {} images",
                self.len()
            ))
        })
    }

    /// The labels of samples `idx`.
    pub fn labels_of(&self, idx: &[usize]) -> Result<Vec<usize>> {
        idx.iter()
            .map(|&i| {
                self.labels.get(i).map(|&l| l as usize).ok_or_else(|| {
                    Error::Config(format!(
                        "sample {i} is out of range for {} images",
                        self.len()
                    ))
                })
            })
            .collect()
    }
}

/// Sample `i`'s augmentation stream in an epoch keyed by `key`.
fn sample_rng(key: u64, i: usize) -> Rng {
    Rng::new(key ^ (i as u64).wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// A batch's images before cropping, flipping, normalising and mixing (done by the
/// device).
#[derive(Clone, Debug)]
pub struct RawImages {
    /// `[b, 3, side, side]` planar `u8` pixels.
    pub pixels: Vec<u8>,
    /// Each sample's crop and flip.
    pub geometry: Vec<Geometry>,
    /// The images' side in pixels.
    pub side: usize,
    /// The data set's normalisation.
    pub norm: Normalize,
    /// Mixup/CutMix of the batch (`None`: none).
    pub mix: Option<RawMix>,
}

/// Mixup/CutMix left to the device: how the batch is mixed and the partner of each
/// image the batch yields, among its images (the pixels may hold partner images past
/// the batch's own).
#[derive(Clone, Debug, PartialEq)]
pub struct RawMix {
    pub mix: Mix,
    pub partner: Vec<u32>,
}

impl RawImages {
    /// Normalised f32 images `[b, 3, side, side]` on the CPU: the reference for devices.
    pub fn to_images(&self) -> Result<Tensor> {
        crate::backend::check::check_augment(&self.batch())?;
        let n = 3 * self.side * self.side;
        let image = |i: usize| {
            let mut out = Vec::with_capacity(n);
            let (img, g) = (&self.pixels[i * n..(i + 1) * n], self.geometry[i]);
            normalize_into(&g.apply(img), &self.norm.mean, &self.norm.std, &mut out);
            out
        };
        let b = self.batch().outputs();
        let mut out: Vec<f32> = (0..b).flat_map(image).collect();
        if let Some(m) = &self.mix {
            let partners: Vec<f32> = m.partner.iter().flat_map(|&p| image(p as usize)).collect();
            m.mix.apply(&mut out, &partners, self.side);
        }
        let s = self.side;
        Tensor::from_vec(out, [b, 3, s, s])
    }

    /// The augment op's input for these images, with the data set's normalisation.
    pub fn batch(&self) -> AugmentBatch<'_> {
        AugmentBatch {
            pixels: &self.pixels,
            side: self.side,
            geometry: &self.geometry,
            norm: self.norm,
            mix: self.mix.as_ref().map(|m| AugmentMix {
                mix: m.mix,
                partner: &m.partner,
            }),
        }
    }

    /// The images of samples `range` (a pipeline's micro-batch), with their partners.
    pub fn rows(&self, range: std::ops::Range<usize>) -> RawImages {
        let Some(m) = &self.mix else {
            return self.gather(range);
        };
        let partners = m.partner[range.clone()].iter().map(|&p| p as usize);
        let mut out = self.gather(range.clone().chain(partners));
        let k = range.len() as u32;
        out.mix = Some(RawMix {
            mix: m.mix,
            partner: (k..2 * k).collect(),
        });
        out
    }

    /// Images `rows`, unmixed.
    fn gather(&self, rows: impl Iterator<Item = usize>) -> RawImages {
        let n = 3 * self.side * self.side;
        let mut out = RawImages {
            pixels: vec![],
            geometry: vec![],
            mix: None,
            ..*self
        };
        for i in rows {
            out.pixels
                .extend_from_slice(&self.pixels[i * n..(i + 1) * n]);
            out.geometry.push(self.geometry[i]);
        }
        out
    }

    /// Mixes these images with `partners`, image `i`'s partner being `partners`' image
    /// `i` (appended to these).
    pub fn mixed_with(mut self, mix: Mix, partners: RawImages) -> RawImages {
        let k = self.geometry.len() as u32;
        self.pixels.extend(partners.pixels);
        self.geometry.extend(partners.geometry);
        self.mix = Some(RawMix {
            mix,
            partner: (k..2 * k).collect(),
        });
        self
    }
}
