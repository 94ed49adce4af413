//! Getting the real CIFAR-10: download the binary archive, or extract one already
//! downloaded, into a directory [`Dataset::cifar_dir`](super::Dataset::cifar_dir) reads.
//!
//! Only the eight known member files are extracted, by file name (no path from the
//! archive is ever used), into a staging directory first.
//! The gzip stream is read to its end, so its CRC-32 and length trailer check the whole
//! archive; the extracted files are then validated by reading them as a data set.

use super::Dataset;
use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where the CIFAR-10 binary version is published.
pub const URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
/// The archive's file name.
pub const ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// The files the archive holds (under `cifar-10-batches-bin/`).
pub const FILES: [&str; 8] = [
    "batches.meta.txt",
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
    "readme.html",
];

/// Extracts a CIFAR-10 binary archive (`.tar.gz`) into `dir` and validates the result.
/// Returns the train and test sizes. Members are written into a staging directory
/// inside `dir` and moved into place only once the whole archive has checked out, so a
/// failure leaves `dir` as it was.
pub fn extract(archive: &Path, dir: &Path) -> Result<(usize, usize)> {
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let staging = dir.join(".cifar10-extracting");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = unpack(file, archive, &staging).and_then(|()| {
        for name in FILES {
            let from = staging.join(name);
            if from.exists() {
                let to = dir.join(name);
                std::fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
            }
        }
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&staging);
    result?;
    let (train, test) = Dataset::cifar_dir(dir)?;
    Ok((train.len(), test.len()))
}

/// Writes the known members of the archive into `staging`, checking the gzip trailer
/// and that every data file is present.
fn unpack(file: std::fs::File, archive: &Path, staging: &Path) -> Result<()> {
    let bad = |msg: String| Error::Format {
        path: archive.to_path_buf(),
        msg,
    };
    let mut tar = tar::Archive::new(GzDecoder::new(std::io::BufReader::new(file)));
    let mut found = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a tar.gz archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("corrupt archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("corrupt member name: {e}")))?
            .into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(&known) = FILES.iter().find(|f| **f == name) else {
            continue;
        };
        let dest = staging.join(known);
        let mut out = std::fs::File::create(&dest).map_err(|e| Error::io(&dest, e))?;
        std::io::copy(&mut entry, &mut out)
            .map_err(|e| bad(format!("reading member {}: {e}", path.display())))?;
        out.sync_all().map_err(|e| Error::io(&dest, e))?;
        found.push(known);
    }
    // Drain the stream to its end: the gzip trailer's CRC-32 checks every byte.
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink())
        .map_err(|e| bad(format!("corrupt or truncated archive: {e}")))?;
    let missing: Vec<&str> = FILES[..7]
        .iter()
        .copied()
        .filter(|f| !found.contains(f))
        .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "not the CIFAR-10 binary archive: missing {}",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Downloads `url` to `dir/cifar-10-binary.tar.gz` (through a `.part` file, with a
/// progress bar when stderr is a terminal), then extracts it. Returns the archive path
/// and the train and test sizes.
pub fn download(url: &str, dir: &Path) -> Result<(PathBuf, usize, usize)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let archive = dir.join(ARCHIVE);
    let part = dir.join(format!("{ARCHIVE}.part"));
    let net = |msg: String| Error::Format {
        path: PathBuf::from(url),
        msg,
    };
    let response = ureq::get(url)
        .call()
        .map_err(|e| net(format!("download failed: {e}")))?;
    let len = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = indicatif::ProgressBar::new(len.unwrap_or(0)).with_style(
        indicatif::ProgressStyle::with_template(
            "downloading [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut body = response.into_body();
    let mut reader = bar.wrap_read(body.with_config().limit(u64::MAX).reader());
    let mut out = std::fs::File::create(&part).map_err(|e| Error::io(&part, e))?;
    let mut save = || -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| net(format!("download interrupted after {total} bytes: {e}")))?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| Error::io(&part, e))?;
            total += n as u64;
        }
        if let Some(len) = len.filter(|&l| l != total) {
            return Err(net(format!("download incomplete: {total} of {len} bytes")));
        }
        out.sync_all().map_err(|e| Error::io(&part, e))
    };
    let saved = save();
    bar.finish_and_clear();
    if saved.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    saved?;
    std::fs::rename(&part, &archive).map_err(|e| Error::io(&archive, e))?;
    let (train, test) = extract(&archive, dir)?;
    Ok((archive, train, test))
}
