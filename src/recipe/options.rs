//! The options of `ferrovit train`, defined once: [`TrainOptions`] is at the same time
//! the command line's flags (clap), the `--config` file's keys (TOML, `_` for `-`),
//! the resolved `config.toml` a run writes, and the run's input. Defaults come from
//! `Default`; a config file overrides them and flags given on the command line
//! override the file ([`TrainOptions::merged`]). Choices are enums, parsed once.

use crate::autograd::Precision;
use crate::backend::cpu;
use crate::backend::DeviceSpec;
use crate::data::mixup::Mixup;
use crate::data::{Augment, Normalize};
use crate::error::{Error, Result};
use crate::tensor::Device;
use crate::trainer::LogInterval;
use crate::VitConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every setting of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// Model preset (see `ferrovit presets`); --dim/--depth/--heads/--mlp-dim/--patch-size override its values
    #[arg(long)]
    pub preset: Option<String>,
    /// Embedding width [default: 128 without a preset]
    #[arg(long)]
    pub dim: Option<usize>,
    /// Transformer blocks [default: 4 without a preset]
    #[arg(long)]
    pub depth: Option<usize>,
    /// Attention heads, must divide --dim [default: 4 without a preset]
    #[arg(long)]
    pub heads: Option<usize>,
    /// MLP hidden width [default: 256 without a preset]
    #[arg(long)]
    pub mlp_dim: Option<usize>,
    /// Patch side in pixels, must divide --image-size [default: 4]
    #[arg(long)]
    pub patch_size: Option<usize>,
    /// Image side in pixels the model takes, a multiple of --patch-size, at most 1024:
    /// image folders are resized to it (shorter side, then the centre cropped), CIFAR-10
    /// binary data resized from 32 (bilinear), the crop padding scaled from 4 at 32
    /// [default: 32]
    #[arg(long, value_name = "S")]
    pub image_size: Option<usize>,
    /// Per-channel mean the images are normalised with, `(x - mean) / std` on pixels in
    /// [0, 1] (CIFAR-10's by default); recorded in the checkpoint for infer/eval
    #[arg(long, value_name = "R,G,B", default_value_t = defaults().mean)]
    pub mean: Channels,
    /// Per-channel std the images are normalised with, each > 0 (CIFAR-10's by default)
    #[arg(long, value_name = "R,G,B", default_value_t = defaults().std)]
    pub std: Channels,
    /// Dropout probability
    #[arg(long, default_value_t = defaults().dropout)]
    pub dropout: f32,
    /// Stochastic depth (timm's drop_path_rate), in [0, 1): block i of D drops each
    /// residual branch per sample with probability P · i / (D − 1) in training
    #[arg(long, value_name = "P", default_value_t = defaults().drop_path)]
    pub drop_path: f32,
    /// Keep an exponential moving average of the weights (timm's ModelEmaV3): after each
    /// optimizer step ema = D · ema + (1 − D) · weights (the first step copies them), D
    /// in [0, 1); tested beside the raw weights each test epoch (ema_test_loss,
    /// ema_test_acc), saved in checkpoints (eval/infer/ckpt export --weights ema)
    #[arg(long, value_name = "D")]
    pub ema_decay: Option<f32>,
    /// With --ema-decay: timm's warm-up, the decay at update t being
    /// min(D, 1 − (1 + t)^(−2/3)) (ModelEmaV3 use_warmup=True)
    #[arg(long)]
    pub ema_warmup: bool,
    /// Data directory: CIFAR-10 binary files or an image folder (train/<class>/*.png,
    /// test/<class>/…) [default: the embedded digits data]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Passes over the training set
    #[arg(long, default_value_t = defaults().epochs)]
    pub epochs: usize,
    /// Images per step (the global batch under data parallelism)
    #[arg(long, default_value_t = defaults().batch_size)]
    pub batch_size: usize,
    /// Peak learning rate of AdamW
    #[arg(long, default_value_t = defaults().lr)]
    pub lr: f32,
    /// Linear warm-up in epochs (fractions allowed) from --warmup-lr, then cosine decay
    /// to --min-lr, per optimizer step: timm's CosineLRScheduler (t_in_epochs=False)
    #[arg(long, default_value_t = defaults().warmup)]
    pub warmup: f32,
    /// The rate the linear warm-up starts from (timm's warmup_lr_init)
    #[arg(long, value_name = "LR", default_value_t = defaults().warmup_lr)]
    pub warmup_lr: f32,
    /// The rate the cosine decay ends at (timm's lr_min)
    #[arg(long, value_name = "LR", default_value_t = defaults().min_lr)]
    pub min_lr: f32,
    /// Clip the gradients to this global L2 norm before each update (as
    /// torch.nn.utils.clip_grad_norm_; over the whole model under dp × pp); logs the
    /// norm before clipping as grad_norm (epoch mean) [default: no clipping]
    #[arg(long, value_name = "NORM")]
    pub clip_grad: Option<f32>,
    /// Gradient accumulation: one optimizer step per N micro-batches of --batch-size
    /// (the effective batch, and an epoch's step, is N × --batch-size images; the LR
    /// schedule counts optimizer steps)
    #[arg(long, value_name = "N", default_value_t = defaults().accum_steps)]
    pub accum_steps: usize,
    /// AdamW decoupled weight decay
    #[arg(long, default_value_t = defaults().weight_decay)]
    pub weight_decay: f32,
    /// Label smoothing of the training loss, in [0, 1]
    #[arg(long, default_value_t = defaults().label_smoothing)]
    pub label_smoothing: f32,
    /// Mixup (timm's mixup_alpha): blend each training batch with the batch reversed,
    /// lambda ~ Beta(ALPHA, ALPHA); targets mixed alike, label smoothing folded in, and
    /// train accuracy counts the label with the larger share. Done on the CPU loader
    /// after augmentation and normalisation (with --device cuda too: mixing turns the
    /// device's own augmentation off); 0 turns it off
    #[arg(long, value_name = "ALPHA", default_value_t = defaults().mixup)]
    pub mixup: f64,
    /// CutMix (timm's cutmix_alpha): paste a box of side sqrt(1 - lambda) of the image,
    /// lambda ~ Beta(ALPHA, ALPHA), from the batch reversed; lambda corrected to the
    /// clipped box's area; 0 turns it off
    #[arg(long, value_name = "ALPHA", default_value_t = defaults().cutmix)]
    pub cutmix: f64,
    /// Probability that a batch is mixed at all (timm's mixup prob)
    #[arg(long, value_name = "P", default_value_t = defaults().mixup_prob)]
    pub mixup_prob: f64,
    /// With both --mixup and --cutmix: probability of CutMix rather than Mixup for a
    /// batch (timm's switch_prob)
    #[arg(long, value_name = "P", default_value_t = defaults().mixup_switch_prob)]
    pub mixup_switch_prob: f64,
    /// Training augmentation, a comma-separated list of: crop (random crop of the image
    /// zero-padded by 4 at 32 pixels, scaled with --image-size), flip (random horizontal flip), autoaugment (the CIFAR-10
    /// AutoAugment policy); or none. Digits are not mirror-symmetric, hence no flip by
    /// default
    #[arg(long, default_value_t = defaults().augment)]
    pub augment: Augment,
    /// Seed of initialisation, data order, augmentation and dropout
    #[arg(long, default_value_t = defaults().seed)]
    pub seed: u64,
    /// CPU compute threads [default: one per core]
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data-loader worker threads
    #[arg(long, default_value_t = defaults().workers)]
    pub workers: usize,
    /// Test every N epochs and after the last
    #[arg(long, value_name = "N", default_value_t = defaults().test_interval)]
    pub test_interval: usize,
    /// When stderr is not a terminal (a pipe, a file, Slurm, CI), log a progress line
    /// (step, epoch, loss, accuracy, lr, images/s, ETA) every N optimizer steps (`50`) or
    /// every S seconds (`30s`); on a terminal the progress bar shows instead. Also how
    /// often --tensorboard records the running train loss and lr
    #[arg(long, value_name = "N|Ss", default_value_t = defaults().log_interval)]
    pub log_interval: LogInterval,
    /// Write TensorBoard event files (train/test loss and accuracy, lr, images/s by
    /// step) under <out>/tensorboard: `tensorboard --logdir <out>/tensorboard`
    #[arg(long)]
    pub tensorboard: bool,
    /// Output directory: metrics.jsonl (per-epoch metrics), metrics.png (curves),
    /// config.toml (the resolved options), checkpoints/
    #[arg(long, default_value_os_t = defaults().out)]
    pub out: PathBuf,
    /// Save a checkpoint every N epochs and after the last; 0: only after the last
    #[arg(long, value_name = "N", default_value_t = defaults().save_every)]
    pub save_every: usize,
    /// Also save a checkpoint every N optimizer steps
    #[arg(long, value_name = "N")]
    pub save_every_steps: Option<u64>,
    /// Keep the newest N checkpoints; 0 keeps all
    #[arg(long, value_name = "N", default_value_t = defaults().keep_last)]
    pub keep_last: usize,
    /// Also keep the epoch-end checkpoint with the best METRIC so far (test_acc: highest,
    /// test_loss: lowest), named by <out>/checkpoints/best
    #[arg(long, value_enum, value_name = "METRIC")]
    pub keep_best: Option<KeepBest>,
    /// Save no checkpoints
    #[arg(long)]
    pub no_save: bool,
    /// Largest checkpoint shard file in MiB
    #[arg(long, value_name = "MIB", default_value_t = defaults().shard_size_mb)]
    pub shard_size_mb: u64,
    /// Continue a run: `auto` (the newest committed checkpoint under <out>/checkpoints;
    /// a fresh start if there is none) or a checkpoint directory. The run's options come
    /// from the checkpoint: give only those to change (--epochs to extend, the layout,
    /// --device, --threads, --data, saving); model, optimizer, augmentation and seed
    /// flags must match it
    #[arg(long, value_name = "auto|DIR")]
    pub resume: Option<Resume>,
    /// Start from a checkpoint's weights, non-strictly (e.g. a new classifier head),
    /// with a fresh optimizer (with --resume auto: only when there is nothing to resume)
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Start afresh in an --out that holds a run (or resume another run's checkpoint
    /// there): move that run (checkpoints, metrics, config.toml, everything but the
    /// lock) aside to <out>.old-<unix time>
    #[arg(long)]
    pub overwrite: bool,
    /// Data-parallel replicas; each computes a share of every global batch (--batch-size
    /// is the global batch); under a launcher, 1 means WORLD_SIZE / --pp
    #[arg(long, value_name = "N", default_value_t = defaults().dp)]
    pub dp: usize,
    /// Pipeline stages; the blocks are split across them (embedding on the first, head
    /// on the last)
    #[arg(long, value_name = "N", default_value_t = defaults().pp)]
    pub pp: usize,
    /// Micro-batches per step in the pipeline (1F1B schedule) [default: 2 × pp]
    #[arg(long, value_name = "N")]
    pub microbatches: Option<usize>,
    /// First block of pipeline stages 1.., e.g. `--stages 3,5` for three stages [default:
    /// an even split]
    #[arg(long, value_name = "B,B,…", value_delimiter = ',')]
    pub stages: Option<Vec<usize>>,
    /// Gradient all-reduce bucket in MiB
    #[arg(long, value_name = "MIB", default_value_t = defaults().bucket_mb)]
    pub bucket_mb: f32,
    /// Seconds a rank waits for another before failing
    #[arg(long, value_name = "S", default_value_t = defaults().comm_timeout)]
    pub comm_timeout: u64,
    /// How replicas combine gradients: nccl (on the GPUs; one GPU per rank), host
    /// (through host memory), or auto (nccl when every rank has a GPU of its own and
    /// NCCL loads)
    #[arg(long, value_enum, default_value_t = defaults().comm)]
    pub comm: Comm,
    /// Where to compute: cpu, cuda (GPU 0; a GPU per rank under a launcher), cuda:N, or
    /// cuda-emu (the CUDA kernels emulated on the CPU: slow, for testing)
    #[arg(long, value_name = "DEVICE", default_value_t = defaults().device)]
    pub device: DeviceSpec,
    /// The linear layers' arithmetic: f32, bf16 (mixed precision: bf16 GEMM operands,
    /// f32 accumulation, parameters and optimizer state), or auto (bf16 on a CUDA
    /// device; on the CPU f32 unless its bf16 products are timed faster)
    #[arg(long, value_enum, default_value_t = defaults().precision)]
    pub precision: PrecisionChoice,
}

