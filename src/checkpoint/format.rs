//! The on-disk format: the layout index (`index.json`) and safetensors shard headers.
//! docs/checkpoint-format.md specifies both; this module is the one place that
//! writes and parses them, with every bound checked before anything is read.

use crate::error::{Error, Result};
use crate::optim::{LrSchedule, OptimizerKind};
use crate::tensor::DType;
use crate::VitConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `format` field of every index.
pub const FORMAT: &str = "ferrovit-checkpoint";
/// The index version this build writes and the only one it reads.
pub const VERSION: u32 = 1;
/// The index file; its presence marks a committed checkpoint.
pub const INDEX: &str = "index.json";
/// Largest index and shard header accepted (a crafted length cannot make us allocate
/// more than this).
pub const MAX_INDEX_BYTES: u64 = 256 << 20;
pub const MAX_HEADER_BYTES: u64 = 100 << 20;
/// Shard data starts at a multiple of this (the header is padded with spaces), so
/// memory-mapped tensors are aligned for zero-copy views.
pub const ALIGN: usize = 64;

/// Where training stands: everything besides tensors that a resume needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// The next batch to run: epoch (0-based) and batch index within it.
    pub epoch: u64,
    pub batch: u64,
    /// Optimizer updates applied (the engine's step count).
    pub step: u64,
    /// The optimizer's own step count (Adam's bias correction).
    pub optimizer_steps: u64,
    /// Base learning rate, the schedule that scales it, and the rate of the last update.
    pub base_lr: f32,
    pub lr: f32,
    pub schedule: Option<LrSchedule>,
    /// The run's seed. Data order, augmentation and dropout are counter-based streams
    /// keyed by (seed, epoch, batch, sample, step), so the seed and the position above
    /// are the whole RNG state.
    pub seed: u64,
    /// Per-epoch metrics so far (for the metrics file and plot of a resumed run).
    #[serde(default)]
    pub history: Vec<BTreeMap<String, f64>>,
    /// The names of the classes, by index (for inference; may be empty).
    #[serde(default)]
    pub classes: Vec<String>,
}

/// The parallel layout a checkpoint was saved under.
pub use crate::dist::Layout;

/// One contiguous piece of a tensor in a shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Shard file name (a plain name inside the checkpoint directory).
    pub file: String,
    /// The tensor's name in that shard's header.
    pub key: String,
    /// Absolute byte range `[start, end)` of the data in the file.
    pub start: u64,
    pub end: u64,
    /// Element offset of the chunk in the flattened global tensor.
    pub offset: u64,
    /// CRC-32 (IEEE) of the bytes `[start, end)`.
    pub crc32: u32,
    /// The rank that wrote it.
    pub rank: usize,
}

/// What a tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Model,
    Optimizer,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub group: Group,
    pub chunks: Vec<Chunk>,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// The layout index: the commit marker and the map of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub version: u32,
    pub model: VitConfig,
    /// The optimizer and its hyper-parameters, when its state is included.
    pub optimizer: Option<OptimizerKind>,
    pub training: TrainingState,
    pub layout: Layout,
    pub tensors: BTreeMap<String, TensorEntry>,
    /// Model tensor name → shard file (as Hugging Face's `model.safetensors.index.json`).
    pub weight_map: BTreeMap<String, String>,
}

/// A file name the index may refer to: plain, inside the checkpoint directory.
pub fn check_file_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "file name `{name}` is not a plain file name inside the checkpoint directory"
        ))
    }
}

impl Index {
    /// Parses and checks an index: format, version, names, and that every tensor's
    /// chunks are within the tensor and cover it exactly once.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Index> {
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let probe: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if probe.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(bad(format!(
                "not a ferrovit checkpoint index (`format` is not \"{FORMAT}\")"
            )));
        }
        match probe.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == VERSION as u64 => {}
            v => {
                return Err(bad(format!(
                    "index version {v:?} is not supported (this build reads version {VERSION})"
                )))
            }
        }
        let index: Index =
            serde_json::from_value(probe).map_err(|e| bad(format!("invalid index: {e}")))?;
        for (name, t) in &index.tensors {
            let what = |msg: String| bad(format!("tensor `{name}`: {msg}"));
            let dtype = DType::from_name(&t.dtype)
                .ok_or_else(|| what(format!("unknown dtype `{}`", t.dtype)))?;
            let numel = t
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
                .ok_or_else(|| what(format!("shape {:?} overflows", t.shape)))?;
            let mut covered = Vec::with_capacity(t.chunks.len());
            for c in &t.chunks {
                check_file_name(&c.file).map_err(&what)?;
                let len = c.end.checked_sub(c.start).ok_or_else(|| {
                    what(format!(
                        "chunk in {} ends ({}) before it starts ({})",
                        c.file, c.end, c.start
                    ))
                })?;
                if len % dtype.size_in_bytes() as u64 != 0 {
                    return Err(what(format!(
                        "chunk in {} has {len} bytes, not a whole number of {} elements",
                        c.file, t.dtype
                    )));
                }
                let n = len / dtype.size_in_bytes() as u64;
                if c.offset.checked_add(n).is_none_or(|e| e > numel) {
                    return Err(what(format!(
                        "chunk in {} (elements {}..{}) lies outside the tensor's {numel} elements",
                        c.file,
                        c.offset,
                        c.offset.saturating_add(n)
                    )));
                }
                covered.push((c.offset, c.offset + n));
            }
            covered.sort_unstable();
            let mut next = 0;
            for (s, e) in covered {
                if s != next {
                    return Err(what(format!(
                        "chunks {} at element {next} (overlapping or missing data)",
                        if s < next { "overlap" } else { "leave a gap" }
                    )));
                }
                next = e;
            }
            if next != numel {
                return Err(what(format!("chunks cover {next} of {numel} elements")));
            }
        }
        for (name, file) in &index.weight_map {
            check_file_name(file).map_err(|m| bad(format!("weight_map `{name}`: {m}")))?;
        }
        Ok(index)
    }
}

