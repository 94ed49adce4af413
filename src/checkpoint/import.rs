//! Weights from other tools: [`read_safetensors`] reads a plain safetensors file
//! (validated as strictly as a shard), and [`import_safetensors`] turns one into a
//! weights-only checkpoint of a preset's model (`ferrovit ckpt import`).

use super::{checkpoint_name, parse_shard_header, save, Group};
use crate::engine::{Engine, TrainConfig};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use crate::VitConfig;
use std::path::{Path, PathBuf};

/// Makes a weights-only checkpoint (`out_root/step-0000000000`, no optimizer state) of
/// the model `preset` with a head of `num_classes` from the safetensors `file`, its
/// names renamed by `map` as in [`read_safetensors`]. Every tensor must be a parameter
/// of that model with its shape, and every parameter must be in the file: a partial
/// import would train from a silent mix of loaded and random weights. Returns the
/// number of tensors imported and the checkpoint's directory.
pub fn import_safetensors(
    file: &Path,
    out_root: &Path,
    preset: &str,
    num_classes: usize,
    map: &[(String, String)],
) -> Result<(usize, PathBuf)> {
    let mut cfg = VitConfig::preset(preset)?;
    cfg.num_classes = num_classes;
    let mut engine = Engine::new(&cfg, TrainConfig::default())?;
    let tensors = read_safetensors(file, map)?;
    let count = tensors.len();
    set_every_parameter(&mut engine, tensors, file, preset)?;
    let mut snap = engine.snapshot(Default::default());
    snap.tensors.retain(|t| t.group == Group::Model);
    snap.optimizer = None;
    let dest = save(&snap, out_root, &checkpoint_name(0), &Default::default())?;
    Ok((count, dest))
}

/// Replaces the engine's parameters by `tensors`, refusing names the model lacks (before
/// changing any), shapes that differ, and parameters left unset.
fn set_every_parameter(
    engine: &mut Engine,
    tensors: Vec<(String, Tensor)>,
    file: &Path,
    preset: &str,
) -> Result<()> {
    let format = |msg: String| Error::Format {
        path: file.to_path_buf(),
        msg,
    };
    let params = engine.params_mut();
    let unknown: Vec<&str> = tensors
        .iter()
        .filter(|(n, _)| params.id(n).is_err())
        .map(|(n, _)| n.as_str())
        .collect();
    if let Some(first) = unknown.first() {
        return Err(format(format!(
            "{} tensors match no parameter of {preset} (first: `{first}`); rename them with --map FROM=TO",
            unknown.len()
        )));
    }
    let count = tensors.len();
    for (n, t) in tensors {
        params.set(&n, t).map_err(|e| format(e.to_string()))?;
    }
    let missing = params.len() - count;
    if missing > 0 {
        return Err(format(format!(
            "{missing} parameters of {preset} are not in the file"
        )));
    }
    Ok(())
}

/// Reads every tensor of a safetensors file (validated as strictly as a shard), renamed
/// by `map` (`from` → `to` prefix replacements, first match wins; unmatched names are
/// kept).
pub fn read_safetensors(path: &Path, map: &[(String, String)]) -> Result<Vec<(String, Tensor)>> {
    let (file, len) = crate::files::open_regular(path, crate::files::Links::Follow)?;
    // SAFETY: read-only map; see the reader.
    let mm = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let header = parse_shard_header(&mm, len, path)?;
    let mut out = Vec::new();
    for (name, e) in &header.entries {
        let dtype = DType::from_name(&e.dtype).ok_or_else(|| Error::Format {
            path: path.to_path_buf(),
            msg: format!("tensor `{name}`: unsupported dtype {}", e.dtype),
        })?;
        let [s, t] = e.data_offsets;
        let bytes = &mm[(header.data_start + s) as usize..(header.data_start + t) as usize];
        let renamed = map
            .iter()
            .find_map(|(from, to)| {
                name.strip_prefix(from.as_str())
                    .map(|rest| format!("{to}{rest}"))
            })
            .unwrap_or_else(|| name.clone());
        out.push((
            renamed,
            Tensor::from_le_bytes(bytes, dtype, e.shape.as_slice())?,
        ));
    }
    Ok(out)
}
