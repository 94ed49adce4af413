//! One rank's share of a parallel training step: its pipeline stage run over
//! micro-batches with a 1F1B schedule, gradients summed across the stage's
//! data-parallel replicas, and the step's metrics shared by every rank.
//!
//! Each micro-batch's loss is weighted by its share of the global batch, so the summed
//! gradient is exactly the gradient of the global batch's mean loss, however the batch
//! was split (uneven shares included): a `dp × pp` step computes what one rank would,
//! up to the order of floating-point additions.
//!
//! On a GPU the stage computes on its device and what the ranks exchange (activations,
//! their gradients, gradient buckets) passes through host memory and the process group.

use super::{Engine, StepResult};
use crate::autograd::{Graph, Var};
use crate::data::Batch;
use crate::dist::{reduce_gradients, Layout, ProcessGroup, ReduceOp, SubGroup};
use crate::error::{Error, Result};
use crate::nn::{ForwardCtx, PartInput};
use crate::optim::{grad_sum_squares, scale_grads};
use crate::signals::{StopFlag, StopReason};
use crate::tensor::{Device, Tensor};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where an engine sits in a parallel run, and the groups it talks through.
pub struct Parallel {
    pub layout: Layout,
    /// Every rank (metrics, checkpoints).
    pub world: Arc<dyn ProcessGroup>,
    /// The replicas of this rank's stage (gradient all-reduce).
    pub dp: Box<dyn ProcessGroup>,
    /// The stages of this rank's replica, in order (activations and their gradients).
    pub pp: Box<dyn ProcessGroup>,
    /// Micro-batches per step (pipeline); each replica's share is split this many ways.
    pub microbatches: usize,
    /// Gradient all-reduce bucket, in elements.
    pub bucket: usize,
    /// Time this stage spent in the pipeline schedule and, of it, waiting for its
    /// neighbours (the measured bubble is `wait / busy_and_wait`).
    pub pipeline_time: Duration,
    pub pipeline_wait: Duration,
    /// A number rank 0 drew for this run, the same on every rank (names the shared
    /// temporary directory of a parallel checkpoint save).
    pub run: u64,
}

impl Parallel {
    /// The groups of `layout` over `world` (whose size must be the layout's).
    pub fn new(
        world: Arc<dyn ProcessGroup>,
        layout: Layout,
        microbatches: usize,
        bucket: usize,
    ) -> Result<Parallel> {
        if world.world() != layout.world {
            return Err(Error::Config(format!(
                "layout {} needs {} ranks but the process group has {}",
                layout.describe(),
                layout.world,
                world.world()
            )));
        }
        if microbatches == 0 {
            return Err(Error::Config("--microbatches must be at least 1".into()));
        }
        let run = agree_on_run_id(world.as_ref())?;
        let (replica, stage) = layout.coords(world.rank());
        let dp_members = (0..layout.dp).map(|r| layout.rank_of(r, stage)).collect();
        let pp_members = (0..layout.pp).map(|s| layout.rank_of(replica, s)).collect();
        Ok(Parallel {
            dp: Box::new(SubGroup::new(world.clone(), dp_members, 1)?),
            pp: Box::new(SubGroup::new(world.clone(), pp_members, 2)?),
            world,
            layout,
            microbatches,
            bucket,
            pipeline_time: Duration::ZERO,
            pipeline_wait: Duration::ZERO,
            run,
        })
    }

    /// The same, with the replicas' gradients all-reduced by NCCL on the GPU of
    /// `device` (a real GPU, one per rank) instead of through host memory.
    pub fn with_nccl_gradients(self, device: Device, timeout: Duration) -> Result<Parallel> {
        Ok(Parallel {
            dp: Box::new(crate::dist::NcclGroup::on_device(self.dp, device, timeout)?),
            ..self
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank()
    }

    /// (replica, stage) of this rank.
    pub fn coords(&self) -> (usize, usize) {
        self.layout.coords(self.rank())
    }

    /// Receives from a neighbouring stage, counting the wait.
    fn recv(&mut self, from: usize, tag: u64) -> Result<Vec<f32>> {
        let t = Instant::now();
        let r = self.pp.recv(from, tag);
        self.pipeline_wait += t.elapsed();
        r
    }
}

/// Rank 0's clock reading, broadcast in 16-bit pieces (exact as f32).
fn agree_on_run_id(world: &dyn ProcessGroup) -> Result<u64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut pieces: Vec<f32> = (0..4)
        .map(|k| ((now >> (16 * k)) & 0xffff) as f32)
        .collect();
    world.broadcast(&mut pieces, 0)?;
    Ok(pieces
        .iter()
        .enumerate()
        .fold(0, |id, (k, &p)| id | ((p as u64) << (16 * k))))
}

/// A micro-batch between its forward and backward pass.
struct InFlight {
    graph: Graph<'static>,
    /// The received hidden states (not on the first stage).
    input: Option<Var>,
    /// The loss (last stage) or the hidden states sent on.
    output: Var,
    /// Share of the global batch (weights the loss gradient).
    weight: f32,
}

/// One step of this stage: its share of the batch cut into micro-batches, and what the
/// last stage gathers of them.
struct StageStep<'b> {
    batch: &'b Batch,
    train: bool,
    /// The micro-batches' rows of the share.
    bounds: Vec<std::ops::Range<usize>>,
    /// The global batch's size (at least 1).
    global: usize,
    device: Device,
    smoothing: f32,
    /// Loss × samples, and predictions, of this replica's share (last stage).
    loss_sum: f64,
    predictions: Vec<usize>,
    /// Forward passes waiting for their backward pass.
    inflight: VecDeque<InFlight>,
}