/// The default model when neither a preset nor dimensions are given: small enough to
/// reach 95% on the digits data in about a minute on two cores.
pub const DEFAULT_MODEL: (usize, usize, usize, usize) = (128, 4, 4, 256);

/// The defaults, for the flags' `[default: …]` (one source: `Default`).
fn defaults() -> TrainOptions {
    TrainOptions::default()
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            preset: None,
            dim: None,
            depth: None,
            heads: None,
            mlp_dim: None,
            patch_size: None,
            image_size: None,
            mean: Channels(Normalize::CIFAR10.mean),
            std: Channels(Normalize::CIFAR10.std),
            dropout: 0.1,
            drop_path: 0.0,
            ema_decay: None,
            ema_warmup: false,
            data: None,
            epochs: 20,
            batch_size: 64,
            lr: 2e-3,
            warmup: 1.0,
            warmup_lr: 0.0,
            min_lr: 0.0,
            clip_grad: None,
            accum_steps: 1,
            weight_decay: 0.05,
            label_smoothing: 0.0,
            mixup: 0.0,
            cutmix: 0.0,
            mixup_prob: 1.0,
            mixup_switch_prob: 0.5,
            augment: Augment::default(),
            seed: 0,
            threads: None,
            workers: 2,
            test_interval: 1,
            log_interval: LogInterval::default(),
            tensorboard: false,
            out: PathBuf::from("out"),
            save_every: 1,
            save_every_steps: None,
            keep_last: 3,
            keep_best: None,
            no_save: false,
            shard_size_mb: 2048,
            resume: None,
            init: None,
            overwrite: false,
            dp: 1,
            pp: 1,
            microbatches: None,
            stages: None,
            bucket_mb: 25.0,
            comm_timeout: 300,
            comm: Comm::Auto,
            device: DeviceSpec::Cpu,
            precision: PrecisionChoice::Auto,
        }
    }
}

