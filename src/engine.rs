//! The training engine: one model, its parameters and optimizer, and the step that
//! ties forward, loss, backward and update together.

use crate::autograd::{Graph, ParamStore};
use crate::error::{Error, Result};
use crate::nn::{ForwardCtx, Vit, VitConfig};
use crate::optim::{clip_grad_norm, LrSchedule, Optimizer, OptimizerKind};
use crate::tensor::Tensor;

/// Hyper-parameters of the update rule.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub optimizer: OptimizerKind,
    pub lr: f32,
    pub weight_decay: f32,
    pub schedule: LrSchedule,
    pub label_smoothing: f32,
    /// Clip gradients to this global L2 norm (none when `None`).
    pub clip_grad_norm: Option<f32>,
    /// Seed of parameter initialisation and dropout.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: OptimizerKind::adamw(),
            lr: 1e-3,
            weight_decay: 0.05,
            schedule: LrSchedule::Constant,
            label_smoothing: 0.0,
            clip_grad_norm: None,
            seed: 0,
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

pub struct Engine {
    pub model: Vit,
    pub params: ParamStore,
    pub optimizer: Optimizer,
    pub config: TrainConfig,
    step: u64,
}

impl Engine {
    pub fn new(model: &VitConfig, config: TrainConfig) -> Result<Self> {
        let mut params = ParamStore::new();
        let model = Vit::new(model, &mut params, config.seed)?;
        let optimizer = Optimizer::new(config.optimizer, config.weight_decay, &params)?;
        Ok(Engine {
            model,
            params,
            optimizer,
            config,
            step: 0,
        })
    }

    /// Updates applied so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The learning rate the next update will use.
    pub fn lr(&self) -> f32 {
        self.config.schedule.lr(self.config.lr, self.step)
    }

    /// One training step on a batch: forward (dropout on), loss, backward, update.
    /// `samples` are the global dataset indices of the batch (dropout masks are keyed by
    /// them). A non-finite loss stops before the update, naming the step.
    pub fn train_step(
        &mut self,
        images: Tensor,
        labels: &[usize],
        samples: &[u64],
    ) -> Result<BatchStats> {
        self.params.zero_grad();
        // Dropout seed of this step: the run's seed and the step number.
        let seed = self.config.seed ^ self.step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let ctx = ForwardCtx::train(seed, samples.to_vec());
        let mut g = Graph::new(&mut self.params);
        let logits = self.model.forward(&mut g, images, &ctx)?;
        let correct = count_correct(g.value(logits), labels)?;
        let loss_var = g.cross_entropy(logits, labels, self.config.label_smoothing)?;
        let loss = g.value(loss_var).f32s()?[0];
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                step: self.step,
                value: loss,
            });
        }
        g.backward(loss_var)?;
        drop(g);
        if let Some(max) = self.config.clip_grad_norm {
            clip_grad_norm(&mut self.params, max)?;
        }
        let lr = self.lr();
        self.optimizer.step(&mut self.params, lr)?;
        self.step += 1;
        Ok(BatchStats {
            loss,
            correct,
            count: labels.len(),
        })
    }

    /// Loss, accuracy and the predicted class of each image on a batch, without dropout
    /// or gradients.
    pub fn eval_batch(
        &mut self,
        images: Tensor,
        labels: &[usize],
    ) -> Result<(BatchStats, Vec<usize>)> {
        let ctx = ForwardCtx::eval(labels.len());
        let mut g = Graph::new(&mut self.params);
        let logits = self.model.forward(&mut g, images, &ctx)?;
        let predictions = argmax_rows(g.value(logits))?;
        let correct = predictions
            .iter()
            .zip(labels)
            .filter(|(p, y)| p == y)
            .count();
        let loss = g.cross_entropy(logits, labels, 0.0)?;
        let stats = BatchStats {
            loss: g.value(loss).f32s()?[0],
            correct,
            count: labels.len(),
        };
        Ok((stats, predictions))
    }
}

/// Index of the largest value in each row of `[b, classes]` logits (first on ties).
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<usize>> {
    let c = logits.shape().last();
    if logits.shape().rank() != 2 || c == 0 {
        return Err(Error::shape(
            "argmax_rows",
            "[batch, classes]",
            logits.shape(),
        ));
    }
    Ok(logits
        .f32s()?
        .chunks(c)
        .map(|r| {
            r.iter()
                .enumerate()
                .fold(0, |best, (i, v)| if *v > r[best] { i } else { best })
        })
        .collect())
}

/// How many rows of `logits` have their argmax at the label.
pub fn count_correct(logits: &Tensor, labels: &[usize]) -> Result<usize> {
    Ok(argmax_rows(logits)?
        .iter()
        .zip(labels)
        .filter(|(p, y)| p == y)
        .count())
}
