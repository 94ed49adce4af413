//! Optimizers (SGD, Adam, AdamW), global-norm gradient clipping and LR schedules.
//!
//! Each optimizer update is one fused backend pass per parameter tensor, following
//! `torch.optim`'s update order so results agree with PyTorch to rounding. State
//! (moments, momentum buffers, step count) is exposed by the parameter's global name
//! so checkpoints can save and reshard it like the weights.

mod ema;

pub use ema::{Ema, EMA_PREFIX};

use crate::autograd::ParamStore;
use crate::backend::{self, AdamStep, OptimTensors, SgdStep, Update};
use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// Which update rule, with its hyper-parameters (PyTorch's defaults via `Default`-like
/// constructors).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OptimizerKind {
    Sgd {
        momentum: f32,
        dampening: f32,
        nesterov: bool,
    },
    Adam {
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
    /// Adam with decoupled weight decay (Loshchilov & Hutter).
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
}

impl OptimizerKind {
    pub fn sgd(momentum: f32, nesterov: bool) -> Self {
        OptimizerKind::Sgd {
            momentum,
            dampening: 0.0,
            nesterov,
        }
    }
    pub fn adam() -> Self {
        OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
    pub fn adamw() -> Self {
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// Rejects hyper-parameters no update can use (they may come from a checkpoint).
    pub fn validate(self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        match self {
            OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
            } => {
                if !(momentum.is_finite() && momentum >= 0.0 && dampening.is_finite()) {
                    return bad(format!(
                        "SGD momentum {momentum} and dampening {dampening} must be finite, momentum >= 0"
                    ));
                }
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return bad("Nesterov momentum needs momentum > 0 and dampening 0".into());
                }
            }
            OptimizerKind::Adam { beta1, beta2, eps }
            | OptimizerKind::AdamW { beta1, beta2, eps } => {
                if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) {
                    return bad(format!("Adam betas ({beta1}, {beta2}) must be in [0, 1)"));
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return bad(format!("Adam eps {eps} must be finite and > 0"));
                }
            }
        }
        Ok(())
    }

    /// The state each parameter has (`<state>.<parameter>` in checkpoints).
    pub fn state_names(self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Sgd { momentum: 0.0, .. } => &[],
            OptimizerKind::Sgd { .. } => &["momentum_buffer"],
            _ => &["exp_avg", "exp_avg_sq"],
        }
    }
}

/// An optimizer over every parameter of a [`ParamStore`].
#[derive(Clone, Debug)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    pub weight_decay: f32,
    steps: u64,
    /// Per parameter (store order), one tensor per `kind.state_names()` entry.
    state: Vec<Vec<Tensor>>,
}

impl Optimizer {
    /// Moves the optimizer state (moments, momentum buffers) to `device`.
    pub fn to_device(&mut self, device: crate::tensor::Device) -> Result<()> {
        for t in self.state.iter_mut().flatten() {
            *t = t.to_device(device)?;
        }
        Ok(())
    }

    pub fn new(kind: OptimizerKind, weight_decay: f32, store: &ParamStore) -> Result<Self> {
        kind.validate()?;
        if weight_decay.is_nan() || weight_decay < 0.0 {
            return Err(Error::Config(format!(
                "weight decay {weight_decay} must be >= 0"
            )));
        }
        let n = kind.state_names().len();
        let state = store
            .iter()
            .map(|p| {
                (0..n)
                    .map(|_| Tensor::try_zeros(p.value.shape().clone(), p.value.device()))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Optimizer {
            kind,
            weight_decay,
            steps: 0,
            state,
        })
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update with learning rate `lr` using the gradients in `store`.
    pub fn step(&mut self, store: &mut ParamStore, lr: f32) -> Result<()> {
        if store.len() != self.state.len() {
            return Err(Error::Config(format!(
                "optimizer was built for {} parameters, store has {}",
                self.state.len(),
                store.len()
            )));
        }
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::Config(format!(
                "learning rate {lr} must be finite and >= 0"
            )));
        }
        let t = self.steps + 1;
        let update = match self.kind {
            OptimizerKind::Adam { beta1, beta2, eps }
            | OptimizerKind::AdamW { beta1, beta2, eps } => Update::Adam(AdamStep {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay: self.weight_decay,
                decoupled: matches!(self.kind, OptimizerKind::AdamW { .. }),
                step_size: (lr as f64 / (1.0 - (beta1 as f64).powi(t as i32))) as f32,
                bias_correction2_sqrt: (1.0 - (beta2 as f64).powi(t as i32)).sqrt() as f32,
            }),
            OptimizerKind::Sgd {
                momentum,
                dampening,
                nesterov,
            } => Update::Sgd(SgdStep {
                lr,
                momentum,
                dampening,
                weight_decay: self.weight_decay,
                nesterov,
                first: t == 1,
            }),
        };
        let device = store
            .iter()
            .next()
            .map_or(Device::Cpu, |p| p.value.device());
        let mut tensors: Vec<OptimTensors> = store
            .iter_mut()
            .zip(self.state.iter_mut())
            .map(|(p, state)| OptimTensors {
                p: &mut p.value,
                g: &p.grad,
                state,
            })
            .collect();
        backend::for_device(device).optimizer_step(&mut tensors, update)?;
        self.steps = t;
        Ok(())
    }

