//! The standard hooks. Metric hooks keep their metric current in `State::metrics`
//! after every batch, so hooks that read metrics (logging, plots, progress bars) do
//! not depend on the order hooks were added in.

use super::{plot_metrics, Hook, Metrics, State, StepOutput};
use crate::checkpoint::{checkpoint_name, AsyncSaver, SaveOptions, TrainingState};
use crate::error::{Error, Result};
use crate::metrics::{ConfusionMatrix, RunningMean};
use crate::optim::LrSchedule;
use std::io::Write;
use std::path::PathBuf;

/// The epoch's running mean `name` (in `State::running`, so that a mid-epoch
/// checkpoint carries it).
fn running<'s>(s: &'s mut State, name: &str) -> &'s mut RunningMean {
    s.running.entry(name.to_string()).or_default()
}

/// Mean loss per image: `train_loss` over the epoch, `test_loss` over each test.
#[derive(Debug, Default)]
pub struct LossHook {
    test: RunningMean,
}

impl Hook for LossHook {
    fn after_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        let v = running(s, "train_loss").add(out.loss as f64, out.labels.len());
        s.metrics.insert("train_loss".into(), v);
        Ok(())
    }
    fn before_test(&mut self, _: &mut State) -> Result<()> {
        self.test = RunningMean::default();
        Ok(())
    }
    fn after_test_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        let v = self.test.add(out.loss as f64, out.labels.len());
        s.metrics.insert("test_loss".into(), v);
        Ok(())
    }
}

/// The global gradient norm before clipping (the engine's, when it clips), as the
/// epoch's mean `grad_norm` over its updates.
#[derive(Debug, Default)]
pub struct GradNormHook;

impl Hook for GradNormHook {
    fn after_iter(&mut self, s: &mut State, _: &StepOutput) -> Result<()> {
        if let Some(norm) = s.engine.grad_norm() {
            let v = running(s, "grad_norm").add(norm as f64, 1);
            s.metrics.insert("grad_norm".into(), v);
        }
        Ok(())
    }
}

/// Top-1 accuracy as a fraction: `train_acc` and `test_acc`; keeps the confusion
/// matrix of the last test.
#[derive(Debug, Default)]
pub struct AccuracyHook {
    /// The confusion matrix of the most recent test.
    pub confusion: Option<ConfusionMatrix>,
}

fn correct(out: &StepOutput) -> usize {
    out.predictions
        .iter()
        .zip(&out.labels)
        .filter(|(p, y)| p == y)
        .count()
}

impl Hook for AccuracyHook {
    fn after_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        let n = out.labels.len().max(1);
        let v = running(s, "train_acc").add(correct(out) as f64 / n as f64, out.labels.len());
        s.metrics.insert("train_acc".into(), v);
        Ok(())
    }
    fn before_test(&mut self, _: &mut State) -> Result<()> {
        self.confusion = None;
        Ok(())
    }
    fn after_test_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        let classes = s.engine.model.config.num_classes;
        let c = self
            .confusion
            .get_or_insert_with(|| ConfusionMatrix::new(classes));
        c.add(&out.labels, &out.predictions);
        s.metrics.insert("test_acc".into(), c.accuracy());
        Ok(())
    }
}

/// Sets the engine's learning rate from a schedule, per epoch or per step, and records
/// it as `lr`. The schedule scales the engine's base rate (`TrainConfig::lr`); steps
/// are counted as the engine's update count, so a resumed run continues the schedule.
#[derive(Clone, Debug)]
pub struct LrSchedulerHook {
    pub schedule: LrSchedule,
    pub by_epoch: bool,
}

impl LrSchedulerHook {
    fn set(&self, s: &mut State, at: u64) {
        let lr = self.schedule.lr(s.engine.config.lr, at);
        s.engine.set_lr(lr);
        s.metrics.insert("lr".into(), lr as f64);
    }
}

impl Hook for LrSchedulerHook {
    fn before_epoch(&mut self, s: &mut State) -> Result<()> {
        if self.by_epoch {
            self.set(s, s.epoch as u64);
        }
        Ok(())
    }
    fn before_iter(&mut self, s: &mut State) -> Result<()> {
        if !self.by_epoch {
            self.set(s, s.engine.step_count());
        }
        Ok(())
    }
}

/// Training images per second over the epoch's wall time (data loading included) as
/// `images_per_s`, and the mean time of the train step (forward, backward, update)
/// over the run so far as `step_s`.
#[derive(Debug, Default)]
pub struct ThroughputHook {
    images: usize,
}

impl Hook for ThroughputHook {
    fn before_epoch(&mut self, _: &mut State) -> Result<()> {
        *self = ThroughputHook::default();
        Ok(())
    }
    fn after_iter(&mut self, s: &mut State, out: &StepOutput) -> Result<()> {
        self.images += out.labels.len();
        let wall = s.timers.elapsed("train-epoch").max(1e-9);
        s.metrics
            .insert("images_per_s".into(), self.images as f64 / wall);
        Ok(())
    }
    fn after_epoch(&mut self, s: &mut State) -> Result<()> {
        s.metrics
            .insert("step_s".into(), s.timers.mean("train-step"));
        Ok(())
    }
}

