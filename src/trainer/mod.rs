//! The trainer: `fit` runs epochs of training (and periodic testing) over an
//! [`Engine`], calling [`Hook`]s before and after training, each epoch, each iteration
//! and each test. Metrics, LR scheduling, throughput, logging, plots and progress bars
//! are all hooks, as in Colossal-AI's trainer.
//!
//! Hook call order in `fit`:
//! `before_train`, then per epoch `before_epoch`, per batch `before_iter` and
//! `after_iter`, then (every `test_interval` epochs and after the last)
//! `before_test`, `after_test_iter` per batch, `after_test`, and finally `after_epoch`;
//! `after_train` at the end. Hooks run in the order they were added. Before
//! `after_epoch` the trainer records the epoch's `step` and `time` in its metrics.
//!
//! A stop requested through [`Trainer::stop_flag`] (by code, or by a signal: see
//! [`crate::signals`]) ends `fit` after the current training step, on every rank of a
//! parallel run at the same step: no test and no `after_epoch` for the partial epoch,
//! `after_train` with [`State::stopped`] set (the checkpoint hook saves there), and `fit`
//! returns where it stopped.

mod hooks;
mod logger;
mod plot;
mod progress;
mod tensorboard;
mod timer;

pub use hooks::{
    AccuracyHook, GradNormHook, LogMetricByEpochHook, LossHook, LrSchedulerHook, PlotHook,
    SaveCheckpointHook, ThroughputHook,
};
pub use logger::{init_logging, init_stdout, Logger, Verbosity};
pub use plot::plot_metrics;
pub use progress::{LogInterval, ProgressHook, MAX_LOG_INTERVAL_S};
pub use tensorboard::TensorBoardHook;
pub use timer::Timers;

use crate::data::{Batch, Loader};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::host::unix_time;
use crate::metrics::RunningMean;
use crate::signals::{StopFlag, StopReason};
use std::any::Any;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Metric name → value for the current epoch (`epoch`, `train_loss`, `train_acc`,
/// `test_loss`, `test_acc`, `lr`, `images_per_s`, … as the hooks write them; `step`,
/// the optimizer steps so far, and `time`, unix seconds, as the epoch ends).
pub type Metrics = BTreeMap<String, f64>;

/// Everything hooks may read or change during `fit`.
pub struct State<'e> {
    pub engine: &'e mut Engine,
    /// Current epoch (0-based) and the number of epochs of this `fit`.
    pub epoch: usize,
    pub epochs: usize,
    /// Batch index within the epoch, and batches per epoch.
    pub iter: usize,
    pub iters_per_epoch: usize,
    /// This epoch's metrics, kept current by the metric hooks after every batch.
    pub metrics: Metrics,
    /// The metrics of every finished epoch (the current one is pushed before
    /// `after_epoch`).
    pub history: Vec<Metrics>,
    /// The epoch's running means by name (the train loss and accuracy hooks keep theirs
    /// here): emptied as an epoch starts, saved with a mid-epoch checkpoint and
    /// restored by a resume, so the resumed epoch's averages are an uninterrupted run's.
    pub running: BTreeMap<String, RunningMean>,
    pub timers: Timers,
    pub logger: Logger,
    /// Set when training stops early, before `after_train`.
    pub stopped: Option<Stopped>,
}

/// Where and why `fit` stopped early.
#[derive(Clone, Debug, PartialEq)]
pub struct Stopped {
    pub reason: StopReason,
    /// The position a resume continues from: epoch (0-based) and the next batch in it.
    pub epoch: usize,
    pub batch: usize,
    /// Updates applied.
    pub step: u64,
    /// The checkpoint saved at that position (by [`SaveCheckpointHook`]), if any.
    pub checkpoint: Option<PathBuf>,
}

/// One batch's result, passed to `after_iter` and `after_test_iter`: the global
/// batch's loss, labels and predictions (the same on every rank of a parallel run).
pub type StepOutput = crate::engine::StepResult;