/// `--mean`/`--std`: one value per channel (R, G, B), written `R,G,B` on the command
/// line and as an array of three numbers in config files.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<f32>", into = "Vec<f32>")]
pub struct Channels(pub [f32; 3]);

impl TryFrom<Vec<f32>> for Channels {
    type Error = Error;
    fn try_from(v: Vec<f32>) -> Result<Channels> {
        match <[f32; 3]>::try_from(v.as_slice()) {
            Ok(c) if c.iter().all(|x| x.is_finite()) => Ok(Channels(c)),
            Ok(_) => Err(Error::Config(format!(
                "{v:?}: every value must be a finite number"
            ))),
            Err(_) => Err(Error::Config(format!(
                "{v:?}: expected 3 values (R, G, B), got {}",
                v.len()
            ))),
        }
    }
}

impl From<Channels> for Vec<f32> {
    fn from(c: Channels) -> Vec<f32> {
        c.0.to_vec()
    }
}

impl std::str::FromStr for Channels {
    type Err = Error;
    fn from_str(s: &str) -> Result<Channels> {
        let values = s
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<Vec<f32>, _>>()
            .map_err(|e| Error::Config(format!("`{s}`: {e} (expected R,G,B numbers)")))?;
        Channels::try_from(values)
            .map_err(|_| Error::Config(format!("`{s}`: expected 3 finite numbers R,G,B")))
    }
}

