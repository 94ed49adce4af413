//! The training engine: one model, its parameters and optimizer, and the step that
//! ties forward, loss, backward and update together.

mod parallel;

pub use parallel::Parallel;

use crate::autograd::{Graph, ParamStore, Precision, Var};
use crate::data::{Batch, RawImages};
use crate::dist::average_gradients;
use crate::error::{Error, Result};
use crate::nn::{ForwardCtx, Vit, VitConfig};
use crate::optim::{clip_grad_norm, Ema, Optimizer, OptimizerKind};
use crate::signals::{StopFlag, StopReason};
use crate::tensor::Tensor;
use crate::tensor::{DType, Device};

/// Hyper-parameters of the update rule.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    /// Base learning rate (the rate until something calls [`Engine::set_lr`]; an LR
    /// scheduler hook scales it).
    pub lr: f32,
    pub weight_decay: f32,
    pub label_smoothing: f32,
    /// Clip gradients to this global L2 norm (none when `None`).
    pub clip_grad_norm: Option<f32>,
    /// Seed of parameter initialisation and dropout.
    pub seed: u64,
    /// The linear layers' arithmetic (f32, or bf16 mixed precision).
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: OptimizerKind::adamw(),
            lr: 1e-3,
            weight_decay: 0.05,
            label_smoothing: 0.0,
            clip_grad_norm: None,
            seed: 0,
            precision: Precision::F32,
        }
    }
}

/// Loss and accuracy of one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchStats {
    pub loss: f32,
    pub correct: usize,
    pub count: usize,
}

/// A training or test step's result for the whole (global) batch, the same on every
/// rank of a parallel run: the mean loss, and each sample's label and predicted class.
#[derive(Clone, Debug, PartialEq)]
pub struct StepResult {
    pub loss: f32,
    pub labels: Vec<usize>,
    pub predictions: Vec<usize>,
    /// After a training step: a stop was requested ([`Engine::stop_flag`]) on some rank
    /// by then — in a parallel run every rank learns it at the same step, through the
    /// step's metrics all-reduce (the first requesting rank's reason).
    pub stop: Option<StopReason>,
}

/// The model's output for a batch: the logits `[batch, classes]` (a copy; the engine
/// keeps the recorded graph for `criterion` and `backward`).
#[derive(Clone, Debug)]
pub struct Output {
    pub logits: Tensor,
    var: Var,
    id: u64,
}

/// A loss value returned by [`Engine::criterion`], to pass to [`Engine::backward`].
#[derive(Clone, Copy, Debug)]
pub struct Loss {
    pub value: f32,
    var: Var,
    id: u64,
}

/// The graph of the last forward pass, holding the parameters until backward ends.
struct Pending {
    graph: Graph<'static>,
    id: u64,
}

/// A model with its parameters and optimizer, driven like Colossal-AI's engine:
///
/// ```
/// # fn main() -> ferrovit::Result<()> {
/// use ferrovit::data::{default_data_dir, Dataset, Loader, Sampler};
/// use ferrovit::engine::{Engine, TrainConfig};
/// use ferrovit::VitConfig;
/// let (train, _) = Dataset::cifar_dir(&default_data_dir())?;
/// let n = train.len();
/// let loader = Loader::new(std::sync::Arc::new(train), Sampler::new(n, true, 0), 64)?;
/// let model = VitConfig { dim: 32, depth: 1, mlp_dim: 32, ..VitConfig::preset("vit_lite_depth7_patch4_32")? };
/// let mut engine = Engine::new(&model, TrainConfig::default())?;
/// engine.train();
/// for batch in loader.epoch(0).take(3) {
///     let batch = batch?;
///     engine.zero_grad()?;
///     let output = engine.forward(batch.images, &batch.samples)?;
///     let loss = engine.criterion(&output, &batch.labels)?;
///     engine.backward(&loss)?;
///     engine.step()?;
/// }
/// assert_eq!(engine.step_count(), 3);
/// # Ok(()) }
/// ```
pub struct Engine {
    pub model: Vit,
    pub optimizer: Optimizer,
    pub config: TrainConfig,
    /// Empty while `pending` holds the parameters.
    params: ParamStore,
    pending: Option<Pending>,
    next_id: u64,
    training: bool,
    lr: f32,
    step: u64,
    /// This rank's place in a parallel run (`None`: one rank, the whole model).
    par: Option<Parallel>,
    /// Read at every training step into [`StepResult::stop`].
    stop: StopFlag,
    /// The global gradient norm before clipping, of the last update (when clipping).
    grad_norm: Option<f32>,
    /// The moving average of this rank's weights (`--ema-decay`), updated after each step.
    ema: Option<Ema>,
}