impl<'b> StageStep<'b> {
    fn new(engine: &Engine, par: &Parallel, batch: &'b Batch, train: bool) -> Self {
        let n = batch.labels.len();
        let m = par.microbatches.min(n);
        StageStep {
            batch,
            train,
            bounds: (0..m).map(|i| i * n / m..(i + 1) * n / m).collect(),
            global: batch.global.max(1),
            device: engine.params_device(),
            smoothing: if train {
                engine.config.label_smoothing
            } else {
                0.0
            },
            loss_sum: 0.0,
            predictions: vec![0; n],
            inflight: VecDeque::new(),
        }
    }

    /// The step's metrics, shared by every rank: `[loss × samples, labels,
    /// predictions]` at this replica's offset in the global batch (the last stages fill
    /// them in), then in a training step each rank's stop vote at its rank
    /// ([`StopReason::code`], 0 for none), summed over the world. The vote rides on the
    /// all-reduce every step does anyway, so agreeing on a stop costs no round trip.
    fn shared_metrics(&self, par: &Parallel, stop: &StopFlag) -> Result<Vec<f32>> {
        let global = self.global;
        let votes = if self.train { par.layout.world } else { 0 };
        let mut shared = vec![0.0f32; 1 + 2 * global + votes];
        if self.train {
            // small integers (signal numbers, -1): exact in f32
            shared[1 + 2 * global + par.rank()] = stop.reason().map_or(0, |r| r.code()) as f32;
        }
        if par.coords().1 + 1 == par.layout.pp {
            shared[0] = self.loss_sum as f32;
            let at = self.batch.offset;
            let labels = self.batch.accuracy_labels();
            for (k, (&y, &p)) in labels.iter().zip(&self.predictions).enumerate() {
                shared[1 + at + k] = y as f32;
                shared[1 + global + at + k] = p as f32;
            }
        }
        par.world.all_reduce(&mut shared, ReduceOp::Sum)?;
        Ok(shared)
    }
}

/// Message tags between stages: micro-batch `i`'s activations and gradients.
fn tag(i: usize, backward: bool) -> u64 {
    2 * i as u64 + backward as u64
}

/// The f32 elements of `t`, copied to the host when it is on a device.
fn host(t: &Tensor) -> Result<Tensor> {
    t.to_device(Device::Cpu)
}

/// Rows `range` of a `[b, …]` CPU tensor.
fn rows(t: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
    let dims = t.dims();
    let row: usize = dims[1..].iter().product();
    let mut d = dims.to_vec();
    d[0] = range.len();
    Tensor::from_vec(
        t.f32s()?[range.start * row..range.end * row].to_vec(),
        crate::tensor::Shape::new(&d),
    )
}

impl Engine {
    /// This rank's step on its share of a global batch (see the module docs).
    pub(super) fn parallel_batch(&mut self, batch: Batch, train: bool) -> Result<StepResult> {
        self.finish();
        let mut par = self
            .par
            .take()
            .ok_or_else(|| Error::Config("parallel_batch needs a parallel layout".into()))?;
        let result = self.run_stage(&mut par, batch, train);
        self.par = Some(par);
        result
    }

    fn run_stage(&mut self, par: &mut Parallel, batch: Batch, train: bool) -> Result<StepResult> {
        let mut s = StageStep::new(self, par, &batch, train);
        if train {
            self.params.zero_grad()?;
        }
        let t0 = Instant::now();
        self.schedule_1f1b(par, &mut s)?;
        par.pipeline_time += t0.elapsed();
        let shared = s.shared_metrics(par, &self.stop)?;
        let global = s.global;
        let loss = shared[0] / global as f32;
        if train {
            self.update(par, loss)?;
        }
        let ints = |v: &[f32]| v.iter().map(|&x| x as usize).collect();
        let (metrics, votes) = shared.split_at(1 + 2 * global);
        Ok(StepResult {
            loss,
            labels: ints(&metrics[1..1 + global]),
            predictions: ints(&metrics[1 + global..]),
            // the first rank's vote, the same on every rank
            stop: votes.iter().find_map(|&v| StopReason::from_code(v as i32)),
        })
    }

