//! Weights from other tools: [`read_safetensors`] reads a plain safetensors file
//! (validated as strictly as a shard), and [`import_safetensors`] turns one into a
//! weights-only checkpoint (`ferrovit ckpt import`): a timm `VisionTransformer`'s
//! state dict, whose architecture it reads from the tensor shapes, or a preset's.
//!
//! ferrovit's parameter names and layouts are timm's (`patch_embed.proj` a conv
//! kernel `[dim, channels, patch, patch]`, `cls_token`, `pos_embed` `[1, 1 + patches,
//! dim]`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`,
//! `head`), so a timm state dict imports without renaming and an export
//! ([`super::export_safetensors`]) loads into timm with `strict=True`
//! ([`timm_constructor`] says with which arguments).

use super::{checkpoint_name, parse_shard_header, save, Group, TrainingState};
use crate::backend::Normalize;
use crate::engine::{Engine, TrainConfig};
use crate::error::{Error, Result};
use crate::nn::PRESETS;
use crate::tensor::{DType, Tensor};
use crate::VitConfig;
use std::path::{Path, PathBuf};

/// What `ckpt import` is told besides the file.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// The preset the weights are for: its heads, and its shapes checked.
    pub preset: Option<String>,
    /// Attention heads (`--heads`): tensor shapes never tell them.
    pub heads: Option<usize>,
    /// Classes of the head (`--num-classes`); when the file's head has another number
    /// of classes, or the file has none, the head is fresh (initialised from `seed`).
    pub num_classes: Option<usize>,
    /// `from` → `to` name-prefix renames (see [`read_safetensors`]).
    pub map: Vec<(String, String)>,
    /// Name prefixes (after `map`) of tensors left out (`--ignore`).
    pub ignore: Vec<String>,
    /// How the model's input images are normalised (recorded for `infer`/`eval`).
    pub norm: Normalize,
    /// Seed of a fresh head's initialisation.
    pub seed: u64,
}

/// What an import made.
#[derive(Clone, Debug)]
pub struct Imported {
    /// Tensors taken from the file.
    pub tensors: usize,
    /// Tensors left out by `ignore` (and a replaced head's).
    pub ignored: usize,
    pub dest: PathBuf,
    pub model: VitConfig,
    /// Whether the head is fresh (`--num-classes` differs from the file's).
    pub fresh_head: bool,
    /// The preset whose number of heads was taken, when `--heads` was not given.
    pub heads_from: Option<String>,
}

/// timm features ferrovit's ViT lacks, each recognised by a tensor it brings.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("reg_token", "register tokens (reg_tokens > 0)"),
    (".ls1.", "layer scale (init_values)"),
    (".ls2.", "layer scale (init_values)"),
    (".q_norm.", "qk_norm=True"),
    (".k_norm.", "qk_norm=True"),
    ("fc_norm.", "fc_norm (global_pool='avg')"),
    ("norm_pre.", "pre_norm=True"),
    ("attn_pool.", "global_pool='map'"),
    (".attn.norm.", "scale_attn_norm=True"),
    (".mlp.norm.", "scale_mlp_norm=True"),
];

