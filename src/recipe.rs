//! The `ferrovit train` recipe: options (flags, or a TOML file that flags override),
//! their validation, and the run itself — data, model, engine, trainer with the
//! standard hooks, metrics file, plot and final report.

use crate::autograd::Precision;
use crate::backend::cpu;
use crate::checkpoint::{self, LoadOptions, SaveOptions};
use crate::data::{Augment, Dataset, Loader, Sampler};
use crate::dist::{DistEnv, Layout, ProcessGroup, ReduceOp, ThreadGroup};
use crate::engine::{Engine, Parallel, TrainConfig};
use crate::error::{Error, Result};
use crate::metrics::ConfusionMatrix;
use crate::optim::LrSchedule;
use crate::tensor::Device;
use crate::trainer::{
    AccuracyHook, LogMetricByEpochHook, Logger, LossHook, LrSchedulerHook, PlotHook, ProgressHook,
    SaveCheckpointHook, ThroughputHook, Trainer,
};
use crate::VitConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every setting of a training run. Field names are the TOML keys of `--config` files
/// and, with `-` for `_`, the flags of `ferrovit train`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainOptions {
    /// Model preset; the dimension fields below override its values when set.
    pub preset: Option<String>,
    pub dim: Option<usize>,
    pub depth: Option<usize>,
    pub heads: Option<usize>,
    pub mlp_dim: Option<usize>,
    pub patch_size: Option<usize>,
    pub dropout: f32,
    /// Data directory (CIFAR-10 binary or image folder); default: the embedded digits.
    pub data: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    pub lr: f32,
    /// Linear warm-up in epochs, then cosine decay to 0 (per step).
    pub warmup: f32,
    pub weight_decay: f32,
    pub label_smoothing: f32,
    /// Comma-separated: crop, flip, autoaugment, or none.
    pub augment: String,
    pub seed: u64,
    /// CPU compute threads (default: one per core).
    pub threads: Option<usize>,
    /// Data-loader worker threads.
    pub workers: usize,
    /// Test every this many epochs (and after the last).
    pub test_interval: usize,
    pub out: PathBuf,
    /// Save a checkpoint under `<out>/checkpoints/` every this many epochs (and after
    /// the last); 0 turns epoch saves off.
    pub save_every: usize,
    /// Also save every this many optimizer steps.
    pub save_every_steps: Option<u64>,
    /// Keep the newest N checkpoints (0: keep all).
    pub keep_last: usize,
    /// Do not save checkpoints at all.
    pub no_save: bool,
    /// Largest shard file, in MiB.
    pub shard_size_mb: u64,
    /// Resume: `auto` (the newest committed checkpoint under `<out>/checkpoints`, or a
    /// fresh start when there is none) or a checkpoint directory.
    pub resume: Option<String>,
    /// Start from a checkpoint's weights (non-strict: tensors whose shape differs, such
    /// as a classifier head for another number of classes, keep their initial values;
    /// the optimizer starts fresh).
    pub init: Option<PathBuf>,
    /// Data-parallel replicas (each takes a share of every global batch).
    pub dp: usize,
    /// Pipeline stages (the blocks split across them; embedding on the first, head on
    /// the last).
    pub pp: usize,
    /// Micro-batches per step in the pipeline (default: 2 × pp; 1 without a pipeline).
    pub microbatches: Option<usize>,
    /// First block of pipeline stages 1.. (default: an even split).
    pub stages: Option<Vec<usize>>,
    /// Gradient all-reduce bucket, in MiB.
    pub bucket_mb: f32,
    /// Seconds any rank waits for another before failing.
    pub comm_timeout: u64,
    /// How replicas combine gradients: `nccl` (on the GPUs, NCCL; one GPU per rank),
    /// `host` (through host memory over the process group), or `auto` (nccl when every
    /// rank trains on a GPU of its own and NCCL loads; host otherwise).
    pub comm: String,
    /// Where to compute: `cpu`, `cuda` (GPU 0), `cuda:N`, or `cuda-emu` (the CUDA
    /// kernels emulated on the CPU: slow, for testing).
    pub device: String,
    /// The linear layers' arithmetic: `f32`, `bf16` (mixed precision: bf16 GEMM operands,
    /// f32 accumulation, parameters and optimizer state), or `auto` (bf16 on a CUDA
    /// device, f32 on the CPU).
    pub precision: String,
}