/// Dropout seed of a step: the run's seed and the update count.
fn dropout_seed(seed: u64, step: u64) -> u64 {
    seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Refuses a model whose parameters, gradients and optimizer state (and an EMA of the
/// weights when `ema`) cannot fit in this machine's memory, before any of it is
/// allocated.
fn check_fits(model: &VitConfig, config: &TrainConfig, ema: bool) -> Result<()> {
    check_fits_in(model, config, ema, crate::backend::cpu::physical_memory())
}

/// [`check_fits`] against `have` bytes.
fn check_fits_in(
    model: &VitConfig,
    config: &TrainConfig,
    ema: bool,
    have: Option<u64>,
) -> Result<()> {
    let copies = 2 + config.optimizer.state_names().len() as u64 + u64::from(ema);
    let what = match ema {
        true => "weights, gradients, optimizer state and their EMA",
        false => "weights, gradients and optimizer state",
    };
    model.check_fits_in(4 * copies, what, have)
}

impl Engine {
    pub fn new(model: &VitConfig, config: TrainConfig) -> Result<Self> {
        Engine::build(model, config, None)
    }

    /// One rank of a parallel run: holds only its stage's part of the model (with the
    /// parameters the whole model would start from) and runs its share of each step
    /// with [`Engine::train_batch`] / [`Engine::test_batch`].
    pub fn parallel(model: &VitConfig, config: TrainConfig, par: Parallel) -> Result<Self> {
        Engine::build(model, config, Some(par))
    }

    fn build(model: &VitConfig, config: TrainConfig, par: Option<Parallel>) -> Result<Self> {
        check_fits(model, &config, false)?;
        let mut params = ParamStore::new();
        let part = match &par {
            Some(p) => {
                if p.layout.stages.last().map(|r| r.end) != Some(model.depth) {
                    return Err(Error::Config(format!(
                        "layout {} does not fit a model of depth {}",
                        p.layout.describe(),
                        model.depth
                    )));
                }
                p.layout.part(p.coords().1)
            }
            None => crate::nn::Part::whole(model.depth),
        };
        let model = Vit::new_part(model, &mut params, config.seed, part)?;
        let optimizer = Optimizer::new(config.optimizer, config.weight_decay, &params)?;
        Ok(Engine {
            model,
            optimizer,
            lr: config.lr,
            config,
            params,
            pending: None,
            next_id: 0,
            training: true,
            step: 0,
            par,
            stop: StopFlag::new(),
            grad_norm: None,
            ema: None,
        })
    }

    /// Moves the parameters, their gradients and the optimizer state to `device`
    /// (batches, and in a parallel run the tensors exchanged with other ranks, follow
    /// them automatically).
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        self.finish();
        self.params.to_device(device)?;
        if let Some(ema) = &mut self.ema {
            ema.to_device(device)?;
        }
        self.optimizer.to_device(device)
    }

    /// Keeps an exponential moving average of the weights from now on (timm's
    /// `ModelEmaV3` with `decay`, and its warm-up when `warmup`), starting from the
    /// current weights; a checkpoint with an EMA loaded afterwards restores it.
    pub fn enable_ema(&mut self, decay: f32, warmup: bool) -> Result<()> {
        check_fits(&self.model.config, &self.config, true)?;
        self.finish();
        self.ema = Some(Ema::new(decay, warmup, &self.params)?);
        Ok(())
    }

    /// The moving average of the weights, when kept.
    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    pub(crate) fn ema_mut(&mut self) -> Option<&mut Ema> {
        self.ema.as_mut()
    }

    /// Exchanges the EMA with the weights (a second call restores them): the test
    /// pass of the averaged weights runs the model as it is. An error without an EMA.
    pub fn swap_ema(&mut self) -> Result<()> {
        self.finish();
        let ema = self
            .ema
            .as_mut()
            .ok_or_else(|| Error::Config("this run keeps no EMA of the weights".into()))?;
        ema.swap(&mut self.params);
        Ok(())
    }

    /// The EMA update after optimizer step `self.step`.
    fn update_ema(&mut self) -> Result<()> {
        match &mut self.ema {
            Some(ema) => ema.update(&self.params, self.step),
            None => Ok(()),
        }
    }

    /// Where the parameters are.
    pub fn device(&self) -> Device {
        self.params_device()
    }

    /// This rank's place in a parallel run, if any.
    pub fn parallel_info(&self) -> Option<&Parallel> {
        self.par.as_ref()
    }

    pub fn parallel_info_mut(&mut self) -> Option<&mut Parallel> {
        self.par.as_mut()
    }

    /// The flag a training step reports in [`StepResult::stop`]: request a stop
    /// through it (or a clone).
    pub fn stop_flag(&self) -> &StopFlag {
        &self.stop
    }

    /// Reports `flag` instead (one flag shared by several ranks, or by a signal handler).
    pub fn set_stop_flag(&mut self, flag: StopFlag) {
        self.stop = flag;
    }

    pub fn params_device(&self) -> Device {
        self.params
            .iter()
            .next()
            .map_or(Device::Cpu, |p| p.value.device())
    }

    /// The tutorial calls (`forward`, `criterion`, `backward`) run the whole model on
    /// this rank: one rank, or a data-parallel replica.
    fn whole_model(&self) -> Result<()> {
        match &self.par {
            Some(p) if p.layout.pp > 1 => Err(Error::Config(format!(
                "forward/criterion/backward need the whole model, but this rank holds one stage of {}; use train_batch",
                p.layout.describe()
            ))),
            _ => Ok(()),
        }
    }

    /// Training mode: dropout on, `forward` records for `backward`.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Evaluation mode: dropout off.
    pub fn eval(&mut self) {
        self.training = false;
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets the update count (when resuming: it keys dropout and the LR schedule).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// The learning rate the next update will use.
    pub fn lr(&self) -> f32 {
        self.lr
    }

    pub fn set_lr(&mut self, lr: f32) {
        self.lr = lr;
    }

    /// The global L2 norm of the last update's gradients before clipping (over the
    /// whole model in a parallel run); `None` unless `TrainConfig::clip_grad_norm` is set.
    pub fn grad_norm(&self) -> Option<f32> {
        self.grad_norm
    }

    /// The parameters (and their gradients).
    pub fn params(&self) -> &ParamStore {
        match &self.pending {
            Some(p) => p.graph.store(),
            None => &self.params,
        }
    }

    /// The parameters, mutably; discards a forward pass that was not backpropagated.
    pub fn params_mut(&mut self) -> &mut ParamStore {
        self.finish();
        &mut self.params
    }

    /// Ends the pending graph (if any), taking the parameters back.
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            if let Some(store) = p.graph.into_store() {
                self.params = store;
            }
        }
    }

    /// Sets every parameter gradient to zero.
    pub fn zero_grad(&mut self) -> Result<()> {
        self.params_mut().zero_grad()
    }

    /// Runs the model on images `[b, 3, H, W]`; `samples` are the global dataset
    /// indices of the batch (dropout masks are keyed by them and the step number).
    pub fn forward(&mut self, images: Tensor, samples: &[u64]) -> Result<Output> {
        self.finish();
        self.whole_model()?;
        let ctx = if self.training {
            ForwardCtx::train(dropout_seed(self.config.seed, self.step), samples.to_vec())
        } else {
            ForwardCtx::eval(samples.len())
        };
        let images = images.to_device(self.params_device())?;
        let mut graph = Graph::owning(std::mem::take(&mut self.params));
        graph.set_precision(self.config.precision);
        let result = self.model.forward(&mut graph, images, &ctx);
        let id = self.next_id;
        self.next_id += 1;
        self.pending = Some(Pending { graph, id });
        let var = result?;
        let logits = self.graph()?.value(var).clone();
        Ok(Output { logits, var, id })
    }

    fn graph(&mut self) -> Result<&mut Graph<'static>> {
        self.pending
            .as_mut()
            .map(|p| &mut p.graph)
            .ok_or_else(|| Error::Graph("no forward pass to continue: call forward first".into()))
    }

    fn check(&self, id: u64) -> Result<()> {
        match &self.pending {
            Some(p) if p.id == id => Ok(()),
            _ => Err(Error::Graph(
                "this output belongs to an earlier forward pass (each forward replaces the last)"
                    .into(),
            )),
        }
    }

    /// Softmax cross-entropy of the output against `labels` (with the configured label
    /// smoothing while training).
    pub fn criterion(&mut self, output: &Output, labels: &[usize]) -> Result<Loss> {
        self.loss_of(output, |graph, smoothing| {
            graph.cross_entropy(output.var, labels, smoothing)
        })
    }

    /// The loss of a whole batch: [`Engine::criterion`], or under Mixup/CutMix
    /// cross-entropy against the batch's soft targets (label smoothing folded in).
    fn batch_criterion(&mut self, output: &Output, batch: &Batch) -> Result<Loss> {
        self.loss_of(output, |graph, smoothing| {
            batch_loss(graph, output.var, batch, 0..batch.labels.len(), smoothing)
        })
    }

    /// The loss `build` adds to the output's graph, given the label smoothing (the
    /// configured one while training, none in evaluation).
    fn loss_of(
        &mut self,
        output: &Output,
        build: impl FnOnce(&mut Graph<'static>, f32) -> Result<Var>,
    ) -> Result<Loss> {
        self.check(output.id)?;
        let smoothing = match self.training {
            true => self.config.label_smoothing,
            false => 0.0,
        };
        let graph = self.graph()?;
        let var = build(graph, smoothing)?;
        let value = graph.value(var).f32s()?[0];
        Ok(Loss {
            value,
            var,
            id: output.id,
        })
    }

    /// Backpropagates the loss into the parameter gradients (accumulating, as in
    /// PyTorch). A non-finite loss stops here with an error naming the step.
    pub fn backward(&mut self, loss: &Loss) -> Result<()> {
        self.check(loss.id)?;
        if !loss.value.is_finite() {
            self.finish();
            return Err(Error::NonFinite {
                step: self.step,
                value: loss.value,
            });
        }
        let result = self.graph()?.backward(loss.var);
        self.finish();
        result
    }

    /// Applies one optimizer update with the current learning rate (after averaging the
    /// gradients across data-parallel replicas, and clipping them when configured).
    pub fn step(&mut self) -> Result<()> {
        self.finish();
        self.whole_model()?;
        if let Some(p) = &self.par {
            average_gradients(&mut self.params, p.dp.as_ref(), p.bucket)?;
        }
        if let Some(max) = self.config.clip_grad_norm {
            self.grad_norm = Some(clip_grad_norm(&mut self.params, max)?);
        }
        self.optimizer.step(&mut self.params, self.lr)?;
        self.step += 1;
        self.update_ema()
    }

    /// One training step on a batch: zero_grad, forward, criterion, backward, step.
    pub fn train_step(
        &mut self,
        images: Tensor,
        labels: &[usize],
        samples: &[u64],
    ) -> Result<BatchStats> {
        self.train();
        self.zero_grad()?;
        let output = self.forward(images, samples)?;
        // read back before the backward pass is queued (see `train_batch`)
        let correct = count_correct(&output.logits, labels)?;
        let loss = self.criterion(&output, labels)?;
        self.backward(&loss)?;
        self.step()?;
        Ok(BatchStats {
            loss: loss.value,
            correct,
            count: labels.len(),
        })
    }

    /// A batch's images, augmented where the parameters are when the loader left that
    /// to the device.
    fn batch_images(&self, batch: &Batch) -> Result<Tensor> {
        self.images(&batch.images, batch.raw.as_ref())
    }

    /// `images`, or `raw` pixels augmented where the parameters are.
    fn images(&self, images: &Tensor, raw: Option<&RawImages>) -> Result<Tensor> {
        match raw {
            Some(raw) => {
                // bf16 under mixed precision: the images only feed the patch embedding's GEMM
                let dtype = match self.config.precision {
                    Precision::Bf16 => DType::BF16,
                    Precision::F32 => DType::F32,
                };
                crate::backend::for_device(self.params_device()).augment(&raw.batch(), dtype)
            }
            None => Ok(images.clone()),
        }
    }

    /// One training step on this rank's share of a global batch, in any layout: the
    /// pipeline schedule and gradient all-reduce of a parallel run, or
    /// zero_grad/forward/criterion/backward/step on one rank.
    pub fn train_batch(&mut self, batch: Batch) -> Result<StepResult> {
        self.train();
        if self.par.is_some() {
            return self.parallel_batch(batch, true);
        }
        self.zero_grad()?;
        let images = self.batch_images(&batch)?;
        let output = self.forward(images, &batch.samples)?;
        // Everything the host reads back (predictions, the loss) is read before the
        // backward pass is queued: on a GPU the step then returns while its backward
        // and update still run, and the next batch is prepared and queued meanwhile.
        let predictions = argmax_rows(&output.logits)?;
        let loss = self.batch_criterion(&output, &batch)?;
        self.backward(&loss)?;
        self.step()?;
        Ok(StepResult {
            loss: loss.value,
            predictions,
            labels: batch.accuracy_labels(),
            stop: self.stop.reason(),
        })
    }

    /// Loss and predictions on a batch in evaluation mode (the engine's mode is
    /// restored afterwards), in any layout.
    pub fn test_batch(&mut self, batch: Batch) -> Result<StepResult> {
        if self.par.is_some() {
            let was_training = self.training;
            self.eval();
            let r = self.parallel_batch(batch, false);
            self.training = was_training;
            return r;
        }
        let images = self.batch_images(&batch)?;
        let (stats, predictions) = self.eval_batch(images, &batch.labels)?;
        Ok(StepResult {
            loss: stats.loss,
            labels: batch.labels,
            predictions,
            stop: None,
        })
    }

    /// Loss, accuracy and the predicted class of each image on a batch, in evaluation
    /// mode (the engine's mode is restored afterwards).
    pub fn eval_batch(
        &mut self,
        images: Tensor,
        labels: &[usize],
    ) -> Result<(BatchStats, Vec<usize>)> {
        let was_training = self.training;
        self.eval();
        let samples = vec![0; labels.len()];
        let result = self.forward(images, &samples).and_then(|output| {
            let loss = self.criterion(&output, labels)?;
            let predictions = argmax_rows(&output.logits)?;
            Ok((loss.value, predictions))
        });
        self.finish();
        self.training = was_training;
        let (loss, predictions) = result?;
        let correct = predictions
            .iter()
            .zip(labels)
            .filter(|(p, y)| p == y)
            .count();
        Ok((
            BatchStats {
                loss,
                correct,
                count: labels.len(),
            },
            predictions,
        ))
    }
}

