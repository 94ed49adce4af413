//! An image-folder data set: `DIR/train/<class>/*.png|jpg|jpeg` and
//! `DIR/test/<class>/…` (one sub-folder per class, as torchvision's `ImageFolder`).
//!
//! Classes are the sorted sub-folder names of `train/`; `test/` may hold any subset of
//! them. Images are decoded with the `image` crate, converted to RGB, and brought to
//! 32 × 32: the shorter side is resized to 32 (bilinear), then the centre is cropped.
//! Files with other extensions and hidden files are skipped; a file with an image
//! extension that does not decode is an error naming it.

use super::Dataset;
use crate::error::{Error, Result};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_image(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'));
    !hidden
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

/// Decodes an image file into planar `[3, 32, 32]` RGB bytes.
pub fn load_image(path: &Path) -> Result<Vec<u8>> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("cannot decode image: {e}"),
        })?;
    Ok(to_planar_32(&img))
}

/// Resizes the shorter side to 32 (bilinear), centre-crops 32 × 32, and lays the RGB
/// channels out as planes.
pub fn to_planar_32(img: &image::DynamicImage) -> Vec<u8> {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let rgb = if (w, h) == (32, 32) {
        img.to_rgb8()
    } else {
        let s = 32.0 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * s).round() as u32).max(32),
            ((h as f64 * s).round() as u32).max(32),
        );
        let resized = img.resize_exact(nw, nh, FilterType::Triangle);
        resized
            .crop_imm((nw - 32) / 2, (nh - 32) / 2, 32, 32)
            .to_rgb8()
    };
    let mut out = vec![0u8; 3 * 1024];
    for (p, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * 1024 + p] = px[c];
        }
    }
    out
}

/// Reads one split (`train/` or `test/`) with the given class list.
fn read_split(dir: &Path, classes: &[String]) -> Result<Dataset> {
    let mut files = Vec::new();
    for class_dir in sorted_entries(dir)? {
        if !class_dir.is_dir() {
            continue;
        }
        let name = class_dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let label = classes
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| Error::Format {
                path: class_dir.clone(),
                msg: format!("class `{name}` is not among the training classes {classes:?}"),
            })?;
        for f in sorted_entries(&class_dir)? {
            if is_image(&f) {
                files.push((f, label as u8));
            }
        }
    }
    if files.is_empty() {
        return Err(Error::Format {
            path: dir.to_path_buf(),
            msg: format!(
                "no images (.{}) in any class sub-folder",
                IMAGE_EXTENSIONS.join(", .")
            ),
        });
    }
    let images = files
        .par_iter()
        .map(|(f, _)| load_image(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(Dataset {
        images: images.concat(),
        labels: files.iter().map(|(_, l)| *l).collect(),
        classes: classes.to_vec(),
    })
}

/// The train and test splits of an image folder.
pub fn read_image_folder(dir: &Path) -> Result<(Dataset, Dataset)> {
    let train_dir = dir.join("train");
    let classes: Vec<String> = sorted_entries(&train_dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(String::from))
        .filter(|n| !n.starts_with('.'))
        .collect();
    if classes.is_empty() || classes.len() > 256 {
        return Err(Error::Format {
            path: train_dir,
            msg: format!(
                "expected 1..=256 class sub-folders, found {}",
                classes.len()
            ),
        });
    }
    let train = read_split(&train_dir, &classes)?;
    let test = read_split(&dir.join("test"), &classes)?;
    Ok((train, test))
}