/// The default model when neither a preset nor dimensions are given: small enough to
/// reach 95% on the digits data in about a minute on two cores.
pub const DEFAULT_MODEL: (usize, usize, usize, usize) = (128, 4, 4, 256);

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            preset: None,
            dim: None,
            depth: None,
            heads: None,
            mlp_dim: None,
            patch_size: None,
            dropout: 0.1,
            data: None,
            epochs: 20,
            batch_size: 64,
            lr: 2e-3,
            warmup: 1.0,
            weight_decay: 0.05,
            label_smoothing: 0.0,
            augment: "none".into(),
            seed: 0,
            threads: None,
            workers: 2,
            test_interval: 1,
            out: PathBuf::from("out"),
            save_every: 1,
            save_every_steps: None,
            keep_last: 3,
            no_save: false,
            shard_size_mb: 2048,
            resume: None,
            init: None,
            dp: 1,
            pp: 1,
            microbatches: None,
            stages: None,
            bucket_mb: 25.0,
            comm_timeout: 300,
            comm: "auto".into(),
            device: "cpu".into(),
            precision: "auto".into(),
        }
    }
}

fn invalid(field: &str, value: impl std::fmt::Display, why: &str) -> Error {
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
pub const MAX_WORLD: usize = 1 << 16;

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
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// `base` (a config file's table, or the defaults) with every key of `overrides`
    /// replaced: how flags override a config file.
    pub fn merged(base: &TrainOptions, overrides: &impl Serialize) -> Result<TrainOptions> {
        let err = |e: &dyn std::fmt::Display| Error::Config(format!("options: {e}"));
        check_toml_integers(overrides)?;
        let mut table = toml::Table::try_from(base).map_err(|e| err(&e))?;
        table.extend(toml::Table::try_from(overrides).map_err(|e| err(&e))?);
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
        cfg.num_classes = num_classes;
        cfg.dropout = self.dropout;
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
        // the model's own check, before any data is read (the class count comes later)
        self.model(1)?;
        if let Some(n) = self.threads {
            check_count("threads", n, cpu::max_threads())?;
        }
        check_count("workers", self.workers, MAX_WORKERS)?;
        check_count("shard_size_mb", self.shard_size_mb, MAX_SHARD_SIZE_MB)?;
        if let Some(n) = self.save_every_steps {
            // 0 would silently save never; leaving the flag out says that
            check_count("save_every_steps", n, u64::MAX)?;
        }
        if self.resume.is_some() && self.init.is_some() {
            return Err(Error::Config(
                "resume and init exclude each other (resume continues a run; init starts a new one from weights)".into(),
            ));
        }
        if self.test_interval == 0 {
            return Err(invalid("test_interval", 0, "must be at least 1"));
        }
        Augment::parse(&self.augment)?;
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
        if !(self.bucket_mb.is_finite() && self.bucket_mb > 0.0 && self.bucket_mb <= MAX_BUCKET_MB)
        {
            return Err(invalid(
                "bucket_mb",
                self.bucket_mb,
                &format!("must be a number in (0, {MAX_BUCKET_MB}] MiB"),
            ));
        }
        let ordinal = self.device.strip_prefix("cuda:").map(str::parse::<usize>);
        if !(["cpu", "cuda", "cuda-emu"].contains(&self.device.as_str())
            || ordinal.is_some_and(|n| n.is_ok()))
        {
            return Err(invalid(
                "device",
                &self.device,
                "expected cpu, cuda, cuda:N or cuda-emu",
            ));
        }
        if self.precision != "auto" {
            Precision::parse(&self.precision)
                .map_err(|_| invalid("precision", &self.precision, "expected auto, f32 or bf16"))?;
        }
        check_count("comm_timeout", self.comm_timeout, MAX_COMM_TIMEOUT_S)?;
        if !["auto", "nccl", "host"].contains(&self.comm.as_str()) {
            return Err(invalid("comm", &self.comm, "expected auto, nccl or host"));
        }
        Ok(())
    }

    /// Micro-batches per step.
    pub fn microbatches(&self) -> usize {
        self.microbatches
            .unwrap_or(if self.pp > 1 { 2 * self.pp } else { 1 })
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

    /// The metrics' plot: `out/metrics.png`.
    pub fn plot_path(&self) -> PathBuf {
        self.out.join("metrics.png")
    }
}

/// A fresh run never mixes its checkpoints with an earlier run's (retention and
/// `--resume auto` go by step): an existing checkpoint directory is renamed aside.
fn set_aside_old_run(root: &Path, logger: &Logger) -> Result<()> {
    if checkpoint::list(root)?.committed.is_empty() {
        return Ok(());
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = root.with_file_name(format!("checkpoints.old-{stamp}"));
    std::fs::rename(root, &aside).map_err(|e| Error::io(root, e))?;
    logger.info(format!(
        "{} held checkpoints of an earlier run: moved to {} (use --resume auto to continue a run)",
        root.display(),
        aside.display()
    ));
    Ok(())
}

/// A resume continues at the checkpoint's position, which must be one this run
/// reaches: every batch is one update, so `step = epoch × batches per epoch + batch`.
fn check_position(t: &checkpoint::TrainingState, batches: u64, dir: &Path) -> Result<()> {
    let at = t
        .epoch
        .checked_mul(batches)
        .and_then(|s| s.checked_add(t.batch));
    if t.batch > batches || at != Some(t.step) {
        return Err(Error::Format {
            path: dir.to_path_buf(),
            msg: format!(
                "saved at epoch {} batch {} after {} updates, which is not a position of this run's {batches} batches per epoch (resume with the same data and --batch-size)",
                t.epoch, t.batch, t.step
            ),
        });
    }
    Ok(())
}

/// Loads the checkpoint to resume from (strict, optimizer state included) and positions
/// the trainer after it.
fn resume_from(
    trainer: &mut Trainer,
    resume: &str,
    root: &Path,
    cfg: &VitConfig,
    opts: &TrainOptions,
    batches_per_epoch: u64,
) -> Result<()> {
    let listing = checkpoint::list(root)?;
    if !listing.uncommitted.is_empty() {
        trainer.logger.warn(format!(
            "ignoring {} uncommitted checkpoint director{} (interrupted saves; `ferrovit ckpt list {} --clean` removes them)",
            listing.uncommitted.len(),
            if listing.uncommitted.len() == 1 { "y" } else { "ies" },
            root.display()
        ));
    }
    let dir = if resume == "auto" {
        match checkpoint::newest(root)? {
            Some(d) => d,
            None => {
                trainer.logger.info(format!(
                    "no checkpoint under {} to resume from: starting fresh",
                    root.display()
                ));
                return Ok(());
            }
        }
    } else {
        PathBuf::from(resume)
    };
    let saved = checkpoint::Checkpoint::open(&dir)?.index;
    check_position(&saved.training, batches_per_epoch, &dir)?;
    let (done, batches) = (saved.training.epoch, saved.training.batch);
    if (opts.epochs as u64) < done || (opts.epochs as u64 == done && batches > 0) {
        return Err(Error::Format {
            path: dir,
            msg: format!(
                "--epochs {} is fewer than the {done} epochs (+ {batches} batches) this checkpoint has already trained: give --epochs {} or more to continue",
                opts.epochs,
                done + 1
            ),
        });
    }
    if saved.training.seed != opts.seed {
        return Err(Error::Format {
            path: dir,
            msg: format!(
                "saved with seed {}, this run has seed {}: resume with --seed {}",
                saved.training.seed, opts.seed, saved.training.seed
            ),
        });
    }
    // strict: a different architecture fails naming the first tensor that differs
    let (state, _) = trainer
        .engine
        .load_checkpoint(&dir, LoadOptions::default())?;
    if saved.model != *cfg {
        return Err(Error::Format {
            path: dir,
            msg: format!(
                "saved with a different model ({:?}); this run has {:?}",
                saved.model, cfg
            ),
        });
    }
    trainer.resume(&state);
    if state.epoch == opts.epochs as u64 {
        trainer.logger.info(format!(
            "{} has all {} epochs trained already: nothing to do (a larger --epochs continues it)",
            dir.display(),
            opts.epochs
        ));
    }
    trainer.logger.info(format!(
        "resuming from {} (saved under {}) at epoch {}, batch {} (step {})",
        dir.display(),
        saved.layout.describe(),
        state.epoch + 1,
        state.batch,
        state.step
    ));
    Ok(())
}

/// What a finished run reports.
#[derive(Debug)]
pub struct TrainSummary {
    /// The rank that reports (0; with a launcher every process gets its own).
    pub rank: usize,
    pub final_test_accuracy: Option<f64>,
    pub confusion: Option<ConfusionMatrix>,
    pub classes: Vec<String>,
    pub seconds: f64,
    pub metrics_path: PathBuf,
    pub plot_path: PathBuf,
}

/// Runs `ferrovit train` with these options: logs progress and per-epoch metrics,
/// writes `metrics.jsonl`, `metrics.png` and the resolved `config.toml` into `out`.
///
/// The layout is `dp × pp`: as ranks in threads of this process, or — when launched
/// with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (`ferrovit launch`, torchrun,
/// SLURM) — as this process's rank of a TCP group. Rank 0's summary is returned.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    opts.validate()?;
    if let Some(n) = opts.threads {
        cpu::set_num_threads(n)?;
    }
    let timeout = Duration::from_secs(opts.comm_timeout);
    if let Some(env) = DistEnv::from_env()? {
        let world = env.world;
        let opts = if opts.dp == 1 && world > 1 && world.is_multiple_of(opts.pp) {
            // the launcher's world size decides the data-parallel degree
            TrainOptions {
                dp: world / opts.pp,
                ..opts.clone()
            }
        } else {
            opts.clone()
        };
        if opts.dp * opts.pp != world {
            return Err(Error::Config(format!(
                "--dp {} × --pp {} = {} ranks, but WORLD_SIZE is {world}",
                opts.dp,
                opts.pp,
                opts.dp * opts.pp
            )));
        }
        check_layout(&opts)?;
        let local = env.local_rank.unwrap_or(env.rank);
        let group: Arc<dyn ProcessGroup> = Arc::new(env.connect(timeout)?);
        return train_rank(&opts, Some(group), local);
    }
    let world = opts.dp * opts.pp;
    if world == 1 {
        return train_rank(opts, None, 0);
    }
    check_layout(opts)?;
    let handles: Vec<_> = ThreadGroup::new(world, timeout)?
        .into_iter()
        .map(|g| {
            let opts = opts.clone();
            std::thread::Builder::new()
                .name(format!("rank-{}", g.rank()))
                .spawn(move || {
                    let local = g.rank();
                    train_rank(&opts, Some(Arc::new(g)), local)
                })
                .map_err(|e| Error::Config(format!("cannot start a rank thread: {e}")))
        })
        .collect::<Result<_>>()?;
    let results: Vec<Result<TrainSummary>> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Comm("a rank thread panicked".into())))
        })
        .collect();
    first_cause(results)
}

