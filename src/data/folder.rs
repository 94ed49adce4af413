//! An image-folder data set: `DIR/train/<class>/*.png|jpg|jpeg` and
//! `DIR/test/<class>/…` (one sub-folder per class, as torchvision's `ImageFolder`).
//!
//! Classes are the sorted sub-folder names of `train/`; `test/` may hold any subset of
//! them. Images are decoded with the `image` crate, converted to RGB, and brought to
//! S × S (`--image-size`, 32 by default): the shorter side is resized to S (bilinear),
//! then the centre is cropped.
//! Files with other extensions, hidden files and regular files beside the class
//! folders are skipped; a file with an image extension that does not decode is an
//! error naming it, whatever its name's encoding. An entry beside the class folders
//! that is neither a folder nor a regular file (a named pipe, a looping link) is an
//! error naming it.
//!
//! An image's size is checked from its header before anything is decoded or resized:
//! a few kilobytes of PNG can claim 10,000,000 × 1 pixels, which the resize to a
//! shorter side of 32 would turn into a 320,000,000 × 32 buffer.

use super::Dataset;
use crate::error::{Error, Result};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Whether `path` names an image: not hidden, with an image extension. A name need not
/// be UTF-8 (the test is on its lossy form), so no image is skipped for its name.
fn is_image(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .is_none_or(|n| n.to_string_lossy().starts_with('.'));
    !hidden
        && path.extension().is_some_and(|e| {
            IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
        })
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    v.sort();
    Ok(v)
}

/// Largest image file read.
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// Longest image side, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Most pixels in an image (a 50-megapixel photo fits).
pub const MAX_IMAGE_PIXELS: u64 = 64 << 20;
/// Largest ratio of the longer side to the shorter: the resize makes the shorter side
/// 32 pixels, so the longer one becomes at most 32 × this before the centre crop.
pub const MAX_ASPECT_RATIO: u32 = 32;

/// Refuses an image whose size the limits above do not allow.
fn check_dimensions(path: &Path, (w, h): (u32, u32)) -> Result<()> {
    let (short, long) = (w.min(h), w.max(h));
    let why = if short == 0 {
        "it has no pixels".to_string()
    } else if long > MAX_IMAGE_SIDE {
        format!("a side is over {MAX_IMAGE_SIDE} pixels")
    } else if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        format!("it is over {MAX_IMAGE_PIXELS} pixels")
    } else if long > short.saturating_mul(MAX_ASPECT_RATIO) {
        format!("one side is over {MAX_ASPECT_RATIO} times the other")
    } else {
        return Ok(());
    };
    Err(Error::Format {
        path: path.to_path_buf(),
        msg: format!("image of {w} × {h} pixels refused: {why}"),
    })
}

/// The width and height a PNG's header declares (its first chunk, IHDR, right after
/// the signature); `None` when `bytes` do not start so.
fn png_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    let rest = bytes.strip_prefix(b"\x89PNG\r\n\x1a\n")?;
    if rest.get(4..8)? != b"IHDR" {
        return None;
    }
    let be = |at: usize| Some(u32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?));
    Some((be(8)?, be(12)?))
}

/// Decodes an image file into planar `[3, 32, 32]` RGB bytes ([`load_image_at`] 32).
pub fn load_image(path: &Path) -> Result<Vec<u8>> {
    load_image_at(path, 32)
}

/// Decodes an image file into planar `[3, side, side]` RGB bytes: a regular file (pipes
/// and devices refused), read in full but bounded, its size checked from its header
/// before the decoder allocates anything.
pub fn load_image_at(path: &Path, side: usize) -> Result<Vec<u8>> {
    let bytes = crate::files::read_regular_file(path, MAX_IMAGE_FILE_BYTES)?;
    let reader = || {
        image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))
    };
    let cannot = |e: image::ImageError| Error::Format {
        path: path.to_path_buf(),
        msg: format!("cannot decode image: {e}"),
    };
    // a PNG's size from its header by hand first: the decoder refuses a size whose
    // buffer would overflow its arithmetic (2^31 − 1 a side) as "Memory limit exceeded"
    if let Some(size) = png_dimensions(&bytes) {
        check_dimensions(path, size)?;
    }
    // the header alone first (no limits there, so the error below names the size)
    check_dimensions(path, reader()?.into_dimensions().map_err(cannot)?)?;
    let mut decoder = reader()?;
    // the decoder's own limits too, in case a header understates the image
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    decoder.limits(limits);
    let img = decoder.decode().map_err(cannot)?;
    check_dimensions(path, (img.width(), img.height()))?;
    Ok(to_planar(&img, side))
}