/// Makes a weights-only checkpoint (`out_root/step-0000000000`, no optimizer state)
/// from the safetensors `file`: the model's dim, depth, MLP width, patch size, image
/// size, channels and classes from the tensor shapes, its heads from `opts` (or from a
/// preset whose shapes match). Every tensor must be a parameter of that model with its
/// shape, each used once, and every parameter must be in the file (a fresh head
/// aside): a partial import would train from a silent mix of loaded and random weights.
pub fn import_safetensors(file: &Path, out_root: &Path, opts: &ImportOptions) -> Result<Imported> {
    let format = |msg: String| Error::Format {
        path: file.to_path_buf(),
        msg,
    };
    refuse_used_root(out_root)?;
    let mut tensors = read_safetensors(file, &opts.map)?;
    for (name, t) in &tensors {
        super::check_finite(file, name, t)?;
    }
    let all = tensors.len();
    tensors.retain(|(n, _)| !opts.ignore.iter().any(|p| n.starts_with(p.as_str())));
    refuse_unsupported(&tensors).map_err(format)?;
    let shapes = Shapes::read(&tensors).map_err(format)?;
    let (model, heads_from) = architecture(&shapes, opts, file)?;
    let fresh_head = shapes.classes != Some(model.num_classes);
    if fresh_head {
        tensors.retain(|(n, _)| !n.starts_with("head."));
    }
    let train = TrainConfig {
        seed: opts.seed,
        ..TrainConfig::default()
    };
    let mut engine = Engine::new(&model, train)?;
    let count = tensors.len();
    set_every_parameter(&mut engine, tensors, fresh_head).map_err(format)?;
    let mut snap = engine.snapshot(TrainingState {
        normalize: opts.norm,
        ..Default::default()
    });
    snap.tensors.retain(|t| t.group == Group::Model);
    snap.optimizer = None;
    let dest = save(&snap, out_root, &checkpoint_name(0), &Default::default())?;
    Ok(Imported {
        tensors: count,
        ignored: all - count,
        dest,
        model,
        fresh_head,
        heads_from,
    })
}

/// Refuses to import into a root that already holds checkpoints (or a `latest`
/// pointer): the import would replace its `step-0000000000` and move `latest` to it.
fn refuse_used_root(root: &Path) -> Result<()> {
    let l = super::list(root)?;
    let taken = l.committed.first().or(l.uncommitted.first()).cloned();
    let taken = taken.or_else(|| Some(root.join("latest")).filter(|p| p.exists()));
    match taken {
        None => Ok(()),
        Some(p) => Err(Error::Config(format!(
            "{} already holds checkpoints ({}); import into a new directory",
            crate::text::path(root),
            crate::text::path(&p)
        ))),
    }
}

/// Refuses tensors of timm features ferrovit's ViT lacks, naming the tensor.
fn refuse_unsupported(tensors: &[(String, Tensor)]) -> std::result::Result<(), String> {
    for (name, _) in tensors {
        if let Some((_, feature)) = UNSUPPORTED.iter().find(|(p, _)| name.contains(p)) {
            return Err(format!(
                "`{name}` is from timm's {feature}, which ferrovit's ViT does not have"
            ));
        }
    }
    if !tensors.iter().any(|(n, _)| n == "cls_token") {
        return Err("no `cls_token`: a ViT without a class token (timm's class_token=False) is not supported".into());
    }
    Ok(())
}

/// The architecture as the tensor shapes give it (all but the heads).
#[derive(Clone, Debug, PartialEq)]
struct Shapes {
    dim: usize,
    channels: usize,
    patch: usize,
    image: usize,
    depth: usize,
    mlp: usize,
    /// The head's classes (`None`: the file has no head).
    classes: Option<usize>,
}

