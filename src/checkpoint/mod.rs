//! Checkpoints: a directory of safetensors shard files plus a layout index
//! (`index.json`, written last as the commit marker). See docs/checkpoint-format.md.
//!
//! - [`save`] / [`AsyncSaver`]: snapshot → shards → index → atomic rename, `latest`
//!   pointer, `keep_last` retention.
//! - [`Checkpoint`]: the reader — memory-mapped shards, strict header validation, CRC-32
//!   of every byte range read, zero-copy views.
//! - `Engine::snapshot`, `Engine::save_checkpoint`, `Engine::load_checkpoint`: the
//!   engine-level calls (strict or not, with a report).
//! - [`export_safetensors`] / [`import_safetensors`] (`import.rs`): the model's
//!   weights to and from one plain safetensors file, for other tools.

mod crc_copy;
mod format;
mod import;
mod reader;
mod schema;
mod writer;

pub use format::{
    check_file_name, parse_shard_header, shard_header, Chunk, Group, HeaderEntry, Index, Layout,
    TensorEntry, TrainingState, Weights, ALIGN, FORMAT, INDEX, INDEX_CHECKSUM, MAX_HEADER_BYTES,
    MAX_INDEX_BYTES, VERSION,
};
pub use import::{import_safetensors, read_safetensors, timm_constructor, ImportOptions, Imported};
pub use reader::{read_index, Checkpoint, VerifyReport};
pub use writer::{
    checkpoint_name, retain, save, set_latest, AsyncSaver, BestBy, SaveGroup, SaveOptions,
    SnapTensor, Snapshot, BEST,
};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::nn::VitConfig;
use crate::tensor::{DType, Tensor};
use std::path::{Path, PathBuf};

/// The checkpoints under a root directory.
#[derive(Debug, Default)]
pub struct Listing {
    /// Committed checkpoints (with an index), oldest first by name.
    pub committed: Vec<PathBuf>,
    /// Directories of interrupted saves: never loaded.
    pub uncommitted: Vec<PathBuf>,
}

/// Lists a checkpoint root. Sub-directories with `index.json` are committed, except
/// hidden ones. Uncommitted are the directories only a save makes: the writer's
/// temporaries (`.tmp-…`, `.old-…`, `.del-…`, whatever they hold) and directories named
/// as checkpoints (`step-…`) without an index. Anything else under the root is not a
/// checkpoint's and is left out (so `ckpt list --clean` never removes it). A missing
/// root lists nothing.
pub fn list(root: &Path) -> Result<Listing> {
    let mut l = Listing::default();
    if !root.exists() {
        return Ok(l);
    }
    for e in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let p = e.map_err(|e| Error::io(root, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !p.is_dir() {
            continue;
        }
        let temporary = [".tmp-", ".old-", ".del-"]
            .iter()
            .any(|t| name.starts_with(t));
        if temporary {
            l.uncommitted.push(p);
        } else if !name.starts_with('.') && p.join(INDEX).is_file() {
            l.committed.push(p);
        } else if writer::is_checkpoint_name(name) {
            l.uncommitted.push(p);
        }
    }
    l.committed.sort();
    l.uncommitted.sort();
    Ok(l)
}

/// The checkpoint name in `root/latest`, if there is one.
pub fn read_latest(root: &Path) -> Option<String> {
    read_pointer(root, "latest")
}

/// The checkpoint name in the pointer file `root/<pointer>` (`latest`, `best`), if
/// there is one.
pub fn read_pointer(root: &Path, pointer: &str) -> Option<String> {
    let bytes =
        crate::files::read_bounded(&root.join(pointer), 4096, crate::files::Links::Refuse).ok()?;
    let name = String::from_utf8(bytes).ok()?.trim().to_string();
    check_file_name(&name).ok()?;
    Some(name)
}

/// The checkpoint to resume from under `root`: the newest committed one (names order
/// by step). This is what `latest` names, except after a crash between a commit and
/// the pointer's update, when the newer committed checkpoint wins.
pub fn newest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.committed.pop())
}

/// How `Engine::load_checkpoint` treats differences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Every model parameter must be present with its shape, and nothing extra.
    pub strict: bool,
    /// Restore the optimizer state (and the step count) too, and the EMA of the
    /// weights when the engine keeps one (else it restarts from the loaded weights).
    pub optimizer: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: true,
            optimizer: true,
        }
    }
}

