//! The on-disk format: the layout index (`index.json`) and safetensors shard headers.
//! docs/checkpoint-format.md specifies both; this module is the one place that
//! writes and parses them, with every bound checked before anything is read.

use crate::backend::Normalize;
use crate::error::{Error, Result};
use crate::metrics::RunningMean;
use crate::optim::{LrSchedule, OptimizerKind};
use crate::tensor::DType;
use crate::VitConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// `format` field of every index.
pub const FORMAT: &str = "ferrovit-checkpoint";
/// The index version this build writes. It also reads version 1 (the same index
/// without its checksum file).
pub const VERSION: u32 = 2;
/// The index file; its presence marks a committed checkpoint.
pub const INDEX: &str = "index.json";
/// The index's checksum: the CRC-32 of index.json's bytes, as 8 lowercase hex digits
/// and a newline. Written before the index; every reader checks it before using the
/// index.
pub const INDEX_CHECKSUM: &str = "index.json.crc32";
/// Largest index and shard header accepted (a crafted length cannot make us allocate
/// more than a small multiple of this).
pub const MAX_INDEX_BYTES: u64 = 64 << 20;
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
    #[serde(with = "super::schema::schedule")]
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
    /// The run's length: epochs and batches per epoch (0: not recorded, as by version
    /// 1 writers and imports). Bounds for `epoch`, `batch` and `step`.
    #[serde(default)]
    pub epochs: u64,
    #[serde(default)]
    pub batches_per_epoch: u64,
    /// The options of the run that saved it (`ferrovit train`'s, as a JSON object of
    /// option name → value), so a resume needs no flags; kept as it is here and read
    /// by the recipe. Absent from older checkpoints and from imports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<serde_json::Map<String, serde_json::Value>>,
    /// The running means of the epoch so far when saved mid-epoch (`train_loss`,
    /// `train_acc`: sum and count), so a resume reports the same epoch averages as an
    /// uninterrupted run. Empty at an epoch's end.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub running: BTreeMap<String, RunningMean>,
    /// How the model's input images were normalised (`{"mean": [r, g, b], "std": [r, g,
    /// b]}`), for inference; absent from older checkpoints, which were trained with
    /// CIFAR-10's (the default).
    #[serde(default)]
    pub normalize: Normalize,
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

/// Which weights of a checkpoint a reader uses: the trained ones, or their moving
/// average (`--ema-decay`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Weights {
    #[default]
    Raw,
    Ema,
}