/// At the end of each epoch, logs its metrics in one line and (on rank 0) appends
/// them as a JSON object to a JSON-lines file.
#[derive(Debug, Default)]
pub struct LogMetricByEpochHook {
    jsonl: Option<(PathBuf, std::fs::File)>,
}

impl LogMetricByEpochHook {
    /// Logs only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs and writes `path` (created or truncated now, starting with the lines of
    /// `history`: the epochs of a resumed run so far).
    pub fn with_jsonl(path: impl Into<PathBuf>, history: &[Metrics]) -> Result<Self> {
        let path = path.into();
        let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        for m in history {
            f.write_all(json_line(m).as_bytes())
                .map_err(|e| Error::io(&path, e))?;
        }
        Ok(LogMetricByEpochHook {
            jsonl: Some((path, f)),
        })
    }
}

/// One epoch's metrics as a JSON object on one line, each number at its precision:
/// `epoch` and `step` as integers, `time` (unix seconds) to the millisecond,
/// accuracies (`*_acc`: exact ratios of counts) as f64s, and the rest (losses, lr,
/// rates: f32 quantities, or means of them) as the shortest decimal that reads back as
/// the same f32 (`lr` 0.002, not 0.0020000000949949026). A non-finite value is `null`.
fn json_line(metrics: &Metrics) -> String {
    let mut obj = serde_json::Map::new();
    for (k, &v) in metrics {
        let value = match k.as_str() {
            "epoch" | "step" => serde_json::Value::from(v as u64),
            "time" => serde_json::Value::from((v * 1e3).round() / 1e3),
            k if k.ends_with("_acc") => serde_json::Value::from(v),
            _ => serde_json::Value::from(f32_precision(v)),
        };
        obj.insert(k.clone(), value);
    }
    let mut line = serde_json::Value::Object(obj).to_string();
    line.push('\n');
    line
}

/// The f64 nearest to the shortest decimal of `v` as an f32: printed as an f64 (the
/// shortest decimal that reads back as it), that is the f32's shortest decimal.
fn f32_precision(v: f64) -> f64 {
    let short = (v as f32).to_string();
    short.parse().unwrap_or(v)
}

/// `epoch   3/20  step 69  train_loss 0.4123  train_acc 87.12%  …`
fn human_line(s: &State) -> String {
    const FIRST: [&str; 7] = [
        "step",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "images_per_s",
    ];
    let mut line = format!("epoch {:>3}/{}", s.epoch + 1, s.epochs);
    let known = FIRST.iter().filter_map(|k| Some((*k, *s.metrics.get(*k)?)));
    let rest = s
        .metrics
        .iter()
        .filter(|(k, _)| !FIRST.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), *v));
    for (k, v) in known.chain(rest) {
        match k {
            "epoch" | "time" => {}
            "step" => line += &format!("  step {v:.0}"),
            k if k.ends_with("_acc") => line += &format!("  {k} {:6.2}%", 100.0 * v),
            "lr" => line += &format!("  lr {v:.3e}"),
            "images_per_s" => line += &format!("  images_per_s {v:.0}"),
            _ => line += &format!("  {k} {v:.4}"),
        }
    }
    line
}

impl Hook for LogMetricByEpochHook {
    fn after_epoch(&mut self, s: &mut State) -> Result<()> {
        s.logger.info(human_line(s));
        if let Some((path, f)) = self.jsonl.as_mut().filter(|_| s.logger.rank == 0) {
            f.write_all(json_line(&s.metrics).as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| Error::io(path.as_path(), e))?;
        }
        Ok(())
    }
}

/// Redraws the training-curve PNG after every epoch (rank 0).
#[derive(Debug)]
pub struct PlotHook {
    pub path: PathBuf,
}

impl Hook for PlotHook {
    fn after_epoch(&mut self, s: &mut State) -> Result<()> {
        if s.logger.rank == 0 {
            plot_metrics(&s.history, &self.path)?;
        }
        Ok(())
    }
}

/// Saves a checkpoint every N epochs and/or every N steps, asynchronously: the
/// parameters and optimizer state are snapshotted (copy-on-write, no copy unless
/// training updates them before the writer is done) and written on a background
/// thread while training goes on. A save waits for the previous one (and
/// `after_train` for the last one); a failed save's error stops training. When
/// training stops early ([`State::stopped`]), `after_train` saves at the stop's
/// position (unless a save of that step is under way) and waits for it.
#[derive(Debug)]
pub struct SaveCheckpointHook {
    pub root: PathBuf,
    pub every_epochs: Option<usize>,
    pub every_steps: Option<u64>,
    pub options: SaveOptions,
    /// Recorded in the checkpoint's training state.
    pub schedule: Option<LrSchedule>,
    saver: AsyncSaver,
    /// Class names, recorded for inference.
    pub classes: Vec<String>,
    /// The images' normalisation, recorded for inference.
    pub normalize: crate::data::Normalize,
    /// The run's options, recorded for a resume (`TrainingState::options`).
    pub run_options: Option<serde_json::Map<String, serde_json::Value>>,
    /// Saves started (numbers each save, the same on every rank).
    saves: u64,
    /// The step of the last save started.
    last_step: Option<u64>,
}