/// Rank 0's summary, or the error that started a failure: when one rank fails the
/// others fail too, with communication errors naming it, so a rank's own error is
/// reported before any communication error.
fn first_cause(results: Vec<Result<TrainSummary>>) -> Result<TrainSummary> {
    let mut errors: Vec<Error> = Vec::new();
    let mut summary = None;
    for r in results {
        match r {
            Ok(s) => summary = summary.or(Some(s)),
            Err(e) => errors.push(e),
        }
    }
    if let Some(i) = errors.iter().position(|e| !matches!(e, Error::Comm(_))) {
        return Err(errors.swap_remove(i));
    }
    match (errors.into_iter().next(), summary) {
        (Some(e), _) => Err(e),
        (None, Some(s)) => Ok(s),
        (None, None) => Err(Error::Comm("no rank finished".into())),
    }
}

/// Refuses a layout that cannot work (more stages than blocks, bad boundaries) before
/// any rank starts work.
fn check_layout(opts: &TrainOptions) -> Result<()> {
    let classes = Dataset::open(&opts.data_dir())?.0.classes.len();
    layout(opts, &opts.model(classes)?).map(|_| ())
}

/// The layout the options ask for.
fn layout(opts: &TrainOptions, cfg: &VitConfig) -> Result<Layout> {
    Layout::new(opts.dp, opts.pp, cfg.depth, opts.stages.as_deref())
}

