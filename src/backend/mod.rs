//! The op set ViT needs, as one trait, implemented per device.
//!
//! The autograd tape and the optimizers call only this trait, through
//! [`for_device`]; models never see a device. Adding a device means one more
//! implementation and one more arm in `for_device` and in `tensor::Storage`.
//! Gradient outputs accumulate (`+=`) unless a doc comment says otherwise.
//!
//! Tensors are f32, except activations under mixed precision and the gradients written
//! for them: GEMM operands and outputs, LayerNorm outputs and `dy`, bias_grad's `dy`,
//! attention's qkv, output and output gradient (and `dqkv` when written, not accumulated
//! into), bias+GELU's tensors, GELU backward's three, dropout's input and output (without
//! a residual), patchify's and augmentation's images may be bf16 — tensors an op reads
//! together stored alike. Backends compute in f32 and round what they store to bf16
//! (nearest even); parameters, their gradients, optimizer state and statistics are
//! always f32.

pub(crate) mod check;
pub mod cpu;
pub mod cuda;
mod device;
pub mod gemm;
mod spec;

use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Tensor};

pub use device::DeviceSpec;
pub use spec::{
    AdamStep, AttnDims, AugmentBatch, AugmentMix, DropoutKey, Geometry, Mix, MixBox, Normalize,
    SgdStep,
};