/// Resizes the shorter side to `side` (bilinear), centre-crops `side` × `side`, and
/// lays the RGB channels out as planes.
pub fn to_planar(img: &image::DynamicImage, side: usize) -> Vec<u8> {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let t = side as u32;
    let rgb = if (w, h) == (t, t) {
        img.to_rgb8()
    } else {
        let s = t as f64 / w.min(h) as f64;
        let (nw, nh) = (
            ((w as f64 * s).round() as u32).max(t),
            ((h as f64 * s).round() as u32).max(t),
        );
        let resized = img.resize_exact(nw, nh, FilterType::Triangle);
        resized.crop_imm((nw - t) / 2, (nh - t) / 2, t, t).to_rgb8()
    };
    let plane = side * side;
    let mut out = vec![0u8; 3 * plane];
    for (p, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + p] = px[c];
        }
    }
    out
}

/// A planar `[3, from, from]` image resized to `[3, to, to]` as [`to_planar`] resizes
/// a decoded one (bilinear).
pub fn resize_planar(img: &[u8], from: usize, to: usize) -> Vec<u8> {
    let plane = from * from;
    let rgb = image::RgbImage::from_fn(from as u32, from as u32, |x, y| {
        let p = y as usize * from + x as usize;
        image::Rgb([img[p], img[plane + p], img[2 * plane + p]])
    });
    to_planar(&image::DynamicImage::ImageRgb8(rgb), to)
}

/// The class sub-folders of a split (`train/` or `test/`), sorted: (name, path).
/// Hidden entries and regular files are skipped; anything else — a named pipe, a
/// socket, a device, a dangling or looping link — and a folder whose name is not UTF-8
/// are errors naming it (never skipped silently).
fn class_dirs(split: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut classes = Vec::new();
    for path in sorted_entries(split)? {
        let Some(name) = path.file_name().map(|n| n.to_owned()) else {
            continue;
        };
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_file() {
            continue;
        }
        let refuse = |msg: &str| Error::Format {
            path: path.clone(),
            msg: msg.into(),
        };
        if !meta.is_dir() {
            return Err(refuse(
                "is neither a class folder nor a regular file (a named pipe, socket or device?)",
            ));
        }
        let Some(name) = name.to_str() else {
            return Err(refuse("a class folder's name must be UTF-8 text"));
        };
        classes.push((name.to_string(), path));
    }
    Ok(classes)
}

/// Reads one split (`train/` or `test/`) with the given class list, images `side` × `side`.
fn read_split(dir: &Path, classes: &[String], side: usize) -> Result<Dataset> {
    let mut files = Vec::new();
    for (name, class_dir) in class_dirs(dir)? {
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
        .map(|(f, _)| load_image_at(f, side))
        .collect::<Result<Vec<_>>>()?;
    Ok(Dataset {
        images: images.concat(),
        labels: files.iter().map(|(_, l)| *l).collect(),
        classes: classes.to_vec(),
        side,
        ..Dataset::default()
    })
}

/// The train and test splits of an image folder at 32 × 32.
pub fn read_image_folder(dir: &Path) -> Result<(Dataset, Dataset)> {
    read_image_folder_at(dir, 32)
}

/// The train and test splits of an image folder, images `side` × `side`.
pub fn read_image_folder_at(dir: &Path, side: usize) -> Result<(Dataset, Dataset)> {
    let train_dir = dir.join("train");
    let classes: Vec<String> = class_dirs(&train_dir)?
        .into_iter()
        .map(|(name, _)| name)
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
    let train = read_split(&train_dir, &classes, side)?;
    let test = read_split(&dir.join("test"), &classes, side)?;
    Ok((train, test))
}