/// A callback of the training loop. Every method defaults to doing nothing; an error
/// stops `fit` and is returned from it.
#[allow(unused_variables)]
pub trait Hook: Any {
    fn before_train(&mut self, s: &mut State) -> Result<()> {
        Ok(())
    }
    fn after_train(&mut self, s: &mut State) -> Result<()> {
        Ok(())
    }
    fn before_epoch(&mut self, s: &mut State) -> Result<()> {
        Ok(())
    }
    fn after_epoch(&mut self, s: &mut State) -> Result<()> {
        Ok(())
    }
    fn before_iter(&mut self, s: &mut State) -> Result<()> {
        Ok(())
    }
    fn after_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        Ok(())
    }
    fn before_test(&mut self, s: &mut State) -> Result<()> {
        Ok(())
    }
    fn after_test_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        Ok(())
    }
    fn after_test(&mut self, s: &mut State) -> Result<()> {
        Ok(())
    }
}

/// Runs training with hooks over an engine it owns.
pub struct Trainer {
    pub engine: Engine,
    pub logger: Logger,
    /// Where `fit` starts: epoch and batch within it (set by [`Trainer::resume`]).
    pub start: (usize, usize),
    hooks: Vec<Box<dyn Hook>>,
    history: Vec<Metrics>,
    /// The running means of the epoch `fit` starts in the middle of (a resume's).
    running: BTreeMap<String, RunningMean>,
    timers: Timers,
}

/// Calls one hook method on every hook, in order.
macro_rules! call {
    ($hooks:expr, $method:ident($($arg:expr),*)) => {
        for h in $hooks.iter_mut() {
            h.$method($($arg),*)?;
        }
    };
}

impl Trainer {
    pub fn new(engine: Engine, logger: Logger) -> Trainer {
        Trainer {
            engine,
            logger,
            start: (0, 0),
            hooks: Vec::new(),
            history: Vec::new(),
            running: BTreeMap::new(),
            timers: Timers::default(),
        }
    }

    pub fn add_hook(&mut self, hook: impl Hook) -> &mut Self {
        self.hooks.push(Box::new(hook));
        self
    }

    /// The first added hook of type `H` (to read what it collected after `fit`).
    pub fn hook<H: Hook>(&self) -> Option<&H> {
        self.hooks
            .iter()
            .find_map(|h| (h.as_ref() as &dyn Any).downcast_ref::<H>())
    }

    /// Continues from a checkpoint's training state (already loaded into the engine):
    /// `fit` starts at its epoch and batch, with its metrics history and the running
    /// means of a partly trained epoch.
    pub fn resume(&mut self, state: &crate::checkpoint::TrainingState) {
        self.start = (state.epoch as usize, state.batch as usize);
        self.history = state.history.clone();
        self.running = state.running.clone();
    }

    /// The flag that stops `fit` after the current step (a clone: request a stop
    /// through it from anywhere). It is the engine's ([`Engine::stop_flag`]).
    pub fn stop_flag(&self) -> StopFlag {
        self.engine.stop_flag().clone()
    }

    /// Per-epoch metrics of every `fit` so far.
    pub fn history(&self) -> &[Metrics] {
        &self.history
    }

    /// The named timers (`train-epoch`, `train-step`, `test-step`).
    pub fn timers(&self) -> &Timers {
        &self.timers
    }

    /// Trains for `epochs` passes over `train`, testing on `test` every
    /// `test_interval` epochs and after the last one. Returns where it stopped if a
    /// stop was requested ([`Trainer::stop_flag`]) before the end.
    pub fn fit(
        &mut self,
        train: &Loader,
        epochs: usize,
        test: Option<&Loader>,
        test_interval: usize,
    ) -> Result<Option<Stopped>> {
        if test_interval == 0 {
            return Err(Error::Config("test_interval must be at least 1".into()));
        }
        let Trainer {
            engine,
            logger,
            start,
            hooks,
            history,
            running,
            timers,
        } = self;
        let mut s = State {
            engine,
            epoch: 0,
            epochs,
            iter: 0,
            iters_per_epoch: train.batches_per_epoch(),
            metrics: Metrics::new(),
            history: std::mem::take(history),
            running: std::mem::take(running),
            timers: std::mem::take(timers),
            logger: logger.clone(),
            stopped: None,
        };
        let result = run(&mut s, hooks, *start, train, test, test_interval);
        *history = s.history;
        *timers = s.timers;
        result.map(|()| s.stopped)
    }
}

