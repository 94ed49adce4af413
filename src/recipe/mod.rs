//! The `ferrovit train` recipe: its options ([`options`]: flags, or a TOML file that
//! flags override, and their validation) and the run itself — data, model, engine,
//! trainer with the standard hooks, metrics file, plot and final report.

mod options;
mod resolve;
mod rundir;

use options::invalid;

pub use options::{
    Channels, Comm, PrecisionChoice, Resume, TrainOptions, DEFAULT_MODEL, MAX_BUCKET_MB,
    MAX_COMM_TIMEOUT_S, MAX_MICROBATCHES, MAX_SHARD_SIZE_MB, MAX_WORKERS, MAX_WORLD, MUST_MATCH,
};
pub use resolve::resume_options;
pub use rundir::{RunLock, LOCK};

use crate::autograd::Precision;
use crate::backend::{cpu, DeviceSpec};
use crate::checkpoint::{self, LoadOptions, SaveOptions};
use crate::data::{Augment, Dataset, Loader, Sampler};
use crate::dist::{DistEnv, Layout, ProcessGroup, ReduceOp, ThreadGroup};
use crate::engine::{Engine, Parallel, TrainConfig};
use crate::error::{Error, Result};
use crate::metrics::ConfusionMatrix;
use crate::optim::LrSchedule;
use crate::signals::StopFlag;
use crate::tensor::Device;
use crate::trainer::{
    AccuracyHook, GradNormHook, LogMetricByEpochHook, Logger, LossHook, LrSchedulerHook, PlotHook,
    ProgressHook, SaveCheckpointHook, Stopped, TensorBoardHook, ThroughputHook, Trainer,
};
use crate::VitConfig;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

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
/// the trainer after it; the schedule it recorded, or `None` when there was nothing to
/// resume.
fn resume_from(
    trainer: &mut Trainer,
    resume: &Resume,
    root: &Path,
    cfg: &VitConfig,
    opts: &TrainOptions,
    batches_per_epoch: u64,
) -> Result<Option<Option<LrSchedule>>> {
    let listing = checkpoint::list(root)?;
    if !listing.uncommitted.is_empty() {
        trainer.logger.warn(format!(
            "ignoring {} uncommitted checkpoint director{} (interrupted saves; `ferrovit ckpt list {} --clean` removes them)",
            listing.uncommitted.len(),
            if listing.uncommitted.len() == 1 { "y" } else { "ies" },
            root.display()
        ));
    }
    let dir = match resume {
        Resume::Auto => match checkpoint::newest(root)? {
            Some(d) => d,
            None => {
                trainer.logger.info(format!(
                    "no checkpoint under {} to resume from: starting fresh",
                    root.display()
                ));
                return Ok(None);
            }
        },
        Resume::Dir(dir) => dir.clone(),
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
    Ok(Some(saved.training.schedule))
}

/// What a finished run reports.
#[derive(Debug)]
pub struct TrainSummary {
    /// The rank that reports (0; with a launcher every process gets its own).
    pub rank: usize,
    pub final_test_accuracy: Option<f64>,
    /// The last test's `ema_test_loss` and `ema_test_acc` (`--ema-decay`).
    pub final_ema_test: Option<(f64, f64)>,
    pub confusion: Option<ConfusionMatrix>,
    pub classes: Vec<String>,
    pub seconds: f64,
    pub metrics_path: PathBuf,
    pub plot_path: PathBuf,
    /// Where and why the run stopped early (a stop requested through the flag given to
    /// [`train_given_until`], e.g. by a signal), with its checkpoint unless `--no-save`.
    pub stopped: Option<Stopped>,
}

/// Runs `ferrovit train` with these options: logs progress and per-epoch metrics,
/// writes `metrics.jsonl`, `metrics.png` and the resolved `config.toml` into `out`.
/// Options that differ from the defaults count as given ([`train_given`]): on a resume
/// the others come from the checkpoint, so an option set back to its default (e.g.
/// `pp: 1` for a run saved with 2 stages) must be named with [`train_given`].
///
/// The layout is `dp × pp`: as ranks in threads of this process, or — when launched
/// with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (`ferrovit launch`, torchrun,
/// SLURM) — as this process's rank of a TCP group. Rank 0's summary is returned.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    train_given(opts, &opts.differing_from_default()?)
}