impl std::fmt::Display for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [r, g, b] = self.0;
        write!(f, "{r},{g},{b}")
    }
}

/// `--comm`: how data-parallel replicas combine their gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Comm {
    /// NCCL when every rank trains on a GPU of its own and NCCL loads; host otherwise.
    Auto,
    /// NCCL on the GPUs (an error when a rank cannot).
    Nccl,
    /// Through host memory, over the process group.
    Host,
}

/// `--precision`: the linear layers' arithmetic, or `auto` to let the device decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// bf16 on a CUDA device; f32 on the CPU unless its bf16 products are faster
    /// (AVX512-BF16 timed faster than f32: `cpu::bf16gemm::bf16_pays`).
    Auto,
    F32,
    Bf16,
}

impl PrecisionChoice {
    /// The precision this choice means on `device`.
    pub fn resolve(self, device: Device) -> Precision {
        match self {
            PrecisionChoice::Auto if device == Device::Cpu && !cpu::bf16gemm::bf16_pays() => {
                Precision::F32
            }
            PrecisionChoice::Auto | PrecisionChoice::Bf16 => Precision::Bf16,
            PrecisionChoice::F32 => Precision::F32,
        }
    }
}

/// The names flags and config files use (`auto`, `nccl`, `f32`, …), for library callers.
macro_rules! from_value_name {
    ($t:ty) => {
        impl std::str::FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<$t> {
                <$t as clap::ValueEnum>::from_str(s, false).map_err(Error::Config)
            }
        }
    };
}
from_value_name!(Comm);
from_value_name!(PrecisionChoice);
from_value_name!(KeepBest);

/// `--keep-best`: the test metric that picks the best checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum KeepBest {
    /// Test accuracy (higher is better).
    #[serde(rename = "test_acc")]
    #[value(name = "test_acc")]
    TestAcc,
    /// Test loss (lower is better).
    #[serde(rename = "test_loss")]
    #[value(name = "test_loss")]
    TestLoss,
    /// The EMA weights' test accuracy (with `--ema-decay`).
    #[serde(rename = "ema_test_acc")]
    #[value(name = "ema_test_acc")]
    EmaTestAcc,
    /// The EMA weights' test loss (with `--ema-decay`).
    #[serde(rename = "ema_test_loss")]
    #[value(name = "ema_test_loss")]
    EmaTestLoss,
}