/// What a tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Group {
    Model,
    Optimizer,
    /// The exponential moving average of the weights (`ema.<param>`, `--ema-decay`)
    Ema,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    #[serde(with = "super::schema::dtype")]
    pub dtype: DType,
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
    #[serde(with = "super::schema::model")]
    pub model: VitConfig,
    /// The optimizer and its hyper-parameters, when its state is included.
    #[serde(with = "super::schema::optimizer")]
    pub optimizer: Option<OptimizerKind>,
    pub training: TrainingState,
    #[serde(with = "super::schema::layout")]
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
    /// Parses and checks an index. `checksummed`: its bytes matched
    /// [`INDEX_CHECKSUM`] (required from version 2 on). Nothing in it is trusted:
    /// duplicate keys are refused, the model and optimizer configurations, the layout
    /// and the training state are validated, every tensor the model has must be
    /// present exactly once with its shape (and no other), and chunks must tile their
    /// tensor without sharing or overlapping bytes with any other chunk.
    pub fn parse(bytes: &[u8], path: &Path, checksummed: bool) -> Result<Index> {
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let mut de = serde_json::Deserializer::from_slice(bytes);
        serde::de::Deserialize::deserialize(&mut de)
            .and_then(|NoDuplicateKeys| de.end())
            .map_err(|e| bad(format!("not valid JSON: {e}")))?;
        #[derive(Deserialize)]
        struct Probe {
            format: Option<serde_json::Value>,
            version: Option<serde_json::Value>,
        }
        let probe: Probe =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        if probe.format.as_ref().and_then(|f| f.as_str()) != Some(FORMAT) {
            return Err(bad(format!(
                "not a ferrovit checkpoint index (`format` is not \"{FORMAT}\")"
            )));
        }
        match probe.version.as_ref().and_then(|v| v.as_u64()) {
            Some(1) => {}
            Some(v) if v == VERSION as u64 && checksummed => {}
            Some(v) if v == VERSION as u64 => {
                return Err(bad(format!(
                    "{INDEX_CHECKSUM} is missing: a version {v} index is only used once its checksum is verified"
                )))
            }
            v => {
                return Err(bad(format!(
                    "index version {v:?} is not supported (this build reads versions 1 and {VERSION})"
                )))
            }
        }
        let index: Index =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid index: {e}")))?;
        index.validate().map_err(|e| match e {
            Error::Config(m) | Error::Message(m) => bad(m),
            e => e,
        })?;
        Ok(index)
    }

    /// Everything [`Index::parse`] checks once the JSON is read.
    fn validate(&self) -> Result<()> {
        let cfg = |what: &str, e: Error| match e {
            Error::Config(m) => Error::Config(format!("{what}: {m}")),
            e => e,
        };
        self.model.validate().map_err(|e| cfg("model", e))?;
        if let Some(kind) = self.optimizer {
            kind.validate().map_err(|e| cfg("optimizer", e))?;
        }
        self.layout
            .check(self.model.depth)
            .map_err(|e| cfg("layout", e))?;
        self.training.validate(&self.model)?;
        let mut ranges = Vec::new();
        for (name, t) in &self.tensors {
            for c in t.check(name)? {
                ranges.push((c.file.as_str(), c.start, c.end, name.as_str()));
            }
        }
        check_disjoint(ranges)?;
        self.check_names()?;
        for (name, file) in &self.weight_map {
            check_file_name(file)
                .map_err(|m| Error::Config(format!("weight_map `{name}`: {m}")))?;
        }
        Ok(())
    }

    /// The model's tensors present exactly once with their shapes, the optimizer's
    /// state (when saved) for every one of them, nothing else; the weight map naming
    /// exactly the model tensors, each with a file of its chunks.
    fn check_names(&self) -> Result<()> {
        // the model's tensors by name and shape, from its configuration (no tensor
        // allocated: a reader must be able to hold the weights, though)
        self.model.check_fits(4, "its weights")?;
        let state: &[&str] = self.optimizer.map_or(&[], |k| k.state_names());
        // an EMA, when saved, covers every weight
        let ema = self.tensors.values().any(|t| t.group == Group::Ema);
        let mut want = BTreeMap::new();
        for (n, dims) in crate::nn::Vit::param_shapes(&self.model)? {
            for s in state {
                want.insert(format!("{s}.{n}"), (Group::Optimizer, dims.clone()));
            }
            if ema {
                let name = format!("{}{n}", crate::optim::EMA_PREFIX);
                want.insert(name, (Group::Ema, dims.clone()));
            }
            want.insert(n, (Group::Model, dims));
        }
        for (name, t) in &self.tensors {
            match want.remove(name) {
                // weights load into f32 from any dtype; optimizer state and EMA are f32
                Some((group, dims))
                    if group == t.group
                        && dims == t.shape
                        && (group == Group::Model || t.dtype == DType::F32) => {}
                Some((group, dims)) => {
                    return Err(Error::Config(format!(
                        "tensor `{name}` has dtype {}, shape {:?} in group {:?}; the model the index describes needs shape {dims:?} in group {group:?}{}",
                        t.dtype,
                        t.shape,
                        t.group,
                        if group == Group::Model { "" } else { " and dtype F32" }
                    )))
                }
                None => {
                    return Err(Error::Config(format!(
                        "tensor `{name}` is not part of the model the index describes (or of its optimizer state)"
                    )))
                }
            }
            if t.group == Group::Model
                && !t
                    .chunks
                    .iter()
                    .any(|c| Some(&c.file) == self.weight_map.get(name))
            {
                return Err(Error::Config(format!(
                    "weight_map does not name a file of model tensor `{name}`"
                )));
            }
        }
        if let Some((name, _)) = want.into_iter().next() {
            return Err(Error::Config(format!(
                "tensor `{name}` is missing: the model the index describes has it"
            )));
        }
        let models = self.tensors.values().filter(|t| t.group == Group::Model);
        if models.count() != self.weight_map.len() {
            return Err(Error::Config(
                "weight_map names tensors that are not model tensors of the index".into(),
            ));
        }
        Ok(())
    }
}