impl Shapes {
    fn read(tensors: &[(String, Tensor)]) -> std::result::Result<Shapes, String> {
        let dims = |name: &str, rank: usize, what: &str| -> std::result::Result<&[usize], String> {
            let (_, t) = tensors
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| format!("`{name}` is missing"))?;
            match t.dims() {
                d if d.len() == rank => Ok(d),
                d => Err(format!("`{name}` has shape {d:?}; expected {what}")),
            }
        };
        let pe = dims(
            "patch_embed.proj.weight",
            4,
            "[dim, channels, patch, patch]",
        )?;
        if pe[2] != pe[3] {
            return Err(format!(
                "`patch_embed.proj.weight` has shape {pe:?}: a {}×{} patch is not square",
                pe[2], pe[3]
            ));
        }
        let (dim, channels, patch) = (pe[0], pe[1], pe[2]);
        let pos = dims("pos_embed", 3, "[1, 1 + patches, dim]")?;
        let image = patch * grid_side(pos[1])?;
        let depth = tensors
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("blocks.")?.split('.').next()?.parse().ok())
            .map(|i: usize| i + 1)
            .max()
            .ok_or_else(|| {
                let top = ["patch_embed.", "cls_token", "pos_embed", "norm.", "head."];
                let other = tensors.iter().map(|(n, _)| n).find(|n| !top.iter().any(|p| n.starts_with(p)));
                format!(
                    "no `blocks.N.…` tensors (the file's first other name: `{}`); rename them with --map FROM=TO",
                    other.map_or("none", |n| n.as_str())
                )
            })?;
        let mlp = dims("blocks.0.mlp.fc1.weight", 2, "[mlp width, dim]")?[0];
        let classes = match tensors.iter().any(|(n, _)| n == "head.weight") {
            true => Some(dims("head.weight", 2, "[classes, dim]")?[0]),
            false => None,
        };
        Ok(Shapes {
            dim,
            channels,
            patch,
            image,
            depth,
            mlp,
            classes,
        })
    }

    fn describe(&self) -> String {
        format!(
            "dim {}, depth {}, MLP width {}, patch {}, image {}, {} channels",
            self.dim, self.depth, self.mlp, self.patch, self.image, self.channels
        )
    }

    /// Whether `c` has these shapes (classes aside: a head may be replaced).
    fn fit(&self, c: &VitConfig) -> bool {
        (
            c.dim,
            c.depth,
            c.mlp_dim,
            c.patch_size,
            c.image_size,
            c.in_channels,
        ) == (
            self.dim,
            self.depth,
            self.mlp,
            self.patch,
            self.image,
            self.channels,
        )
    }
}

/// The patch grid's side from the position embedding's length: one position per patch
/// plus the class token's.
fn grid_side(positions: usize) -> std::result::Result<usize, String> {
    let side = |n: usize| (1..=n).take_while(|s| s * s <= n).find(|s| s * s == n);
    match (positions.checked_sub(1).and_then(side), side(positions)) {
        (Some(g), _) => Ok(g),
        (None, Some(_)) => Err(format!(
            "`pos_embed` has {positions} positions, one per patch and none for the class token: timm's no_embed_class=True is not supported"
        )),
        (None, None) => Err(format!(
            "`pos_embed` has {positions} positions, not 1 + a square patch grid"
        )),
    }
}

/// The model to import into, and the preset its heads came from (when not given).
fn architecture(
    s: &Shapes,
    opts: &ImportOptions,
    file: &Path,
) -> Result<(VitConfig, Option<String>)> {
    let (heads, heads_from) = heads(s, opts, file)?;
    let num_classes = match (opts.num_classes, s.classes) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => {
            return Err(Error::Config(
                "--num-classes is required: the file has no `head.weight`".into(),
            ))
        }
    };
    let model = VitConfig {
        image_size: s.image,
        patch_size: s.patch,
        in_channels: s.channels,
        num_classes,
        dim: s.dim,
        depth: s.depth,
        heads,
        mlp_dim: s.mlp,
        ..VitConfig::preset(PRESETS[0])?
    };
    model.validate()?;
    Ok((model, heads_from))
}