/// Where a dropout result goes.
#[derive(Clone, Copy)]
pub enum DropoutMode<'a> {
    /// `out = m`
    Write,
    /// `out += m`
    Accumulate,
    /// `out = residual + m`: dropout fused with the residual add after it
    AddTo(&'a Tensor),
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;

    /// `c (+)= op(a) · op(b)` with `(m, n, k)`; `ta`/`tb` say `a` is stored `[k, m]`
    /// or `b` is stored `[n, k]`.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        ta: bool,
        b: &Tensor,
        tb: bool,
        mnk: (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()>;
    /// `c = a · bᵀ + bias` (a linear layer: `b` is `[n, k]`, `bias` f32 `[n]` added to
    /// every row), the bias added in f32 before `c` is stored.
    fn matmul_bias(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        b: &Tensor,
        bias: &Tensor,
        mnk: (usize, usize, usize),
    ) -> Result<()>;
    /// Every row of `out` set to `bias` (overwrites).
    fn fill_rows(&self, out: &mut Tensor, bias: &Tensor) -> Result<()>;
    /// `db += column sums of dy`.
    fn bias_grad(&self, dy: &Tensor, db: &mut Tensor) -> Result<()>;
    /// `pre += bias; out = gelu(pre)` (overwrites `out`).
    fn bias_gelu(&self, pre: &mut Tensor, bias: &Tensor, out: &mut Tensor) -> Result<()>;
    /// `dpre = dy * gelu'(pre)` (overwrites `dpre`).
    fn gelu_backward(&self, dy: &Tensor, pre: &Tensor, dpre: &mut Tensor) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn layernorm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        y: &mut Tensor,
        mean: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Result<()>;
    /// `[b, c, h, w]` images to `[b, (h/p)(w/p), c p p]` patches (overwrites `out`).
    fn patchify(&self, images: &Tensor, patch: usize, out: &mut Tensor) -> Result<()>;
    /// Prepends the cls token and adds position embeddings (overwrites `out`).
    fn embed(&self, patches: &Tensor, cls: &Tensor, pos: &Tensor, out: &mut Tensor) -> Result<()>;
    fn embed_backward(
        &self,
        dout: &Tensor,
        dpatches: &mut Tensor,
        dcls: &mut Tensor,
        dpos: &mut Tensor,
    ) -> Result<()>;
    /// Elements attention saves for its backward pass (`probs` below): the CPU keeps
    /// the probabilities `[b, heads, queries, tokens]`, the CUDA kernels only each
    /// row's log-sum-exp and recompute the rest.
    fn attention_saved_len(&self, d: AttnDims) -> usize {
        d.batch * d.heads * d.queries * d.tokens
    }
    /// Multi-head attention over packed qkv (overwrites `probs` and `out`).
    fn attention(
        &self,
        qkv: &Tensor,
        dims: AttnDims,
        probs: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()>;
    /// `dqkv += ∂/∂qkv`, or `dqkv =` when `!accumulate` (every query row then: only
    /// with `queries == tokens`, else the rows past the queries would be left unwritten).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        probs: &Tensor,
        dims: AttnDims,
        dqkv: &mut Tensor,
        accumulate: bool,
    ) -> Result<()>;
    /// `out = a + b` (overwrites); `a` and `out` f32, `b` f32 or bf16.
    fn add(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()>;
    fn add_assign(&self, dst: &mut Tensor, src: &Tensor) -> Result<()>;
    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()>;
    fn sum_squares(&self, x: &Tensor) -> Result<f64>;
    /// Inverted dropout `m = x * mask / (1 - p)`, written, accumulated or added to a
    /// residual as `mode` says; `samples` names the sample of each leading row. `x` and
    /// `out` each f32 or bf16 (computed in f32, a bf16 `out` rounded once); a residual
    /// is f32.
    fn dropout(
        &self,
        x: &Tensor,
        p: f32,
        key: DropoutKey,
        samples: &[u64],
        mode: DropoutMode,
        out: &mut Tensor,
    ) -> Result<()>;
    /// Mean softmax cross-entropy; writes d loss / d logits into `dlogits`.
    fn cross_entropy(
        &self,
        logits: &Tensor,
        labels: &[usize],
        label_smoothing: f32,
        dlogits: &mut Tensor,
    ) -> Result<f32>;
    /// Mean softmax cross-entropy against soft targets (`[b, classes]` f32, as
    /// `F.cross_entropy(logits, targets)`: each row's loss is −Σ t · log softmax(z));
    /// writes d loss / d logits = (softmax · Σt − t) / b into `dlogits`.
    fn cross_entropy_soft(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        dlogits: &mut Tensor,
    ) -> Result<f32>;
    /// Row `i` of `out` = row `i * stride_rows` of `x` (the cls token of each image).
    fn select_rows(&self, x: &Tensor, stride_rows: usize, out: &mut Tensor) -> Result<()>;
    fn select_rows_backward(
        &self,
        dout: &Tensor,
        stride_rows: usize,
        dx: &mut Tensor,
    ) -> Result<()>;
    fn adam(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        step: AdamStep,
    ) -> Result<()>;
    fn sgd(&self, p: &mut Tensor, g: &Tensor, buf: &mut Tensor, step: SgdStep) -> Result<()>;

    /// One optimizer update of every parameter at once (the CUDA backend: one launch
    /// for all of them); by default one tensor at a time.
    fn optimizer_step(&self, tensors: &mut [OptimTensors], update: Update) -> Result<()> {
        for t in tensors {
            match (update, &mut *t.state) {
                (Update::Adam(s), [m, v]) => self.adam(t.p, t.g, m, v, s)?,
                (Update::Sgd(s), [buf]) => self.sgd(t.p, t.g, buf, s)?,
                (Update::Sgd(s), []) => {
                    let mut none = Tensor::zeros([0], t.p.device());
                    self.sgd(t.p, t.g, &mut none, s)?
                }
                _ => {
                    return Err(Error::Config(
                        "optimizer state does not fit the update".into(),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Crops, flips and normalises a batch of raw images (`[b, 3, side, side]` on this
    /// backend's device, stored as `dtype`).
    fn augment(&self, batch: &AugmentBatch, dtype: DType) -> Result<Tensor>;

    /// A mixed-precision GEMM operand: `t`'s values rounded to bf16, stored as this
    /// backend holds bf16 (as bf16; the CPU holds them widened in f32), made once per
    /// use rather than per product.
    fn gemm_operand(&self, t: &Tensor) -> Result<Tensor> {
        t.try_to_dtype(DType::BF16)
    }

    /// [`Backend::gemm_operand`] of each tensor (the CUDA backend: one launch for all the
    /// f32 ones).
    fn gemm_operands(&self, ts: &[&Tensor]) -> Result<Vec<Tensor>> {
        ts.iter().map(|t| self.gemm_operand(t)).collect()
    }

    /// Sets every element of every tensor (f32) to `value` (zero_grad; the CUDA backend:
    /// one launch for all of them).
    fn fill_all(&self, ts: &mut [&mut Tensor], value: f32) -> Result<()> {
        for t in ts {
            t.fill(value)?;
        }
        Ok(())
    }

    /// Sum of the squares of every element of every tensor (global-norm clipping).
    fn sum_squares_all(&self, xs: &[&Tensor]) -> Result<f64> {
        xs.iter().map(|x| self.sum_squares(x)).sum()
    }

    /// Index of the largest value in each row of `[b, classes]` logits (the first on
    /// ties; a NaN never wins, except as the first element).
    fn argmax_rows(&self, logits: &Tensor) -> Result<Vec<usize>> {
        let (_, c) = check::check_logits(logits)?;
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
}

/// One parameter in an [`Backend::optimizer_step`]: its value, gradient and state
/// (Adam: the two moments; SGD: the momentum buffer, or nothing without momentum).
pub struct OptimTensors<'a> {
    pub p: &'a mut Tensor,
    pub g: &'a Tensor,
    pub state: &'a mut [Tensor],
}

/// The scalars of one optimizer update.
#[derive(Clone, Copy, Debug)]
pub enum Update {
    Adam(AdamStep),
    Sgd(SgdStep),
}

/// The backend that computes on tensors of `device`.
pub fn for_device(device: Device) -> &'static dyn Backend {
    match device {
        Device::Cpu => &cpu::CpuBackend,
        Device::Cuda(id) => &cuda::get(id).backend,
    }
}