impl KeepBest {
    /// The retention rule: the metric's name and whether higher is better.
    pub fn rule(self) -> crate::checkpoint::BestBy {
        match self {
            KeepBest::TestAcc => crate::checkpoint::BestBy::max("test_acc"),
            KeepBest::TestLoss => crate::checkpoint::BestBy::min("test_loss"),
            KeepBest::EmaTestAcc => crate::checkpoint::BestBy::max("ema_test_acc"),
            KeepBest::EmaTestLoss => crate::checkpoint::BestBy::min("ema_test_loss"),
        }
    }
}

/// `--resume`: the newest committed checkpoint of the run's output directory, or a
/// checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Resume {
    Auto,
    Dir(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = Error;
    fn from_str(s: &str) -> Result<Resume> {
        match s {
            "auto" => Ok(Resume::Auto),
            "" => Err(Error::Config(
                "resume: give `auto` or a checkpoint directory".into(),
            )),
            dir => Ok(Resume::Dir(PathBuf::from(dir))),
        }
    }
}

impl TryFrom<String> for Resume {
    type Error = Error;
    fn try_from(s: String) -> Result<Resume> {
        s.parse()
    }
}

impl From<Resume> for String {
    fn from(r: Resume) -> String {
        r.to_string()
    }
}

impl std::fmt::Display for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resume::Auto => f.write_str("auto"),
            Resume::Dir(d) => write!(f, "{}", d.display()),
        }
    }
}

pub(super) fn invalid(field: &str, value: impl std::fmt::Display, why: &str) -> Error {
    Error::Config(format!("{field} = {value}: {why}"))
}

/// Largest checkpoint shard, in MiB (1 TiB): MiB are turned into bytes by `<< 20`.
pub const MAX_SHARD_SIZE_MB: u64 = 1 << 20;
/// Largest gradient all-reduce bucket, in MiB: a bucket is allocated whole.
pub const MAX_BUCKET_MB: f32 = 4096.0;
/// Longest communication timeout, in seconds (a day): deadlines are `Instant`s.
pub const MAX_COMM_TIMEOUT_S: u64 = 24 * 60 * 60;
/// Most data-loader workers (one thread each).
pub const MAX_WORKERS: usize = 256;
/// Most micro-batches per step.
pub const MAX_MICROBATCHES: usize = 1 << 16;
/// Most ranks (`dp × pp`).
pub const MAX_WORLD: usize = crate::dist::MAX_WORLD;

/// Refuses an image size the model cannot take (`--image-size`): it must be a multiple
/// of the patch size and at most the data's largest side.
fn check_image_size(size: usize, patch: usize) -> Result<()> {
    let max = crate::data::MAX_IMAGE_SIDE;
    let why = if size == 0 || patch == 0 || !size.is_multiple_of(patch) {
        format!("must be a positive multiple of the patch size {patch}")
    } else if size > max {
        format!("must be at most {max}")
    } else {
        return Ok(());
    };
    Err(Error::Config(format!("--image-size {size}: {why}")))
}

/// Checks `value` of `field` is in `1..=max`.
fn check_count<T: PartialOrd + From<u8> + std::fmt::Display>(
    field: &str,
    value: T,
    max: T,
) -> Result<()> {
    if value < T::from(1) {
        return Err(invalid(field, value, "must be at least 1"));
    }
    if value > max {
        let why = format!("must be at most {max}");
        return Err(invalid(field, value, &why));
    }
    Ok(())
}

/// Refuses integers TOML cannot hold (over `i64::MAX`), naming the field: the options
/// pass through a TOML table, whose error would not say which one.
fn check_toml_integers(overrides: &impl Serialize) -> Result<()> {
    let value =
        serde_json::to_value(overrides).map_err(|e| Error::Config(format!("options: {e}")))?;
    let fields = value.as_object().into_iter().flatten();
    for (field, v) in fields {
        let values = v.as_array().map_or(std::slice::from_ref(v), Vec::as_slice);
        if let Some(n) = values.iter().find(|v| v.is_u64() && v.as_i64().is_none()) {
            return Err(invalid(field, n, &format!("must be at most {}", i64::MAX)));
        }
    }
    Ok(())
}

impl TrainOptions {
    /// Reads options from a TOML file (missing keys keep their defaults; unknown keys
    /// are an error naming them).
    pub fn from_toml_file(path: &Path) -> Result<TrainOptions> {
        Ok(Self::from_toml_file_keys(path)?.0)
    }