    /// 1F1B: stage s runs (stages - s - 1) forwards ahead, then alternates one forward
    /// and one backward, then drains its remaining backwards (forwards only in
    /// evaluation).
    fn schedule_1f1b(&mut self, par: &mut Parallel, s: &mut StageStep) -> Result<()> {
        let (_, stage) = par.coords();
        let m = s.bounds.len();
        let warmup = if s.train {
            (par.layout.pp - stage - 1).min(m)
        } else {
            m
        };
        let (mut next_fwd, mut next_bwd) = (0, 0);
        while next_fwd < m || (s.train && next_bwd < m) {
            if next_fwd < m && (!s.train || next_fwd - next_bwd <= warmup) {
                self.forward_micro(par, s, next_fwd)?;
                next_fwd += 1;
            } else if s.train {
                self.backward_micro(par, s, next_bwd)?;
                next_bwd += 1;
            }
        }
        Ok(())
    }

    /// Micro-batch `i`'s forward pass: images (first stage) or the previous stage's
    /// hidden states in; the loss and predictions (last stage) or the hidden states
    /// sent on; its graph kept for the backward pass when training.
    fn forward_micro(&mut self, par: &mut Parallel, s: &mut StageStep, i: usize) -> Result<()> {
        let (_, stage) = par.coords();
        let last = stage + 1 == par.layout.pp;
        let r = s.bounds[i].clone();
        let samples = s.batch.samples[r.clone()].to_vec();
        let ctx = match s.train {
            true => ForwardCtx::train(super::dropout_seed(self.config.seed, self.step), samples),
            false => ForwardCtx::eval(samples.len()),
        };
        let mut graph = Graph::owning(self.params.share());
        graph.set_precision(self.config.precision);
        let (input, x) = if stage == 0 {
            let images = match &s.batch.raw {
                Some(raw) => self.images(&s.batch.images, Some(&raw.rows(r.clone())))?,
                None => rows(&s.batch.images, r.clone())?.to_device(s.device)?,
            };
            (None, PartInput::Images(images))
        } else {
            let c = &self.model.config;
            let h = par.recv(stage - 1, tag(i, false))?;
            let t = Tensor::from_vec(h, [r.len(), c.tokens(), c.dim])?.to_device(s.device)?;
            let v = graph.input_with_grad(t);
            (Some(v), PartInput::Hidden(v))
        };
        let out = self.model.forward_part(&mut graph, x, &ctx)?;
        let output = if last {
            let logits = graph.value(out).clone();
            for (p, row) in s.predictions[r.clone()]
                .iter_mut()
                .zip(super::argmax_rows(&logits)?)
            {
                *p = row;
            }
            let loss = super::batch_loss(&mut graph, out, s.batch, r.clone(), s.smoothing)?;
            s.loss_sum += graph.value(loss).f32s()?[0] as f64 * r.len() as f64;
            loss
        } else {
            par.pp
                .send(host(graph.value(out))?.f32s()?, stage + 1, tag(i, false))?;
            out
        };
        if s.train {
            s.inflight.push_back(InFlight {
                graph,
                input,
                output,
                weight: r.len() as f32 / s.global as f32,
            });
        }
        Ok(())
    }

    /// Micro-batch `i`'s backward pass: the loss (last stage) or the next stage's
    /// gradient in, gradients accumulated in the engine's store, its input's gradient
    /// sent back.
    fn backward_micro(&mut self, par: &mut Parallel, s: &mut StageStep, i: usize) -> Result<()> {
        let (_, stage) = par.coords();
        let mut f = s.inflight.pop_front().ok_or_else(|| {
            Error::Graph(format!("pipeline: micro-batch {i} has no forward pass"))
        })?;
        let grad = if stage + 1 == par.layout.pp {
            Tensor::try_full([1], f.weight, s.device)?
        } else {
            let g = par.recv(stage + 1, tag(i, true))?;
            Tensor::from_vec(g, f.graph.value(f.output).shape().clone())?.to_device(s.device)?
        };
        // gradients accumulate in the engine's store, one micro-batch at a time
        f.graph.store_mut().swap_grads(&mut self.params);
        let r = f.graph.backward_from(f.output, grad);
        f.graph.store_mut().swap_grads(&mut self.params);
        r?;
        if let Some(input) = f.input {
            let g = f.graph.grad(input).ok_or_else(|| {
                Error::Graph("pipeline: no gradient for the received hidden states".into())
            })?;
            par.pp.send(host(g)?.f32s()?, stage - 1, tag(i, true))?;
        }
        Ok(())
    }

    /// The update after a training step: stop on a non-finite loss (every rank alike),
    /// sum the replicas' gradients, clip by the norm over the stages, step.
    fn update(&mut self, par: &mut Parallel, loss: f32) -> Result<()> {
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                step: self.step,
                value: loss,
            });
        }
        reduce_gradients(&mut self.params, par.dp.as_ref(), par.bucket, ReduceOp::Sum)?;
        if let Some(max) = self.config.clip_grad_norm {
            // replicas agree after the all-reduce; the norm spans the stages
            // (one scalar all-reduce over the pipeline group: the stages' sums of squares)
            let mut sq = [grad_sum_squares(&self.params)? as f32];
            par.pp.all_reduce(&mut sq, ReduceOp::Sum)?;
            let total = sq[0].sqrt();
            scale_grads(&mut self.params, max, total)?;
            self.grad_norm = Some(total);
        }
        self.optimizer.step(&mut self.params, self.lr)?;
        self.step += 1;
        self.update_ema()
    }
}
