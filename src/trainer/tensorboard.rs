//! TensorBoard event files (`--tensorboard`), written by hand: a few protobuf fields
//! in TFRecord framing, which is all `tensorboard --logdir` reads for scalars.
//!
//! An event file is a sequence of records, each
//!
//! ```text
//! length: u64 LE | masked_crc(length's 8 bytes): u32 LE | data | masked_crc(data): u32 LE
//! ```
//!
//! where `masked_crc(x) = rotate_right(crc32c(x), 15) + 0xa282ead8` (wrapping; CRC-32C
//! is the Castagnoli CRC). Each record's data is a protobuf `Event`
//! (tensorflow/core/util/event.proto), of which we write
//!
//! ```text
//! Event   { 1 wall_time: double, 2 step: int64,
//!           3 file_version: string ("brain.Event:2", the first record only),
//!           5 summary: Summary }
//! Summary { 1 value: repeated Value }
//! Value   { 1 tag: string, 2 simple_value: float }
//! ```
//!
//! A protobuf field is its key, the varint `number << 3 | wire type`, then its payload:
//! wire type 0 a varint (7 bits a byte, low first, high bit = more follows), 1 eight
//! bytes LE (a double), 2 a varint length then that many bytes (a string, a nested
//! message), 5 four bytes LE (a float).

use super::progress::Every;
use super::{Hook, LogInterval, State, StepOutput};
use crate::error::{Error, Result};
use crate::host::unix_time;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The metrics written after each epoch, and their TensorBoard tags.
const EPOCH_TAGS: [(&str, &str); 9] = [
    ("train_loss", "train/loss"),
    ("train_acc", "train/acc"),
    ("test_loss", "test/loss"),
    ("test_acc", "test/acc"),
    ("ema_test_loss", "ema/test_loss"),
    ("ema_test_acc", "ema/test_acc"),
    ("lr", "lr"),
    ("grad_norm", "grad_norm"),
    ("images_per_s", "images_per_s"),
];

/// The metrics also written every log interval within an epoch (`train/loss` is then
/// the epoch's running mean, as it is at the epoch's end).
const INTERVAL_TAGS: [(&str, &str); 2] = [("train_loss", "train/loss"), ("lr", "lr")];

/// Writes TensorBoard scalars on rank 0 into a new event file under `dir` (a resumed
/// run adds a file; TensorBoard merges a directory's files): after each epoch the
/// [`EPOCH_TAGS`] it has, with the optimizer step as the x axis, then flushes; every
/// log interval within an epoch the running train loss and the lr.
#[derive(Debug)]
pub struct TensorBoardHook {
    dir: PathBuf,
    interval: LogInterval,
    open: Option<(EventFile, Every)>,
}

impl TensorBoardHook {
    pub fn new(dir: impl Into<PathBuf>, interval: LogInterval) -> TensorBoardHook {
        TensorBoardHook {
            dir: dir.into(),
            interval,
            open: None,
        }
    }
}

/// The metrics of `tags` that `s` has, as TensorBoard values.
fn pick(s: &State, tags: &[(&str, &'static str)]) -> Vec<(&'static str, f32)> {
    tags.iter()
        .filter_map(|(k, tag)| Some((*tag, *s.metrics.get(*k)? as f32)))
        .collect()
}

impl Hook for TensorBoardHook {
    fn before_train(&mut self, s: &mut State) -> Result<()> {
        if s.logger.rank == 0 {
            let file = EventFile::create(&self.dir)?;
            self.open = Some((file, Every::new(self.interval)));
        }
        Ok(())
    }
    fn after_iter(&mut self, s: &mut State, _: &StepOutput) -> Result<()> {
        let step = s.engine.step_count();
        // the epoch's last step gets the epoch's values in after_epoch
        let within = s.iter + 1 < s.iters_per_epoch;
        match &mut self.open {
            Some((file, every)) if within => match every.due(step) {
                true => file.scalars(step, &pick(s, &INTERVAL_TAGS)),
                false => Ok(()),
            },
            _ => Ok(()),
        }
    }
    fn after_epoch(&mut self, s: &mut State) -> Result<()> {
        if let Some((file, _)) = &mut self.open {
            file.scalars(s.engine.step_count(), &pick(s, &EPOCH_TAGS))?;
            file.flush()?;
        }
        Ok(())
    }
    fn after_train(&mut self, _: &mut State) -> Result<()> {
        match &mut self.open {
            Some((file, _)) => file.flush(),
            None => Ok(()),
        }
    }
}

/// One event file, `events.out.tfevents.<unix seconds>.<host>.<pid>`, created new.
#[derive(Debug)]
struct EventFile {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventFile {
    fn create(dir: &Path) -> Result<EventFile> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let name = format!(
            "events.out.tfevents.{}.{}.{}",
            unix_time() as u64,
            hostname(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut f = EventFile {
            path,
            out: BufWriter::new(file),
        };
        f.write(&event(unix_time(), 0, Body::FileVersion))?;
        Ok(f)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.out
            .write_all(&record(data))
            .map_err(|e| Error::io(&self.path, e))
    }

    /// One event at `step` holding `values` (none: nothing written).
    fn scalars(&mut self, step: u64, values: &[(&str, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&event(unix_time(), step, Body::Scalars(values)))
    }

    fn flush(&mut self) -> Result<()> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// This machine's name for the file name: letters, digits, `.`, `-` and `_` kept,
/// anything else `_`.
fn hostname() -> String {
    crate::host::host_name()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
            _ => '_',
        })
        .collect()
}

/// What an event carries besides its time and step.
enum Body<'a> {
    FileVersion,
    Scalars(&'a [(&'a str, f32)]),
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    varint(out, field << 3 | wire_type);
}

/// A length-delimited field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    key(out, field, 2);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// An `Event` message.
fn event(wall_time: f64, step: u64, body: Body) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut out, 2, 0);
    varint(&mut out, step);
    match body {
        Body::FileVersion => bytes_field(&mut out, 3, b"brain.Event:2"),
        Body::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                key(&mut value, 2, 5);
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
    }
    out
}

/// TFRecord's checksum: CRC-32C, rotated and offset so that a CRC of data holding
/// CRCs is not degenerate.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// `data` framed as a TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_varints_match_their_specifications() {
        // the CRC-32C check value (RFC 3720's polynomial)
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // TensorBoard's own masked_crc32c(b"123456789")
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]); // protobuf's encoding guide's example
    }

    #[test]
    fn an_event_encodes_its_fields_in_order() {
        let e = event(1.5, 300, Body::Scalars(&[("lr", 0.5)]));
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // step 300
        want.extend_from_slice(&[0x2a, 11, 0x0a, 9, 0x0a, 2, b'l', b'r', 0x15]);
        want.extend_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(e, want);
        let r = record(&e);
        assert_eq!(r[..8], (e.len() as u64).to_le_bytes());
        assert_eq!(r[12..12 + e.len()], e[..]);
        assert_eq!(r.len(), e.len() + 16);
    }
}