    /// `base` (a config file's options, or the defaults) with the options named in
    /// `given` (those set on the command line) taken from `flags`: how flags override
    /// a config file.
    pub fn merged(
        base: &TrainOptions,
        flags: &TrainOptions,
        given: &[String],
    ) -> Result<TrainOptions> {
        let err = |e: &dyn std::fmt::Display| Error::Config(format!("options: {e}"));
        check_toml_integers(flags)?;
        let mut overrides = toml::Table::try_from(flags).map_err(|e| err(&e))?;
        overrides.retain(|k, _| given.iter().any(|g| g == k));
        let mut table = toml::Table::try_from(base).map_err(|e| err(&e))?;
        table.extend(overrides);
        toml::Value::Table(table).try_into().map_err(|e| err(&e))
    }

    /// The model configuration these options describe.
    pub fn model(&self, num_classes: usize) -> Result<VitConfig> {
        let (dim, depth, heads, mlp_dim) = DEFAULT_MODEL;
        let mut cfg = match &self.preset {
            Some(p) => VitConfig::preset(p)?,
            None => VitConfig {
                dim,
                depth,
                heads,
                mlp_dim,
                ..VitConfig::preset(crate::nn::PRESETS[0])?
            },
        };
        cfg.dim = self.dim.unwrap_or(cfg.dim);
        cfg.depth = self.depth.unwrap_or(cfg.depth);
        cfg.heads = self.heads.unwrap_or(cfg.heads);
        cfg.mlp_dim = self.mlp_dim.unwrap_or(cfg.mlp_dim);
        cfg.patch_size = self.patch_size.unwrap_or(cfg.patch_size);
        cfg.image_size = self.image_size.unwrap_or(cfg.image_size);
        check_image_size(cfg.image_size, cfg.patch_size)?;
        cfg.num_classes = num_classes;
        cfg.dropout = self.dropout;
        cfg.drop_path = self.drop_path;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every option, the model's through `VitConfig::validate`.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(invalid("epochs", 0, "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(invalid("batch_size", 0, "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid("lr", self.lr, "must be a positive number"));
        }
        if !(self.warmup.is_finite() && self.warmup >= 0.0) {
            return Err(invalid("warmup", self.warmup, "must be >= 0 epochs"));
        }
        if self.warmup as f64 > self.epochs as f64 {
            return Err(invalid(
                "warmup",
                self.warmup,
                &format!("longer than the run's {} epochs", self.epochs),
            ));
        }
        self.validate_schedule()?;
        if let Some(d) = self.ema_decay.filter(|d| !(0.0..1.0).contains(d)) {
            return Err(invalid("ema_decay", d, "must be in [0, 1)"));
        }
        if self.ema_warmup && self.ema_decay.is_none() {
            return Err(invalid("ema_warmup", true, "needs --ema-decay"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid("weight_decay", self.weight_decay, "must be >= 0"));
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return Err(invalid(
                "label_smoothing",
                self.label_smoothing,
                "must be in [0, 1]",
            ));
        }
        self.mixup()?;
        // the model's own check, before any data is read (the class count comes later)
        self.model(1)?;
        self.norm()?;
        if let Some(n) = self.threads {
            check_count("threads", n, cpu::max_threads())?;
        }
        check_count("workers", self.workers, MAX_WORKERS)?;
        check_count("shard_size_mb", self.shard_size_mb, MAX_SHARD_SIZE_MB)?;
        if let Some(n) = self.save_every_steps {
            // 0 would silently save never; leaving the flag out says that
            check_count("save_every_steps", n, u64::MAX)?;
        }
        if matches!(self.resume, Some(Resume::Dir(_))) && self.init.is_some() {
            return Err(Error::Config(
                "resume DIR and init exclude each other (resume continues a run; init starts a new one from weights)".into(),
            ));
        }
        if self.resume == Some(Resume::Auto) && self.overwrite {
            return Err(Error::Config(
                "resume auto and overwrite exclude each other (resume auto continues the run in --out; overwrite moves it aside to start afresh)".into(),
            ));
        }
        if self.test_interval == 0 {
            return Err(invalid("test_interval", 0, "must be at least 1"));
        }
        if self.dp == 0 || self.pp == 0 {
            return Err(invalid(
                "dp/pp",
                format!("{}/{}", self.dp, self.pp),
                "must be at least 1",
            ));
        }
        if self.dp.checked_mul(self.pp).is_none_or(|w| w > MAX_WORLD) {
            return Err(invalid(
                "dp/pp",
                format!("{}/{}", self.dp, self.pp),
                &format!("dp × pp must be at most {MAX_WORLD} ranks"),
            ));
        }
        if let Some(m) = self.microbatches {
            check_count("microbatches", m, MAX_MICROBATCHES)?;
        }
        self.validate_accumulation()?;
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0 && self.bucket_mb <= MAX_BUCKET_MB)
        {
            return Err(invalid(
                "bucket_mb",
                self.bucket_mb,
                &format!("must be a number in (0, {MAX_BUCKET_MB}] MiB"),
            ));
        }
        check_count("comm_timeout", self.comm_timeout, MAX_COMM_TIMEOUT_S)?;
        Ok(())
    }

    /// Mixup/CutMix of the training batches (`None` when off), checked: alphas finite
    /// and >= 0, probabilities in [0, 1].
    pub fn mixup(&self) -> Result<Option<Mixup>> {
        for (field, v) in [("mixup", self.mixup), ("cutmix", self.cutmix)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(field, v, "must be a number >= 0"));
            }
        }
        let probs = [
            ("mixup_prob", self.mixup_prob),
            ("mixup_switch_prob", self.mixup_switch_prob),
        ];
        for (field, v) in probs {
            if !(0.0..=1.0).contains(&v) {
                return Err(invalid(field, v, "must be in [0, 1]"));
            }
        }
        let m = Mixup {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
        };
        Ok(m.enabled().then_some(m))
    }

    /// The images' normalisation (`--mean`, `--std`), checked.
    pub fn norm(&self) -> Result<Normalize> {
        let norm = Normalize {
            mean: self.mean.0,
            std: self.std.0,
        };
        norm.check().map_err(|why| {
            let (flag, value) = match norm.std.iter().all(|s| s.is_finite() && *s > 0.0) {
                true => ("--mean", self.mean),
                false => ("--std", self.std),
            };
            Error::Config(format!("{flag} {value}: {why}"))
        })?;
        Ok(norm)
    }

    /// The rates of the schedule (`warmup_lr`, `min_lr`), clipping and accumulation.
    fn validate_schedule(&self) -> Result<()> {
        for (field, v) in [("warmup_lr", self.warmup_lr), ("min_lr", self.min_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(field, v, "must be a number >= 0"));
            }
            if v > self.lr {
                let why = format!("must be at most --lr {}", self.lr);
                return Err(invalid(field, v, &why));
            }
        }
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                return Err(invalid("clip_grad", c, "must be a positive number"));
            }
        }
        check_count("accum_steps", self.accum_steps, MAX_MICROBATCHES)
    }

    /// Accumulation's micro-batches (after `microbatches`' own check).
    fn validate_accumulation(&self) -> Result<()> {
        if self.micro_steps() > MAX_MICROBATCHES
            || self.batch_size.checked_mul(self.accum_steps).is_none()
        {
            let why = format!(
                "× {} micro-batches (or × --batch-size {}) is too many: at most {MAX_MICROBATCHES} micro-batches per step",
                self.microbatches(),
                self.batch_size
            );
            return Err(invalid("accum_steps", self.accum_steps, &why));
        }
        Ok(())
    }

    /// Micro-batches per step.
    pub fn microbatches(&self) -> usize {
        self.microbatches
            .unwrap_or(if self.pp > 1 { 2 * self.pp } else { 1 })
    }

    /// Micro-batches per optimizer step, accumulation included: each of the
    /// `--accum-steps` batches of `--batch-size` cut into `microbatches()`.
    pub fn micro_steps(&self) -> usize {
        self.microbatches() * self.accum_steps
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data
            .clone()
            .unwrap_or_else(crate::data::default_data_dir)
    }

    /// Where the checkpoints go: `out/checkpoints`.
    pub fn checkpoint_root(&self) -> PathBuf {
        self.out.join("checkpoints")
    }

    /// The per-epoch metrics, one JSON object a line: `out/metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    /// TensorBoard's event files: `out/tensorboard`.
    pub fn tensorboard_dir(&self) -> PathBuf {
        self.out.join("tensorboard")
    }

    /// The metrics' plot: `out/metrics.png`.
    pub fn plot_path(&self) -> PathBuf {
        self.out.join("metrics.png")
    }
}