/// What a load did not match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Model parameters the checkpoint lacks (left as initialised).
    pub missing: Vec<String>,
    /// Checkpoint model tensors the model does not have.
    pub unexpected: Vec<String>,
    /// Present in both with different shapes: (name, checkpoint shape, model shape).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Position embeddings resampled to the model's patch grid (non-strict loads, the
    /// same patch size): (name, the checkpoint's grid side, the model's).
    pub resampled: Vec<(String, usize, usize)>,
    /// Tensors loaded.
    pub loaded: usize,
    /// Whether the optimizer state was restored.
    pub optimizer_loaded: bool,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loaded {} tensors", self.loaded)?;
        if !self.missing.is_empty() {
            write!(
                f,
                "; missing (kept initial values): {}",
                self.missing.join(", ")
            )?;
        }
        if !self.unexpected.is_empty() {
            write!(f, "; unexpected (ignored): {}", self.unexpected.join(", "))?;
        }
        for (n, c, m) in &self.mismatched {
            write!(
                f,
                "; `{n}` shape {c:?} in the checkpoint vs {m:?} in the model (kept initial)"
            )?;
        }
        for (n, from, to) in &self.resampled {
            write!(
                f,
                "; `{n}` resampled from a {from}×{from} to a {to}×{to} patch grid (bicubic, the cls position kept)"
            )?;
        }
        Ok(())
    }
}

impl Engine {
    /// The parameters and optimizer state as they are now, for a save: copy-on-write
    /// shares of the live tensors, so this costs no copy and the training that goes on
    /// meanwhile does not change what is written (an update to a tensor still being
    /// written copies it first).
    pub fn snapshot(&self, training: TrainingState) -> Snapshot {
        let params = self.params();
        let share = |name: String, group: Group, t: &Tensor| SnapTensor {
            name,
            group,
            tensor: t.share(),
        };
        let mut tensors: Vec<SnapTensor> = params
            .named_parameters()
            .map(|(n, t)| share(n.to_string(), Group::Model, t))
            .collect();
        tensors.extend(
            self.optimizer
                .named_state(params)
                .into_iter()
                .map(|(n, t)| share(n, Group::Optimizer, t)),
        );
        if let Some(ema) = self.ema() {
            let named = ema.named(params).into_iter();
            tensors.extend(named.map(|(n, t)| share(n, Group::Ema, t)));
        }
        Snapshot {
            model: self.model.config.clone(),
            optimizer: Some(self.optimizer.kind),
            training: TrainingState {
                step: self.step_count(),
                optimizer_steps: self.optimizer.steps(),
                base_lr: self.config.lr,
                lr: self.lr(),
                seed: self.config.seed,
                ..training
            },
            layout: self.parallel_info().map_or_else(
                || Layout::single(self.model.config.depth),
                |p| p.layout.clone(),
            ),
            rank: self.parallel_info().map_or(0, |p| p.rank()),
            run: self.parallel_info().map_or(0, |p| p.run),
            save: 0,
            tensors,
            group: self
                .parallel_info()
                .map(|p| writer::SaveGroup(p.world.clone())),
        }
    }

    /// Saves synchronously under `root` as `step-<step>`; returns the path.
    pub fn save_checkpoint(
        &self,
        root: &Path,
        training: TrainingState,
        opts: &SaveOptions,
    ) -> Result<PathBuf> {
        let snapshot = self.snapshot(training);
        save(&snapshot, root, &checkpoint_name(self.step_count()), opts)
    }