/// [`train`], told which options were given (on the command line or in a `--config`
/// file, by name): a resume takes the others from its checkpoint
/// ([`resume_options`]). Everything is checked — options, resume, layout, data,
/// model, device, the directory's lock ([`rundir::claim`], taken by the process of
/// rank 0) — before anything is written; the lock is released when the run ends.
pub fn train_given(opts: &TrainOptions, given: &[impl AsRef<str>]) -> Result<TrainSummary> {
    train_given_until(opts, given, &StopFlag::new())
}

/// [`train_given`], stopping after the current step once `stop` is set (every rank at
/// the same step; a checkpoint is saved there unless `--no-save`).
pub fn train_given_until(
    opts: &TrainOptions,
    given: &[impl AsRef<str>],
    stop: &StopFlag,
) -> Result<TrainSummary> {
    let given: Vec<String> = given.iter().map(|g| g.as_ref().to_string()).collect();
    let env = DistEnv::from_env()?;
    let logger = env
        .as_ref()
        .map_or_else(Logger::default, |e| Logger::new(e.rank, e.world));
    let opts = &resume_options(opts, &given, env.is_some(), &logger)?;
    opts.validate()?;
    let env = DistEnv::from_env()?;
    set_threads(opts, env.as_ref().and_then(|e| e.local_world))?;
    let timeout = Duration::from_secs(opts.comm_timeout);
    if let Some(env) = env {
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
        let _lock = match env.rank {
            0 => Some(rundir::claim(&opts, &logger)?),
            _ => None,
        };
        let local = env.local_rank.unwrap_or(env.rank);
        let group: Arc<dyn ProcessGroup> = Arc::new(env.connect(timeout)?);
        return train_rank(&opts, Some(group), local, stop);
    }
    let world = opts.dp * opts.pp;
    if world == 1 {
        let _lock = rundir::claim(opts, &logger)?;
        return train_rank(opts, None, 0, stop);
    }
    check_layout(opts)?;
    let _lock = rundir::claim(opts, &logger)?;
    let handles: Vec<_> = ThreadGroup::new(world, timeout)?
        .into_iter()
        .map(|g| {
            let (opts, stop) = (opts.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("rank-{}", g.rank()))
                .spawn(move || {
                    let local = g.rank();
                    train_rank(&opts, Some(Arc::new(g)), local, &stop)
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

/// The cores and local ranks this process's compute threads were split from, when
/// they were (set once, as rayon's pool is).
static THREAD_SPLIT: OnceLock<(usize, usize)> = OnceLock::new();

/// Sets this process's compute threads: `--threads` when given (validated); else, with
/// `local_ranks` > 1 processes of the run on this machine (LOCAL_WORLD_SIZE from
/// `launch` or torchrun), cores / local ranks (at least 1) so that they do not
/// oversubscribe the cores; else one per core. Ranks in threads of one process need no
/// split: they share the one pool.
fn set_threads(opts: &TrainOptions, local_ranks: Option<usize>) -> Result<()> {
    if let Some(n) = opts.threads {
        return cpu::set_num_threads(n);
    }
    let Some(local) = local_ranks.filter(|&l| l > 1) else {
        return Ok(());
    };
    let cores = cpu::available_cores();
    match cpu::set_num_threads((cores / local).max(1)) {
        Ok(()) => {
            let _ = THREAD_SPLIT.set((cores, local));
        }
        // a pool built earlier in this process (a library caller's): slower, not wrong
        Err(e) => tracing::warn!("cannot split the cores among {local} local ranks: {e}"),
    }
    Ok(())
}

/// This process's compute threads for the log: "2 threads", or "1 thread (2 cores / 2
/// local ranks)" when [`set_threads`] split the cores.
fn describe_threads() -> String {
    let n = cpu::num_threads();
    let threads = if n == 1 {
        "1 thread".into()
    } else {
        format!("{n} threads")
    };
    match THREAD_SPLIT.get() {
        Some((cores, local)) => format!("{threads} ({cores} cores / {local} local ranks)"),
        None => threads,
    }
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
    if par.layout.dp == 1 || opts.comm == Comm::Host {
        return Ok(false);
    }
    let why_not = if !device.is_gpu() {
        Some(format!("the device is {}, not a GPU", device.describe()))
    } else if opts.device != DeviceSpec::Cuda(None) {
        Some(format!(
            "every rank computes on the same GPU (`--device {}`); NCCL needs a GPU per rank (`--device cuda`)",
            opts.device
        ))
    } else {
        crate::dist::NcclGroup::check_available()
            .err()
            .map(|e| e.to_string())
    };
    if opts.comm == Comm::Nccl {
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
    stop: &StopFlag,
) -> Result<TrainSummary> {
    let start = Instant::now();
    let (rank, world) = group.as_ref().map_or((0, 1), |g| (g.rank(), g.world()));
    let logger = Logger::new(rank, world);
    let dir = opts.data_dir();
    let norm = opts.norm()?;
    let (train, test) = Dataset::open_at(&dir, opts.model(1)?.image_size)?;
    let (train, test) = (train.with_norm(norm), test.with_norm(norm));
    let cfg = opts.model(train.classes.len())?;
    let augment = opts.augment;
    let layout = layout(opts, &cfg)?;
    let device = Device::for_rank(opts.device, local)?;
    let (par, nccl) = parallel(opts, group, &layout, device)?;
    let classes = train.classes.clone();
    let sizes = (train.len(), test.len());
    let (train_loader, test_loader) = loaders(opts, (train, test), augment, &layout, rank)?;
    let steps_per_epoch = train_loader.batches_per_epoch() as u64;
    let schedule = lr_schedule(opts, steps_per_epoch)?;
    let precision = opts.precision.resolve(device);
    let engine = build_engine(opts, &cfg, precision, par)?;
    logger.info(describe_run(&dir, sizes, &classes, &cfg, opts));
    if opts.batch_size > sizes.0 {
        logger.warn(format!(
            "--batch-size {} is more than the {} training images: one smaller batch per epoch",
            opts.batch_size, sizes.0
        ));
    }
    logger.debug(format!("compute on {}", describe_threads()));
    if world > 1 {
        logger.info(describe_layout(opts, &layout, nccl));
    }
    let mut trainer = Trainer::new(engine, logger);
    let schedule = resume_or_init(&mut trainer, opts, &cfg, steps_per_epoch, schedule)?;
    if device == Device::Cpu && opts.precision != PrecisionChoice::F32 {
        // what `auto` chose and why, or how bf16 products run here
        trainer.logger.info(format!(
            "{precision} linear layers on the CPU; {}",
            cpu::bf16gemm::choice()
        ));
    }
    if device != Device::Cpu {
        trainer.engine.to_device(device)?;
        trainer.logger.info(format!(
            "training on {}, {} linear layers",
            device.describe(),
            precision
        ));
    }
    start_outputs(&trainer, opts, &cfg, rank)?;
    add_hooks(&mut trainer, opts, rank, schedule, &classes, &cfg)?;
    trainer.engine.set_stop_flag(stop.clone());
    let stopped = trainer.fit(
        &train_loader,
        opts.epochs,
        Some(&test_loader),
        opts.test_interval,
    )?;
    Ok(TrainSummary {
        stopped,
        ..finish(&trainer, opts, rank, classes, start)
    })
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
    let g = match group {
        Some(g) => g,
        // accumulation runs as the pipeline's micro-batches, on a group of this one rank
        None if opts.accum_steps > 1 => {
            let timeout = Duration::from_secs(opts.comm_timeout);
            let one: Arc<dyn ProcessGroup> = Arc::new(ThreadGroup::new(1, timeout)?.remove(0));
            one
        }
        None => return Ok((None, false)),
    };
    let par = Parallel::new(
        g,
        layout.clone(),
        opts.micro_steps(),
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

/// The run's first writes, once every rank has started without error: rank 0 moves an
/// earlier run aside (`--overwrite`) and writes `config.toml`; no rank goes on (to
/// save) before it is done.
fn start_outputs(
    trainer: &Trainer,
    opts: &TrainOptions,
    cfg: &VitConfig,
    rank: usize,
) -> Result<()> {
    let config = opts.resolved(cfg).to_config_toml(cpu::num_threads())?;
    let world = trainer.engine.parallel_info().map(|p| &p.world);
    if let Some(w) = world {
        w.barrier()?;
    }
    if rank == 0 {
        if opts.overwrite {
            rundir::move_aside(&opts.out, &trainer.logger)?;
        }
        write_resolved_config(&opts.out, &config)?;
    }
    if let Some(w) = world {
        w.barrier()?;
    }
    Ok(())
}

/// Writes `out/config.toml`: every option as resolved (defaults, file and flags merged;
/// the model's dimensions and data directory filled in, machine-dependent defaults noted,
/// [`TrainOptions::to_config_toml`]), so `--config` repeats the run.
fn write_resolved_config(out: &Path, text: &str) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::files::write_replacing(&out.join("config.toml"), text.as_bytes())
}

/// The log line that describes the data and the model.
fn describe_run(
    dir: &Path,
    (train_len, test_len): (usize, usize),
    classes: &[String],
    cfg: &VitConfig,
    opts: &TrainOptions,
) -> String {
    let s = cfg.image_size;
    format!(
        "data {} ({train_len} train / {test_len} test images of {s}×{s}, {} classes, mean {} std {}); model dim {} depth {} heads {} mlp {} patch {} ({} params); augment {}{}; {}",
        dir.display(),
        classes.len(),
        opts.mean,
        opts.std,
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.mlp_dim,
        cfg.patch_size,
        cfg.num_params(),
        opts.augment,
        describe_mixing(opts),
        describe_threads()
    )
}

/// ", mixup A cutmix B (prob P, switch S)" when the training batches are mixed.
fn describe_mixing(opts: &TrainOptions) -> String {
    match opts.mixup() {
        Ok(Some(m)) => format!(
            ", mixup {} cutmix {} (prob {}, switch {})",
            m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob
        ),
        _ => String::new(),
    }
}

/// The log line that describes a parallel run's layout.
fn describe_layout(opts: &TrainOptions, layout: &Layout, nccl: bool) -> String {
    format!(
        "layout {}, {} micro-batches per step, global batch {}{}",
        layout.describe(),
        opts.micro_steps(),
        opts.batch_size * opts.accum_steps,
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
    train_loader.mixup = opts.mixup()?;
    let mut test_loader = loader(opts, test, false, layout, rank)?;
    // On a CUDA device the loader sends raw pixels; the device crops, flips, normalises
    // and mixes (AutoAugment stays on the CPU, and then so does the rest).
    let device_augment = opts.device.is_cuda() && !augment.auto_augment;
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
    // an optimizer step's batch: --accum-steps micro-batches of --batch-size
    let batch = opts.batch_size * opts.accum_steps;
    let mut l = Loader::new(Arc::new(data), sampler, batch)?.shard(replica, layout.dp)?;
    l.workers = opts.workers;
    l.images = stage == 0;
    Ok(l)
}

/// Linear warm-up over `--warmup` epochs from `--warmup-lr`, then cosine decay to
/// `--min-lr`, per optimizer step: timm's `CosineLRScheduler` ([`LrSchedule::Cosine`]).
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
    Ok(LrSchedule::Cosine {
        warmup: ((opts.warmup as f64 * steps_per_epoch as f64).round() as u64).min(total),
        total,
        min_lr: opts.min_lr,
        warmup_lr: opts.warmup_lr,
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
        clip_grad_norm: opts.clip_grad,
        seed: opts.seed,
        precision,
        ..TrainConfig::default()
    };
    let mut engine = match par {
        Some(par) => Engine::parallel(cfg, tc, par),
        None => Engine::new(cfg, tc),
    }?;
    if let Some(decay) = opts.ema_decay {
        engine.enable_ema(decay, opts.ema_warmup)?;
    }
    Ok(engine)
}

/// Where training starts: resumed from a checkpoint (`--resume`), or fresh, optionally
/// initialised from weights (`--init`; with `--resume auto`, only if there was nothing
/// to resume). Reads only. Returns the schedule the run goes on with: `schedule`, or
/// the older [`LrSchedule::WarmupCosine`] of a checkpoint saved before
/// [`LrSchedule::Cosine`], so that its run continues as it began.
fn resume_or_init(
    trainer: &mut Trainer,
    opts: &TrainOptions,
    cfg: &VitConfig,
    steps_per_epoch: u64,
    schedule: LrSchedule,
) -> Result<LrSchedule> {
    let ckpt_root = opts.checkpoint_root();
    let saved = match &opts.resume {
        Some(resume) => resume_from(trainer, resume, &ckpt_root, cfg, opts, steps_per_epoch)?,
        None => None,
    };
    let resumed = saved.is_some();
    let schedule = match saved.flatten() {
        Some(old @ LrSchedule::WarmupCosine { .. }) => old,
        _ => schedule,
    };
    if let (Some(init), true) = (&opts.init, resumed) {
        trainer.logger.info(format!(
            "--init {} is not used: the run resumes from its checkpoint",
            init.display()
        ));
    } else if let Some(init) = &opts.init {
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
    Ok(schedule)
}

/// The standard hooks: the LR schedule and the metrics on every rank; progress, the
/// JSON-lines file, the plot and TensorBoard's files on rank 0 (every rank has the
/// global metrics); the checkpoint saver unless `--no-save`.
fn add_hooks(
    trainer: &mut Trainer,
    opts: &TrainOptions,
    rank: usize,
    schedule: LrSchedule,
    classes: &[String],
    cfg: &VitConfig,
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
    if opts.clip_grad.is_some() {
        trainer.add_hook(GradNormHook);
    }
    if rank == 0 {
        trainer
            .add_hook(ProgressHook::new(opts.log_interval))
            .add_hook(LogMetricByEpochHook::with_jsonl(
                opts.metrics_path(),
                &history,
            )?)
            .add_hook(PlotHook {
                path: opts.plot_path(),
            });
        if opts.tensorboard {
            trainer.add_hook(TensorBoardHook::new(
                opts.tensorboard_dir(),
                opts.log_interval,
            ));
        }
    }
    if !opts.no_save {
        let mut hook = SaveCheckpointHook::new(
            opts.checkpoint_root(),
            (opts.save_every > 0).then_some(opts.save_every),
            opts.save_every_steps,
            SaveOptions {
                shard_bytes: opts.shard_size_mb << 20,
                keep_last: (opts.keep_last > 0).then_some(opts.keep_last),
                keep_best: opts.keep_best.map(options::KeepBest::rule),
            },
        );
        hook.schedule = Some(schedule);
        hook.classes = classes.to_vec();
        hook.normalize = opts.norm()?;
        hook.run_options = Some(saved_options(opts, cfg)?);
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
        final_ema_test: trainer
            .history()
            .iter()
            .rev()
            .find_map(|m| Some((*m.get("ema_test_loss")?, *m.get("ema_test_acc")?))),
        confusion,
        classes,
        seconds: start.elapsed().as_secs_f64(),
        metrics_path: opts.metrics_path(),
        plot_path: opts.plot_path(),
        stopped: None,
    }
}

/// The options a checkpoint records for a resume: the run's, with the model's
/// dimensions resolved (what a resume must match); machine- and layout-dependent
/// defaults (threads, micro-batches) stay unset to be resolved again where the run
/// continues, and this invocation's `--resume`/`--overwrite` are not recorded.
fn saved_options(
    opts: &TrainOptions,
    cfg: &VitConfig,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    TrainOptions {
        resume: None,
        overwrite: false,
        ..opts.with_model(cfg)
    }
    .to_json()
}