/// The options a resume keeps: they define the model, the optimisation and the data
/// stream, so the checkpoint's values hold and a different one given is refused.
/// Everything else (epochs to extend, the layout, device, threads, workers, data path,
/// output and saving options, …) may change on a resume.
pub const MUST_MATCH: [&str; 28] = [
    "preset",
    "dim",
    "depth",
    "heads",
    "mlp_dim",
    "patch_size",
    "dropout",
    "batch_size",
    "lr",
    "warmup",
    "weight_decay",
    "label_smoothing",
    "augment",
    "seed",
    "image_size",
    "mean",
    "std",
    "warmup_lr",
    "min_lr",
    "clip_grad",
    "accum_steps",
    "mixup",
    "cutmix",
    "mixup_prob",
    "mixup_switch_prob",
    "drop_path",
    "ema_decay",
    "ema_warmup",
];

/// Largest `--config` file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl TrainOptions {
    /// Reads options from a TOML file, with the keys it sets (as [`from_toml_file`]).
    ///
    /// [`from_toml_file`]: TrainOptions::from_toml_file
    pub fn from_toml_file_keys(path: &Path) -> Result<(TrainOptions, Vec<String>)> {
        let bytes = crate::files::read_regular_file(path, MAX_CONFIG_BYTES)?;
        let bad = |msg: String| Error::Format {
            path: path.to_path_buf(),
            msg,
        };
        let text = String::from_utf8(bytes).map_err(|e| bad(e.to_string()))?;
        // parsed as options first: its errors point at the line
        let opts = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        Ok((opts, table.keys().cloned().collect()))
    }

    /// The options as a JSON object: option name → value (null when unset). Through
    /// the text, so an `f32` reads as written (0.002, not 0.0020000000949949026).
    pub fn to_json(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let err = |e: serde_json::Error| Error::Config(format!("options: {e}"));
        serde_json::from_str(&serde_json::to_string(self).map_err(err)?).map_err(err)
    }

    /// Options from such an object; a name that is not an option is an error.
    pub fn from_json(
        map: &serde_json::Map<String, serde_json::Value>,
    ) -> std::result::Result<TrainOptions, String> {
        serde_json::from_value(serde_json::Value::Object(map.clone())).map_err(|e| e.to_string())
    }

    /// The names of the options whose values differ from the defaults: what a library
    /// caller of `recipe::train` is taken to have given.
    pub fn differing_from_default(&self) -> Result<Vec<String>> {
        let default = TrainOptions::default().to_json()?;
        let mine = self.to_json()?;
        Ok(mine
            .into_iter()
            .filter(|(k, v)| default.get(k) != Some(v))
            .map(|(k, _)| k)
            .collect())
    }

    /// These options with the model's dimensions filled in from `cfg` (the model they
    /// describe: the preset's or the default model's values where none were given).
    pub fn with_model(&self, cfg: &VitConfig) -> TrainOptions {
        TrainOptions {
            dim: Some(cfg.dim),
            depth: Some(cfg.depth),
            heads: Some(cfg.heads),
            mlp_dim: Some(cfg.mlp_dim),
            patch_size: Some(cfg.patch_size),
            image_size: Some(cfg.image_size),
            ..self.clone()
        }
    }

    /// Every option as the run resolves it: the model's dimensions and the data
    /// directory filled in. Threads and micro-batches left unset stay unset (their
    /// defaults depend on the machine and the layout, so a run repeated or continued
    /// elsewhere resolves them again); [`Self::to_config_toml`] notes their values.
    pub fn resolved(&self, cfg: &VitConfig) -> TrainOptions {
        TrainOptions {
            data: Some(self.data_dir()),
            ..self.with_model(cfg)
        }
    }

    /// `config.toml`'s text: every option of these (resolved) options, unset ones as
    /// comment lines (TOML has no null), with this run's value for those that default
    /// by machine or layout (`threads`: this process's compute threads). `resume` is an
    /// action on the directory, not an option of the run, and is left out: `--config`
    /// this file repeats the run, and with `--resume auto` continues it.
    pub fn to_config_toml(&self, threads: usize) -> Result<String> {
        let opts = TrainOptions {
            resume: None,
            overwrite: false,
            ..self.clone()
        };
        let err = |e: &dyn std::fmt::Display| Error::Config(format!("options: {e}"));
        let mut text = String::from(
            "# The resolved options of the run in this directory, defaults included:\n\
             # `ferrovit train --config config.toml` repeats it; add `--resume auto` to continue it.\n",
        );
        text += &toml::to_string(&opts).map_err(|e| err(&e))?;
        for (key, value) in opts.to_json()? {
            if value.is_null() {
                let note = match key.as_str() {
                    "resume" => "not recorded (give --resume auto to continue this run)".into(),
                    "threads" => format!(
                        "unset: one per core, cores / local ranks under a launcher (this run: {threads})"
                    ),
                    "microbatches" => format!(
                        "unset: 2 × pp with a pipeline, else 1 (this run: {})",
                        self.microbatches()
                    ),
                    _ => "unset".into(),
                };
                text += &format!("# {key}: {note}\n");
            }
        }
        Ok(text)
    }
}