/// One tensor entry of a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data_offsets: [u64; 2],
}

/// The safetensors preamble for tensors of the given (name, dtype, shape), laid out
/// contiguously in this order: 8-byte little-endian header length, then the JSON
/// header padded with spaces so the data starts at a multiple of [`ALIGN`]. Returns
/// the preamble and each tensor's data range relative to the data start.
pub fn shard_header(tensors: &[(&str, DType, &[usize])]) -> Result<(Vec<u8>, Vec<[u64; 2]>)> {
    let mut map = serde_json::Map::new();
    map.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "writer": "ferrovit" }),
    );
    let mut ranges = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for &(name, dtype, shape) in tensors {
        let len = shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64;
        let e = HeaderEntry {
            dtype: dtype.name().into(),
            shape: shape.to_vec(),
            data_offsets: [at, at + len],
        };
        map.insert(
            name.to_string(),
            serde_json::to_value(e).map_err(|e| Error::Config(format!("header: {e}")))?,
        );
        ranges.push([at, at + len]);
        at += len;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| Error::Config(format!("header: {e}")))?;
    let total = (8 + json.len()).div_ceil(ALIGN) * ALIGN;
    json.resize(total - 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok((out, ranges))
}

/// A parsed, validated safetensors header: entries by name, and where data starts.
#[derive(Debug)]
pub struct ShardHeader {
    pub entries: BTreeMap<String, HeaderEntry>,
    pub data_start: u64,
}

/// Parses the header of a safetensors file of `file_len` bytes whose first bytes are
/// `bytes`, checking: the header length against the cap and the file; the JSON; every
/// dtype; dtype × shape = byte length; every range inside the data section; ranges
/// contiguous from 0 without overlap and covering the whole data section.
pub fn parse_shard_header(bytes: &[u8], file_len: u64, path: &Path) -> Result<ShardHeader> {
    let bad = |msg: String| Error::Format {
        path: path.to_path_buf(),
        msg,
    };
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            bad(format!(
                "{file_len} bytes: too short for a safetensors header"
            ))
        })?;
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (corrupt file?)"
        )));
    }
    if 8 + n > file_len {
        return Err(bad(format!(
            "header length {n} runs past the end of the {file_len}-byte file (truncated?)"
        )));
    }
    let json = bytes
        .get(8..8 + n as usize)
        .ok_or_else(|| bad("header not readable".into()))?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let data_len = file_len - 8 - n;
    let mut entries = BTreeMap::new();
    let mut ranges = Vec::new();
    for (name, v) in raw {
        if name == "__metadata__" {
            continue;
        }
        let what = |msg: String| bad(format!("tensor `{name}`: {msg}"));
        let e: HeaderEntry =
            serde_json::from_value(v).map_err(|e| what(format!("invalid header entry: {e}")))?;
        let dtype = DType::from_name(&e.dtype)
            .ok_or_else(|| what(format!("unsupported dtype `{}`", e.dtype)))?;
        let [s, end] = e.data_offsets;
        let want = e
            .shape
            .iter()
            .try_fold(dtype.size_in_bytes() as u64, |a, &d| {
                a.checked_mul(d as u64)
            })
            .ok_or_else(|| what(format!("shape {:?} overflows", e.shape)))?;
        if s > end || end > data_len {
            return Err(what(format!(
                "data range {s}..{end} is outside the {data_len}-byte data section (truncated or corrupt file)"
            )));
        }
        if end - s != want {
            return Err(what(format!(
                "{} {:?} needs {want} bytes but the range holds {}",
                e.dtype,
                e.shape,
                end - s
            )));
        }
        ranges.push((s, end, name.clone()));
        entries.insert(name, e);
    }
    ranges.sort();
    let mut next = 0;
    for (s, e, name) in &ranges {
        if *s != next {
            return Err(bad(format!(
                "tensor `{name}`: data starts at {s}, expected {next} ({})",
                if *s < next {
                    "overlapping ranges"
                } else {
                    "a gap"
                }
            )));
        }
        next = *e;
    }
    if next != data_len {
        return Err(bad(format!(
            "tensors cover {next} of the {data_len}-byte data section (trailing bytes or truncated)"
        )));
    }
    Ok(ShardHeader {
        entries,
        data_start: 8 + n,
    })
}