/// The loss of rows `range` of `batch` given their `logits`: cross-entropy with label
/// smoothing, or against soft targets (smoothing folded in) when the batch is mixed.
fn batch_loss(
    graph: &mut Graph<'_>,
    logits: Var,
    batch: &Batch,
    range: std::ops::Range<usize>,
    smoothing: f32,
) -> Result<Var> {
    match &batch.mix {
        None => graph.cross_entropy(logits, &batch.labels[range], smoothing),
        Some(m) => {
            let classes = graph.value(logits).shape().last();
            let rows = range.len();
            let targets = m.targets(&batch.labels, range, classes, smoothing);
            graph.cross_entropy_soft(logits, &Tensor::from_vec(targets, [rows, classes])?)
        }
    }
}

/// Index of the largest value in each row of `[b, classes]` logits (first on ties),
/// computed where the logits are.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<usize>> {
    crate::backend::for_device(logits.device()).argmax_rows(logits)
}

/// How many rows of `logits` have their argmax at the label.
pub fn count_correct(logits: &Tensor, labels: &[usize]) -> Result<usize> {
    Ok(argmax_rows(logits)?
        .iter()
        .zip(labels)
        .filter(|(p, y)| p == y)
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AdamW keeps four f32 copies of each parameter (weights, gradients, two moments);
    /// an EMA is a fifth, and the up-front check counts it.
    #[test]
    fn the_memory_check_counts_the_ema() {
        let model = VitConfig::preset("vit_lite_depth7_patch4_32").unwrap();
        let config = TrainConfig::default();
        let four = 16 * model.num_params() as u64;
        assert!(check_fits_in(&model, &config, false, Some(four)).is_ok());
        let err = check_fits_in(&model, &config, true, Some(four)).unwrap_err();
        assert!(
            err.to_string().contains("optimizer state and their EMA"),
            "{err}"
        );
        assert!(check_fits_in(&model, &config, true, Some(four + four / 4)).is_ok());
        assert!(check_fits_in(&model, &config, false, Some(four - 1)).is_err());
    }
}