/// Whether the replicas of a parallel run all-reduce their gradients with NCCL on the
/// GPUs (`--comm`); in `auto`, only when every rank can, so all ranks choose alike.
fn nccl_gradients(opts: &TrainOptions, device: Device, par: &Parallel) -> Result<bool> {
    if par.layout.dp == 1 || opts.comm == "host" {
        return Ok(false);
    }
    let why_not = if !device.is_gpu() {
        Some(format!("the device is {}, not a GPU", device.describe()))
    } else if opts.device != "cuda" {
        Some(format!(
            "every rank computes on the same GPU (`--device {}`); NCCL needs a GPU per rank (`--device cuda`)",
            opts.device
        ))
    } else {
        crate::dist::NcclGroup::check_available()
            .err()
            .map(|e| e.to_string())
    };
    if opts.comm == "nccl" {
        return match why_not {
            Some(why) => Err(Error::Config(format!("--comm nccl: {why}"))),
            None => Ok(true),
        };
    }
    let mut cannot = [why_not.is_some() as u8 as f32];
    par.world.all_reduce(&mut cannot, ReduceOp::Max)?;
    Ok(cannot[0] == 0.0)
}

/// One rank's run (the whole run without a group); `local` is the rank's index among
/// this machine's ranks (it picks the rank's GPU). The steps run in this order on every
/// rank, since several of them talk to the other ranks (the NCCL choice, the barrier,
/// training).
fn train_rank(
    opts: &TrainOptions,
    group: Option<Arc<dyn ProcessGroup>>,
    local: usize,
) -> Result<TrainSummary> {
    let start = Instant::now();
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
    let logger = Logger::new(rank, world);
    let dir = opts.data_dir();
    let (train, test) = Dataset::open(&dir)?;
    let cfg = opts.model(train.classes.len())?;
    let augment = Augment::parse(&opts.augment)?;
    let layout = layout(opts, &cfg)?;
    let device = Device::for_rank(&opts.device, local)?;
    let (par, nccl) = parallel(opts, group, &layout, device)?;
    if rank == 0 {
        write_resolved_config(opts)?;
    }
    let classes = train.classes.clone();
    let sizes = (train.len(), test.len());
    let (train_loader, test_loader) = loaders(opts, (train, test), augment, &layout, rank)?;
    let steps_per_epoch = train_loader.batches_per_epoch() as u64;
    let schedule = lr_schedule(opts, steps_per_epoch)?;
    let precision = Precision::resolve(&opts.precision, device)?;
    let engine = build_engine(opts, &cfg, precision, par)?;
    logger.info(describe_run(&dir, sizes, &classes, &cfg, opts));
    if world > 1 {
        logger.info(describe_layout(opts, &layout, nccl));
    }
    let mut trainer = Trainer::new(engine, logger);
    resume_or_init(&mut trainer, opts, &cfg, rank, steps_per_epoch)?;
    if device != Device::Cpu {
        trainer.engine.to_device(device)?;
        trainer.logger.info(format!(
            "training on {}, {} linear layers",
            device.describe(),
            precision
        ));
    }
    add_hooks(&mut trainer, opts, rank, schedule, &classes)?;
    trainer.fit(
        &train_loader,
        opts.epochs,
        Some(&test_loader),
        opts.test_interval,
    )?;
    Ok(finish(&trainer, opts, rank, classes, start))
}