/// The number of attention heads: `--heads`, else the preset's (`--preset`, or the
/// preset whose shapes match); and the preset it came from when `--heads` was not given.
fn heads(s: &Shapes, opts: &ImportOptions, file: &Path) -> Result<(usize, Option<String>)> {
    let (heads, from) = match (&opts.preset, opts.heads) {
        (Some(p), heads) => {
            let preset = VitConfig::preset(p)?;
            if !s.fit(&preset) {
                return Err(Error::Format {
                    path: file.to_path_buf(),
                    msg: format!(
                        "the tensors' shapes ({}) are not preset {p}'s (dim {}, depth {}, MLP width {}, patch {}, image {})",
                        s.describe(), preset.dim, preset.depth, preset.mlp_dim, preset.patch_size, preset.image_size
                    ),
                });
            }
            (
                heads.unwrap_or(preset.heads),
                heads.is_none().then(|| p.clone()),
            )
        }
        (None, Some(h)) => (h, None),
        (None, None) => {
            let found = PRESETS
                .iter()
                .find(|p| VitConfig::preset(p).is_ok_and(|c| s.fit(&c)));
            let Some(p) = found else {
                return Err(Error::Config(format!(
                    "--heads is required: the tensors' shapes ({}) match no preset, and shapes never tell the number of attention heads",
                    s.describe()
                )));
            };
            (VitConfig::preset(p)?.heads, Some(p.to_string()))
        }
    };
    if heads == 0 || !s.dim.is_multiple_of(heads) {
        return Err(Error::Config(format!(
            "--heads {heads} does not divide the model's dim {}",
            s.dim
        )));
    }
    Ok((heads, from))
}

/// Replaces the engine's parameters by `tensors` after checking them all (nothing is
/// changed otherwise): each names a parameter, once, with its shape, and every
/// parameter is given (the head's aside when `fresh_head`).
fn set_every_parameter(
    engine: &mut Engine,
    tensors: Vec<(String, Tensor)>,
    fresh_head: bool,
) -> std::result::Result<(), String> {
    let params = engine.params_mut();
    let unknown: Vec<&str> = tensors
        .iter()
        .filter(|(n, _)| params.id(n).is_err())
        .map(|(n, _)| n.as_str())
        .collect();
    if let Some(first) = unknown.first() {
        return Err(format!(
            "{} tensors match no parameter of the model (first: `{first}`); rename them with --map FROM=TO or leave them out with --ignore PREFIX",
            unknown.len()
        ));
    }
    let mut given = std::collections::BTreeSet::new();
    for (n, t) in &tensors {
        if !given.insert(n.as_str()) {
            return Err(format!("two tensors are named `{n}` (after --map)"));
        }
        let want = params
            .get(params.id(n).map_err(|e| e.to_string())?)
            .value
            .dims();
        if t.dims() != want {
            return Err(format!(
                "`{n}` has shape {:?}; the model its other tensors describe needs {want:?}",
                t.dims()
            ));
        }
    }
    let missing: Vec<&str> = params
        .iter()
        .map(|p| p.name.as_str())
        .filter(|n| !(given.contains(n) || fresh_head && n.starts_with("head.")))
        .collect();
    if let Some(first) = missing.first() {
        let hint = match first.ends_with("qkv.bias") {
            true => " (timm's qkv_bias=False is not supported)",
            false => "",
        };
        return Err(format!(
            "`{first}` is missing{hint} ({} parameters of the model are not in the file)",
            missing.len()
        ));
    }
    for (n, t) in tensors {
        params.set(&n, t).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The timm call that builds `cfg`'s model, whose `load_state_dict(…, strict=True)`
/// takes an export of it: `VisionTransformer(img_size=…, …)`. `None` when timm cannot
/// build it: an MLP width that `int(dim * mlp_ratio)` does not give back.
pub fn timm_constructor(cfg: &VitConfig) -> Option<String> {
    let ratio = cfg.mlp_dim as f64 / cfg.dim as f64;
    if (cfg.dim as f64 * ratio) as usize != cfg.mlp_dim {
        return None;
    }
    let eps = match cfg.layernorm_eps {
        1e-6 => String::new(),
        e => format!(", norm_layer=functools.partial(torch.nn.LayerNorm, eps={e:?})"),
    };
    Some(format!(
        "timm.models.vision_transformer.VisionTransformer(img_size={}, patch_size={}, in_chans={}, embed_dim={}, depth={}, num_heads={}, mlp_ratio={ratio:?}, num_classes={}{eps})",
        cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.dim, cfg.depth, cfg.heads, cfg.num_classes
    ))
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