    /// Loads weights (and optimizer state and step count, when asked and present) from
    /// a checkpoint directory. Strict: any missing, unexpected or mismatched tensor is
    /// an error naming the first one, and nothing is changed. Non-strict: matching
    /// tensors load, the rest are reported. Returns the checkpoint's training state
    /// and the report.
    pub fn load_checkpoint(
        &mut self,
        dir: &Path,
        opts: LoadOptions,
    ) -> Result<(TrainingState, LoadReport)> {
        let ckpt = Checkpoint::open(dir)?;
        let mut report = LoadReport::default();
        let mut values = Vec::new();
        let model = self.model.clone();
        let params = self.params_mut();
        for p in params.iter() {
            let grids = |saved: &[usize]| match opts.strict || p.name != "pos_embed" {
                true => None,
                false => pos_embed_grids(&ckpt.index.model, &model.config, saved, p.value.dims()),
            };
            match ckpt.index.tensors.get(&p.name) {
                None => report.missing.push(p.name.clone()),
                Some(t) if t.shape.as_slice() != p.value.dims() && grids(&t.shape).is_some() => {
                    let (from, to) = grids(&t.shape).unwrap_or_default();
                    report.resampled.push((p.name.clone(), from, to));
                }
                Some(t) if t.shape.as_slice() != p.value.dims() => report.mismatched.push((
                    p.name.clone(),
                    t.shape.clone(),
                    p.value.dims().to_vec(),
                )),
                Some(_) => values.push(p.name.clone()),
            }
        }
        // tensors of other pipeline stages are theirs to load
        for name in ckpt.names(Group::Model) {
            if model.owns(name) && params.id(name).is_err() {
                report.unexpected.push(name.to_string());
            }
        }
        if opts.strict && !report.is_clean() {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: format!(
                    "checkpoint does not match the model (strict load): {}",
                    first_difference(&report)
                ),
            });
        }
        // Read (and checksum) everything, tensors in parallel, before changing anything.
        use rayon::prelude::*;
        let mut loaded: Vec<(String, Tensor)> = values
            .into_par_iter()
            .map(|n| ckpt.read(&n).map(|t| (n, t)))
            .collect::<Result<_>>()?;
        for (name, from, to) in &report.resampled {
            loaded.push((name.clone(), resampled_pos_embed(&ckpt, name, *from, *to)?));
        }

        // Optimizer state: all of it (same optimizer, every tensor present) or none.
        let state_names: Vec<String> = self
            .optimizer
            .named_state(self.params())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let restore = opts.optimizer && report.is_clean();
        let have_state = ckpt.index.optimizer == Some(self.optimizer.kind)
            && state_names
                .iter()
                .all(|n| ckpt.index.tensors.contains_key(n));
        if restore && opts.strict && !have_state {
            return Err(Error::Format {
                path: dir.to_path_buf(),
                msg: format!(
                    "the checkpoint has no optimizer state for {:?} (saved with {:?}); load the weights only to start the optimizer fresh",
                    self.optimizer.kind, ckpt.index.optimizer
                ),
            });
        }
        let state: Vec<(String, Tensor)> = if restore && have_state {
            state_names
                .into_par_iter()
                .map(|n| ckpt.read(&n).map(|t| (n, t)))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        // a resume restores the EMA; weights alone (--init) start it afresh from them
        let ema = match opts.optimizer {
            true => self.ema_from(&ckpt)?,
            false => Vec::new(),
        };
        for (name, t) in loaded.iter().chain(&ema) {
            check_finite(dir, name, t)?;
        }
        report.loaded = loaded.len() + state.len() + ema.len();
        let params = self.params_mut();
        for (n, t) in loaded {
            params.set(&n, t)?;
        }
        self.restore_ema(ema)?;
        if restore && have_state {
            let mut state: std::collections::HashMap<String, Tensor> = state.into_iter().collect();
            let store = std::mem::take(self.params_mut());
            let result =
                self.optimizer
                    .load_state(&store, ckpt.index.training.optimizer_steps, |n| {
                        state.remove(n)
                    });
            *self.params_mut() = store;
            result?;
            self.set_step(ckpt.index.training.step);
            report.optimizer_loaded = true;
        }
        Ok((ckpt.index.training.clone(), report))
    }
}

impl Engine {
    /// This rank's EMA tensors from the checkpoint when the engine keeps an EMA and the
    /// checkpoint has one (read and verified like the weights); none otherwise.
    fn ema_from(&self, ckpt: &Checkpoint) -> Result<Vec<(String, Tensor)>> {
        let Some(ema) = self.ema() else {
            return Ok(Vec::new());
        };
        let names: Vec<String> = ema
            .named(self.params())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        if !names.iter().all(|n| ckpt.index.tensors.contains_key(n)) {
            return Ok(Vec::new());
        }
        use rayon::prelude::*;
        names
            .into_par_iter()
            .map(|n| ckpt.read(&n).map(|t| (n, t.to_dtype(DType::F32))))
            .collect()
    }

    /// Installs the EMA read by [`Engine::ema_from`], or (none read: weights from a
    /// checkpoint without one) restarts it from the loaded weights.
    fn restore_ema(&mut self, values: Vec<(String, Tensor)>) -> Result<()> {
        let mut values: std::collections::HashMap<String, Tensor> = values.into_iter().collect();
        let empty = values.is_empty();
        let store = std::mem::take(self.params_mut());
        let result = match self.ema_mut() {
            None => Ok(()),
            Some(ema) if empty => {
                ema.reset(&store);
                Ok(())
            }
            Some(ema) => ema.load(&store, |n| values.remove(n)),
        };
        *self.params_mut() = store;
        result
    }
}