impl SaveCheckpointHook {
    pub fn new(
        root: impl Into<PathBuf>,
        every_epochs: Option<usize>,
        every_steps: Option<u64>,
        options: SaveOptions,
    ) -> Self {
        SaveCheckpointHook {
            root: root.into(),
            every_epochs,
            every_steps,
            options,
            schedule: None,
            saver: AsyncSaver::default(),
            classes: Vec::new(),
            normalize: crate::data::Normalize::default(),
            run_options: None,
            saves: 0,
            last_step: None,
        }
    }

    /// Starts a save positioned at (`epoch`, `batch`) in the background (where a
    /// resume continues) and logs it.
    fn save(&mut self, s: &mut State, epoch: usize, batch: usize) -> Result<()> {
        let dir = self.start_save(s, epoch, batch)?;
        s.logger.info(format!(
            "saving checkpoint {} (in the background)",
            dir.display()
        ));
        Ok(())
    }

    /// Starts a save positioned at (`epoch`, `batch`); its directory.
    fn start_save(&mut self, s: &mut State, epoch: usize, batch: usize) -> Result<PathBuf> {
        let training = TrainingState {
            epoch: epoch as u64,
            batch: batch as u64,
            schedule: self.schedule,
            history: s.history.clone(),
            classes: self.classes.clone(),
            normalize: self.normalize,
            epochs: s.epochs as u64,
            batches_per_epoch: s.iters_per_epoch as u64,
            options: self.run_options.clone(),
            running: match batch {
                0 => Default::default(),
                _ => s.running.clone(),
            },
            ..TrainingState::default()
        };
        let name = checkpoint_name(s.engine.step_count());
        let mut snapshot = s.engine.snapshot(training);
        snapshot.save = self.saves;
        self.saves += 1;
        self.last_step = Some(s.engine.step_count());
        if let Some(done) = self.saver.save(
            snapshot,
            self.root.clone(),
            name.clone(),
            self.options.clone(),
        )? {
            tracing::debug!("checkpoint committed: {}", done.display());
        }
        Ok(self.root.join(name))
    }

    /// After a stop: a checkpoint at its position, written before this returns.
    fn save_at_stop(&mut self, s: &mut State) -> Result<()> {
        let Some((epoch, batch)) = s.stopped.as_ref().map(|t| (t.epoch, t.batch)) else {
            return Ok(());
        };
        let step = s.engine.step_count();
        let dir = match self.last_step == Some(step) {
            true => self.root.join(checkpoint_name(step)), // saving it already
            false => self.start_save(s, epoch, batch)?,
        };
        self.saver.wait()?;
        s.logger.info(format!("saved checkpoint {}", dir.display()));
        if let Some(t) = s.stopped.as_mut() {
            t.checkpoint = Some(dir);
        }
        Ok(())
    }
}

impl Hook for SaveCheckpointHook {
    fn after_iter(&mut self, s: &mut State, _: &StepOutput) -> Result<()> {
        let due = self
            .every_steps
            .is_some_and(|n| n > 0 && s.engine.step_count().is_multiple_of(n));
        if due {
            self.save(s, s.epoch, s.iter + 1)?;
        }
        Ok(())
    }
    fn after_epoch(&mut self, s: &mut State) -> Result<()> {
        let due = self
            .every_epochs
            .is_some_and(|n| n > 0 && (s.epoch + 1).is_multiple_of(n));
        if due || s.epoch + 1 == s.epochs {
            self.save(s, s.epoch + 1, 0)?;
        }
        Ok(())
    }
    fn after_train(&mut self, s: &mut State) -> Result<()> {
        self.save_at_stop(s)?;
        self.saver.wait()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_print_numbers_at_their_precision() {
        let m = Metrics::from([
            ("epoch".to_string(), 2.0),
            ("step".to_string(), 46.0),
            ("time".to_string(), 1_790_000_000.123_456_7),
            ("lr".to_string(), 2e-3f32 as f64),
            ("train_acc".to_string(), 1252.0 / 1437.0),
            ("train_loss".to_string(), f64::NAN),
        ]);
        assert_eq!(
            json_line(&m),
            "{\"epoch\":2,\"lr\":0.002,\"step\":46,\"time\":1790000000.123,\"train_acc\":0.8712595685455811,\"train_loss\":null}\n"
        );
        let back: serde_json::Value = serde_json::from_str(&json_line(&m)).unwrap();
        assert_eq!(back["lr"].as_f64().unwrap() as f32, 2e-3f32);
        assert_eq!(back["train_acc"].as_f64().unwrap(), 1252.0 / 1437.0);
    }
}