/// The rank's share of the layout: its `Parallel` (with the replicas' gradients
/// all-reduced by NCCL when [`nccl_gradients`] says so) and whether NCCL was chosen;
/// nothing without a group.
fn parallel(
    opts: &TrainOptions,
    group: Option<Arc<dyn ProcessGroup>>,
    layout: &Layout,
    device: Device,
) -> Result<(Option<Parallel>, bool)> {
    let Some(g) = group else {
        return Ok((None, false));
    };
    let par = Parallel::new(
        g,
        layout.clone(),
        opts.microbatches(),
        // bounded by validate (at most MAX_BUCKET_MB MiB of f32s)
        ((opts.bucket_mb as f64 * (1 << 20) as f64) / 4.0) as usize,
    )?;
    let nccl = nccl_gradients(opts, device, &par)?;
    let par = match nccl {
        true => par.with_nccl_gradients(device, Duration::from_secs(opts.comm_timeout))?,
        false => par,
    };
    Ok((Some(par), nccl))
}

/// Writes the options as resolved (defaults, file and flags merged) to
/// `out/config.toml`, so a run can be repeated with `--config`.
fn write_resolved_config(opts: &TrainOptions) -> Result<()> {
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let resolved = opts.out.join("config.toml");
    let text = toml::to_string(opts).map_err(|e| Error::Config(format!("options: {e}")))?;
    crate::files::write_replacing(&resolved, text.as_bytes())
}