/// The checkpoint's and the model's patch grid sides when the checkpoint's position
/// embedding (shape `saved`) can be resampled to the model's (`want`): the same patch
/// size and width, square grids of other sizes.
fn pos_embed_grids(
    saved_cfg: &VitConfig,
    cfg: &VitConfig,
    saved: &[usize],
    want: &[usize],
) -> Option<(usize, usize)> {
    use crate::nn::pos_embed::grid_side;
    match (saved, want) {
        ([1, a, d], [1, b, e]) if d == e && saved_cfg.patch_size == cfg.patch_size => {
            Some((grid_side(*a)?, grid_side(*b)?))
        }
        _ => None,
    }
}

/// Tensor `name` of `ckpt` (a position embedding `[1, 1 + from², dim]`) resampled to a
/// `to` × `to` grid, as timm's `resample_abs_pos_embed`.
fn resampled_pos_embed(ckpt: &Checkpoint, name: &str, from: usize, to: usize) -> Result<Tensor> {
    let t = ckpt.read(name)?.to_dtype(DType::F32);
    let dim = t.dims()[2];
    let values = crate::nn::pos_embed::resample_pos_embed(&t.to_vec_f32(), dim, from, to);
    Tensor::from_vec(values, [1, 1 + to * to, dim])
}

fn first_difference(r: &LoadReport) -> String {
    if let Some((n, c, m)) = r.mismatched.first() {
        format!("`{n}` has shape {c:?} in the checkpoint but {m:?} in the model")
    } else if let Some(n) = r.missing.first() {
        format!(
            "`{n}` is missing from the checkpoint ({} missing in all)",
            r.missing.len()
        )
    } else if let Some(n) = r.unexpected.first() {
        format!(
            "`{n}` is in the checkpoint but not in the model ({} unexpected in all)",
            r.unexpected.len()
        )
    } else {
        "no difference".into()
    }
}

/// Writes the model tensors of a checkpoint (the trained weights or their EMA, under
/// the model's names) into one safetensors file (for other tools); returns the number
/// of tensors written.
pub fn export_safetensors(dir: &Path, out: &Path) -> Result<usize> {
    export_weights(dir, out, Weights::Raw)
}

/// Refuses weights with a NaN or infinite element (a diverged run, a damaged or
/// hostile file), naming `file`, the tensor and the element: nothing computed from them
/// would mean anything, and evaluation would report a plausible-looking accuracy.
pub fn check_finite(file: &Path, name: &str, t: &Tensor) -> Result<()> {
    let widened;
    let values = match t.f32s() {
        Ok(v) => v,
        Err(_) => {
            widened = t.to_vec_f32();
            &widened[..]
        }
    };
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Format {
            path: file.to_path_buf(),
            msg: format!(
                "`{name}` element {i} is {}: the weights are not finite (a diverged run, or a damaged file)",
                values[i]
            ),
        }),
    }
}

/// Refuses an export to `out` that would replace something other than a file, or
/// write into the checkpoint directory it reads (over its own shards or index).
fn check_export_target(dir: &Path, out: &Path) -> Result<()> {
    crate::files::check_output(out)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let (Ok(a), Ok(b)) = (parent.canonicalize(), dir.canonicalize()) {
        if a == b {
            return Err(Error::Config(format!(
                "{}: inside the checkpoint being exported ({}); write the export elsewhere",
                crate::text::path(out),
                crate::text::path(dir)
            )));
        }
    }
    Ok(())
}

/// As [`export_safetensors`], the trained weights or their EMA.
pub fn export_weights(dir: &Path, out: &Path, weights: Weights) -> Result<usize> {
    let tmp = out.with_extension("safetensors.part");
    check_export_target(dir, out)?;
    crate::files::check_output(&tmp)?;
    let ckpt = Checkpoint::open(dir)?;
    let names = ckpt.names(Group::Model);
    let tensors: Vec<(String, Tensor)> = names
        .iter()
        .map(|n| {
            let stored = ckpt.weight_name(n, weights)?;
            ckpt.read(&stored).map(|t| (n.to_string(), t))
        })
        .collect::<Result<_>>()?;
    let meta: Vec<(&str, DType, &[usize])> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.dtype(), t.dims()))
        .collect();
    let (header, _) = shard_header(&meta)?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        f.write_all(&header)?;
        for (_, t) in &tensors {
            f.write_all(&t.to_le_bytes())?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    let done = write()
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e)));
    if done.is_err() {
        // a failed export leaves nothing behind (the .part would be a partial file)
        let _ = std::fs::remove_file(&tmp);
    }
    done.map(|()| tensors.len())
}