fn run(
    s: &mut State,
    hooks: &mut [Box<dyn Hook>],
    (start_epoch, start_batch): (usize, usize),
    train: &Loader,
    test: Option<&Loader>,
    test_interval: usize,
) -> Result<()> {
    call!(hooks, before_train(s));
    'epochs: for epoch in start_epoch..s.epochs {
        let first = if epoch == start_epoch { start_batch } else { 0 };
        if first == 0 {
            s.running.clear();
        }
        s.epoch = epoch;
        s.metrics = Metrics::from([("epoch".to_string(), (epoch + 1) as f64)]);
        s.engine.train();
        s.timers.start("train-epoch");
        call!(hooks, before_epoch(s));
        for (i, batch) in train.epoch_from(epoch as u64, first).enumerate() {
            let b = batch?;
            s.iter = first + i;
            call!(hooks, before_iter(s));
            if let Some(reason) = run_batch(s, hooks, b, true)? {
                stop_here(s, reason);
                break 'epochs;
            }
        }
        s.timers.stop("train-epoch");
        if let Some(test) =
            test.filter(|_| (epoch + 1) % test_interval == 0 || epoch + 1 == s.epochs)
        {
            call!(hooks, before_test(s));
            s.engine.eval();
            for batch in test.epoch(0) {
                run_batch(s, hooks, batch?, false)?;
            }
            if s.engine.ema().is_some() {
                test_ema(s, test)?;
            }
            s.engine.train();
            call!(hooks, after_test(s));
        }
        s.metrics
            .insert("step".into(), s.engine.step_count() as f64);
        s.metrics.insert("time".into(), unix_time());
        s.history.push(s.metrics.clone());
        call!(hooks, after_epoch(s));
    }
    call!(hooks, after_train(s));
    Ok(())
}

/// The test pass of the weights' moving average: `ema_test_loss` (mean per image) and
/// `ema_test_acc`. The average is swapped in for the pass and out again, error or not.
fn test_ema(s: &mut State, test: &Loader) -> Result<()> {
    s.engine.swap_ema()?;
    let (mut loss, mut correct) = (RunningMean::default(), 0usize);
    let mut count = 0usize;
    let pass = test.epoch(0).try_for_each(|batch| {
        let out = s.engine.test_batch(batch?)?;
        loss.add(out.loss as f64, out.labels.len());
        let hits = out.predictions.iter().zip(&out.labels);
        correct += hits.filter(|(p, y)| p == y).count();
        count += out.labels.len();
        Ok::<(), Error>(())
    });
    s.engine.swap_ema()?;
    pass?;
    s.metrics.insert("ema_test_loss".into(), loss.mean());
    let acc = correct as f64 / count.max(1) as f64;
    s.metrics.insert("ema_test_acc".into(), acc);
    Ok(())
}

/// Records that training stops after the step just done (every rank logs it).
fn stop_here(s: &mut State, reason: StopReason) {
    let stopped = Stopped {
        reason,
        epoch: s.epoch,
        batch: s.iter + 1,
        step: s.engine.step_count(),
        checkpoint: None,
    };
    s.logger.warn(format!(
        "stopping at step {} (epoch {}, batch {} of {}): {reason}",
        stopped.step,
        stopped.epoch + 1,
        stopped.batch,
        s.iters_per_epoch
    ));
    s.stopped = Some(stopped);
}

/// One batch: a training step ([`Engine::train_batch`]; timed as `train-step`, then
/// `after_iter`) or a test step ([`Engine::test_batch`]; timed as `test-step`, then
/// `after_test_iter`). A stop requested by the training step's end.
fn run_batch(
    s: &mut State,
    hooks: &mut [Box<dyn Hook>],
    b: Batch,
    train: bool,
) -> Result<Option<StopReason>> {
    let timer = if train { "train-step" } else { "test-step" };
    s.timers.start(timer);
    let out = if train {
        s.engine.train_batch(b)
    } else {
        s.engine.test_batch(b)
    };
    s.timers.stop(timer);
    let out = out?;
    if train {
        call!(hooks, after_iter(s, &out));
    } else {
        call!(hooks, after_test_iter(s, &out));
    }
    Ok(out.stop)
}