/// The log line that describes the data and the model.
fn describe_run(
    dir: &Path,
    (train_len, test_len): (usize, usize),
    classes: &[String],
    cfg: &VitConfig,
    opts: &TrainOptions,
) -> String {
    format!(
        "data {} ({train_len} train / {test_len} test images, {} classes); model dim {} depth {} heads {} mlp {} patch {} ({} params); augment {}; {} threads",
        dir.display(),
        classes.len(),
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.mlp_dim,
        cfg.patch_size,
        cfg.num_params(),
        opts.augment,
        cpu::num_threads()
    )
}

/// The log line that describes a parallel run's layout.
fn describe_layout(opts: &TrainOptions, layout: &Layout, nccl: bool) -> String {
    format!(
        "layout {}, {} micro-batches per step, global batch {}{}",
        layout.describe(),
        opts.microbatches(),
        opts.batch_size,
        match nccl {
            true => "; gradients all-reduced by NCCL on the GPUs",
            false if layout.dp > 1 => "; gradients all-reduced through host memory",
            false => "",
        }
    )
}

/// This rank's train and test loaders: its replica's share of every global batch,
/// images only on a pipeline's first stage.
fn loaders(
    opts: &TrainOptions,
    (train, test): (Dataset, Dataset),
    augment: Augment,
    layout: &Layout,
    rank: usize,
) -> Result<(Loader, Loader)> {
    let mut train_loader = loader(opts, train, true, layout, rank)?;
    train_loader.augment = augment;
    let mut test_loader = loader(opts, test, false, layout, rank)?;
    // On a CUDA device the loader sends raw pixels; the device crops, flips and
    // normalises (AutoAugment stays on the CPU).
    let device_augment = opts.device != "cpu" && !augment.auto_augment;
    train_loader.device_augment = device_augment;
    test_loader.device_augment = device_augment;
    Ok((train_loader, test_loader))
}

/// A loader of `data` for `rank`'s replica, without augmentation.
fn loader(
    opts: &TrainOptions,
    data: Dataset,
    shuffle: bool,
    layout: &Layout,
    rank: usize,
) -> Result<Loader> {
    let (replica, stage) = layout.coords(rank);
    let len = data.len();
    let sampler = Sampler::new(len, shuffle, opts.seed);
    let mut l = Loader::new(Arc::new(data), sampler, opts.batch_size)?.shard(replica, layout.dp)?;
    l.workers = opts.workers;
    l.images = stage == 0;
    Ok(l)
}

/// Linear warm-up over `--warmup` epochs, then cosine decay to 0, per step.
fn lr_schedule(opts: &TrainOptions, steps_per_epoch: u64) -> Result<LrSchedule> {
    let total = (opts.epochs as u64)
        .checked_mul(steps_per_epoch)
        .ok_or_else(|| {
            invalid(
                "epochs",
                opts.epochs,
                &format!("× {steps_per_epoch} steps per epoch overflows the step count"),
            )
        })?;
    Ok(LrSchedule::WarmupCosine {
        warmup: ((opts.warmup as f64 * steps_per_epoch as f64).round() as u64).min(total),
        total,
        min_lr: 0.0,
    })
}