impl TrainingState {
    /// Bounds that hold for every state a run can save: the position inside the run
    /// (when its length is recorded), the optimizer's count not ahead of the updates,
    /// finite rates, a schedule that can be evaluated, class names one per class.
    pub fn validate(&self, model: &VitConfig) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("training: {msg}")));
        if self.epochs > 0 && self.epoch > self.epochs {
            return bad(format!(
                "epoch {} is past the run's {} epochs",
                self.epoch, self.epochs
            ));
        }
        if self.batches_per_epoch > 0 && self.batch > self.batches_per_epoch {
            return bad(format!(
                "batch {} is past the epoch's {} batches",
                self.batch, self.batches_per_epoch
            ));
        }
        if self.optimizer_steps > self.step {
            return bad(format!(
                "optimizer_steps {} is ahead of step {}",
                self.optimizer_steps, self.step
            ));
        }
        for (field, v) in [("base_lr", self.base_lr), ("lr", self.lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{field} {v} must be finite and >= 0"));
            }
        }
        if let Some(s) = &self.schedule {
            s.validate()
                .map_err(|e| Error::Config(format!("training: schedule: {e}")))?;
        }
        if !self.classes.is_empty() && self.classes.len() != model.num_classes {
            return bad(format!(
                "{} class names for a model of {} classes",
                self.classes.len(),
                model.num_classes
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = self.classes.iter().find(|c| !seen.insert(c.as_str())) {
            return bad(format!("class name {dup:?} appears twice"));
        }
        if let Err(why) = self.normalize.check() {
            return bad(format!("normalize: {why}"));
        }
        self.check_running()
    }

    /// Running means only mid-epoch, each finite and over at most the batches run.
    fn check_running(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("training: running: {msg}")));
        if self.batch == 0 && !self.running.is_empty() {
            return bad("running means at the start of an epoch".into());
        }
        for (name, m) in &self.running {
            if !m.sum.is_finite() || m.count == 0 {
                return bad(format!("{name:?} has sum {} over {} items", m.sum, m.count));
            }
        }
        Ok(())
    }
}

impl TensorEntry {
    /// Checks the dtype, the shape's size and that the chunks tile the tensor: each
    /// inside it, keyed by the tensor's name (one chunk) or `<name>@<offset>` (pieces),
    /// covering every element once. Returns the chunks.
    fn check(&self, name: &str) -> Result<&[Chunk]> {
        let what = |msg: String| Error::Config(format!("tensor `{name}`: {msg}"));
        let size = self.dtype.size_in_bytes() as u64;
        let numel = self
            .shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .filter(|n| n.checked_mul(size).is_some())
            .ok_or_else(|| what(format!("shape {:?} overflows", self.shape)))?;
        let mut covered = Vec::with_capacity(self.chunks.len());
        for c in &self.chunks {
            check_file_name(&c.file).map_err(&what)?;
            let key_ok = match self.chunks.len() {
                1 => c.key == name,
                _ => c.key == format!("{name}@{}", c.offset),
            };
            if !key_ok {
                return Err(what(format!(
                    "chunk in {} has key `{}`; a chunk's key is its tensor's name (or `<name>@<offset>` for a piece)",
                    c.file, c.key
                )));
            }
            let len = c.end.checked_sub(c.start).ok_or_else(|| {
                what(format!(
                    "chunk in {} ends ({}) before it starts ({})",
                    c.file, c.end, c.start
                ))
            })?;
            if len % size != 0 {
                return Err(what(format!(
                    "chunk in {} has {len} bytes, not a whole number of {} elements",
                    c.file, self.dtype
                )));
            }
            let n = len / size;
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
        Ok(&self.chunks)
    }
}

/// No two chunks (of any tensors) may share or overlap bytes of a file: a crafted
/// index could otherwise point one tensor at another's data and checksum.
fn check_disjoint(mut ranges: Vec<(&str, u64, u64, &str)>) -> Result<()> {
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        let ((fa, _, ea, na), (fb, sb, _, nb)) = (w[0], w[1]);
        if fa == fb && sb < ea {
            return Err(Error::Config(format!(
                "tensors `{na}` and `{nb}` share bytes of {fa} (chunks may not overlap)"
            )));
        }
    }
    Ok(())
}

/// Walks a JSON document and fails on an object with a repeated key (serde_json keeps
/// the last one silently, so an edited index could hide a second value behind the
/// first). Allocates nothing but the keys of the object being read.
struct NoDuplicateKeys;

impl<'de> Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(NoDuplicateKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for NoDuplicateKeys {
    type Value = NoDuplicateKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> std::result::Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<Self, A::Error> {
        while a.next_element::<NoDuplicateKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut a: A,
    ) -> std::result::Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = a.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            a.next_value::<NoDuplicateKeys>()?;
            seen.insert(key);
        }
        Ok(self)
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