    /// State tensors by name: `"{state}.{param}"`, e.g. `exp_avg.blocks.0.attn.qkv.weight`.
    pub fn named_state<'a>(&'a self, store: &'a ParamStore) -> Vec<(String, &'a Tensor)> {
        let names = self.kind.state_names();
        store
            .iter()
            .zip(&self.state)
            .flat_map(|(p, st)| {
                names
                    .iter()
                    .zip(st)
                    .map(move |(n, t)| (format!("{n}.{}", p.name), t))
            })
            .collect()
    }

    /// Restores state saved by [`Optimizer::named_state`] plus the step count. Every
    /// state tensor must be present with its parameter's shape.
    pub fn load_state(
        &mut self,
        store: &ParamStore,
        steps: u64,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<()> {
        let names = self.kind.state_names();
        for (p, st) in store.iter().zip(self.state.iter_mut()) {
            for (n, slot) in names.iter().zip(st.iter_mut()) {
                let key = format!("{n}.{}", p.name);
                let t = get(&key)
                    .ok_or_else(|| Error::Config(format!("optimizer state `{key}` is missing")))?;
                if t.shape() != p.value.shape() {
                    return Err(Error::shape(
                        "Optimizer::load_state",
                        format!("`{key}` {}", p.value.shape()),
                        t.shape(),
                    ));
                }
                *slot = t;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Scales all gradients so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(store: &mut ParamStore, max_norm: f32) -> Result<f32> {
    let total = grad_sum_squares(store)?.sqrt() as f32;
    scale_grads(store, max_norm, total)?;
    Ok(total)
}

/// Sum of the squares of every gradient element.
pub fn grad_sum_squares(store: &ParamStore) -> Result<f64> {
    let grads: Vec<&Tensor> = store.iter().map(|p| &p.grad).collect();
    match grads.first() {
        Some(g) => backend::for_device(g.device()).sum_squares_all(&grads),
        None => Ok(0.0),
    }
}

/// Scales the gradients, whose global L2 norm is `total`, down to norm `max_norm`
/// (unchanged when already within it).
pub fn scale_grads(store: &mut ParamStore, max_norm: f32, total: f32) -> Result<()> {
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for p in store.iter_mut() {
            backend::for_device(p.grad.device()).scale(&mut p.grad, coef)?;
        }
    }
    Ok(())
}

/// Learning rate as a function of the update step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LrSchedule {
    Constant,
    /// Multiply by `gamma` every `step_size` steps (PyTorch's `StepLR`).
    Step {
        step_size: u64,
        gamma: f32,
    },
    /// Linear warm-up from 0 over `warmup` steps (update `k` at `(k + 1) / warmup` of
    /// the base rate), then cosine decay over the remaining steps to `min_lr` at `total`
    /// steps (held there after). What runs before [`LrSchedule::Cosine`] used, kept for
    /// their checkpoints.
    WarmupCosine {
        warmup: u64,
        total: u64,
        min_lr: f32,
    },
    /// timm's `CosineLRScheduler(t_initial=total, lr_min=min_lr, warmup_t=warmup,
    /// warmup_lr_init=warmup_lr, t_in_epochs=False)` (one cycle, no warm-up prefix),
    /// stepped per update: update `k` runs at `warmup_lr + k (base − warmup_lr) /
    /// warmup` while `k < warmup`, else at `min_lr + ½ (base − min_lr)(1 + cos(π k /
    /// total))`, and at `min_lr` from `total` on.
    Cosine {
        warmup: u64,
        total: u64,
        min_lr: f32,
        warmup_lr: f32,
    },
}

impl LrSchedule {
    /// Rejects a schedule that cannot be evaluated (it may come from a checkpoint).
    pub fn validate(&self) -> Result<()> {
        match *self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::Step { step_size, gamma }
                if step_size > 0 && gamma.is_finite() && gamma >= 0.0 =>
            {
                Ok(())
            }
            LrSchedule::WarmupCosine {
                warmup,
                total,
                min_lr,
            } if warmup <= total && min_lr.is_finite() && min_lr >= 0.0 => Ok(()),
            LrSchedule::Cosine {
                warmup,
                total,
                min_lr,
                warmup_lr,
            } if warmup <= total
                && total > 0
                && [min_lr, warmup_lr]
                    .iter()
                    .all(|r| r.is_finite() && *r >= 0.0) =>
            {
                Ok(())
            }
            s => Err(Error::Config(format!(
                "{s:?}: needs step_size > 0, warmup <= total, total > 0 (Cosine) and finite, non-negative rates"
            ))),
        }
    }

    /// The learning rate for update `step` (0-based) given the base rate.
    pub fn lr(&self, base: f32, step: u64) -> f32 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { step_size, gamma } => {
                base * gamma.powi((step / step_size.max(1)) as i32)
            }
            LrSchedule::WarmupCosine {
                warmup,
                total,
                min_lr,
            } => {
                if step < warmup {
                    return base * (step + 1) as f32 / warmup as f32;
                }
                let span = total.saturating_sub(warmup).max(1);
                let t = ((step - warmup) as f64 / span as f64).min(1.0);
                let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
                (min_lr as f64 + (base - min_lr) as f64 * cos) as f32
            }
            LrSchedule::Cosine {
                warmup,
                total,
                min_lr,
                warmup_lr,
            } => timm_cosine(
                base as f64,
                step,
                warmup,
                total,
                min_lr as f64,
                warmup_lr as f64,
            ),
        }
    }
}

/// timm's `CosineLRScheduler._get_lr(t)` (scheduler/cosine_lr.py) with `cycle_limit`,
/// `cycle_mul`, `cycle_decay` and `k_decay` 1, `warmup_prefix` false and no noise.
fn timm_cosine(base: f64, t: u64, warmup: u64, total: u64, min_lr: f64, warmup_lr: f64) -> f32 {
    let lr = if t < warmup {
        warmup_lr + t as f64 * (base - warmup_lr) / warmup as f64
    } else if t >= total {
        min_lr // past the one cycle
    } else {
        let cos = 1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos();
        min_lr + 0.5 * (base - min_lr) * cos
    };
    lr as f32
}