/// The engine for this rank: the whole model, or its stage under a layout.
fn build_engine(
    opts: &TrainOptions,
    cfg: &VitConfig,
    precision: Precision,
    par: Option<Parallel>,
) -> Result<Engine> {
    let tc = TrainConfig {
        lr: opts.lr,
        weight_decay: opts.weight_decay,
        label_smoothing: opts.label_smoothing,
        seed: opts.seed,
        precision,
        ..TrainConfig::default()
    };
    match par {
        Some(par) => Engine::parallel(cfg, tc, par),
        None => Engine::new(cfg, tc),
    }
}

/// Where training starts: resumed from a checkpoint (`--resume`), or fresh with an
/// earlier run's checkpoints set aside, then optionally initialised from weights
/// (`--init`).
fn resume_or_init(
    trainer: &mut Trainer,
    opts: &TrainOptions,
    cfg: &VitConfig,
    rank: usize,
    steps_per_epoch: u64,
) -> Result<()> {
    let ckpt_root = opts.checkpoint_root();
    if let Some(resume) = &opts.resume {
        resume_from(trainer, resume, &ckpt_root, cfg, opts, steps_per_epoch)?;
    }
    if opts.resume.is_none() && !opts.no_save && rank == 0 {
        set_aside_old_run(&ckpt_root, &trainer.logger)?;
    }
    // no rank goes on (to save) before rank 0 has set the old run aside
    if let Some(p) = trainer.engine.parallel_info() {
        p.world.barrier()?;
    }
    if let Some(init) = &opts.init {
        let (_, report) = trainer.engine.load_checkpoint(
            init,
            LoadOptions {
                strict: false,
                optimizer: false,
            },
        )?;
        trainer
            .logger
            .info(format!("initialised from {}: {report}", init.display()));
    }
    Ok(())
}

/// The standard hooks: the LR schedule and the metrics on every rank; progress, the
/// JSON-lines file and the plot on rank 0 (every rank has the global metrics); the
/// checkpoint saver unless `--no-save`.
fn add_hooks(
    trainer: &mut Trainer,
    opts: &TrainOptions,
    rank: usize,
    schedule: LrSchedule,
    classes: &[String],
) -> Result<()> {
    let history = trainer.history().to_vec();
    trainer
        .add_hook(LrSchedulerHook {
            schedule,
            by_epoch: false,
        })
        .add_hook(LossHook::default())
        .add_hook(AccuracyHook::default())
        .add_hook(ThroughputHook::default());
    if rank == 0 {
        trainer
            .add_hook(ProgressHook::default())
            .add_hook(LogMetricByEpochHook::with_jsonl(
                opts.metrics_path(),
                &history,
            )?)
            .add_hook(PlotHook {
                path: opts.plot_path(),
            });
    }
    if !opts.no_save {
        let mut hook = SaveCheckpointHook::new(
            opts.checkpoint_root(),
            (opts.save_every > 0).then_some(opts.save_every),
            opts.save_every_steps,
            SaveOptions {
                shard_bytes: opts.shard_size_mb << 20,
                keep_last: (opts.keep_last > 0).then_some(opts.keep_last),
            },
        );
        hook.schedule = Some(schedule);
        hook.classes = classes.to_vec();
        trainer.add_hook(hook);
    }
    Ok(())
}

/// Logs the timers and sums the run up.
fn finish(
    trainer: &Trainer,
    opts: &TrainOptions,
    rank: usize,
    classes: Vec<String>,
    start: Instant,
) -> TrainSummary {
    let confusion = trainer
        .hook::<AccuracyHook>()
        .and_then(|h| h.confusion.clone());
    let t = trainer.timers();
    trainer.logger.info(format!(
        "timers: train-epoch {:.2} s/epoch, train-step {:.1} ms, test-step {:.1} ms",
        t.mean("train-epoch"),
        1e3 * t.mean("train-step"),
        1e3 * t.mean("test-step")
    ));
    TrainSummary {
        rank,
        final_test_accuracy: confusion.as_ref().map(ConfusionMatrix::accuracy),
        confusion,
        classes,
        seconds: start.elapsed().as_secs_f64(),
        metrics_path: opts.metrics_path(),
        plot_path: opts.plot_path(),
    }
}
