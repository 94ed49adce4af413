//! The op set ViT needs, as one trait, implemented per device.
//!
//! The autograd tape and the optimizers call only this trait, through
//! [`for_device`]; models never see a device. Adding a device means one more
//! implementation and one more arm in `for_device` and in `tensor::Storage`.
//! Gradient outputs accumulate (`+=`) unless a doc comment says otherwise.

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::tensor::{Device, Tensor};

pub use cpu::attention::AttnDims;
pub use cpu::ops::DropoutKey;
pub use cpu::optim::{AdamStep, SgdStep};

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
    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        probs: &Tensor,
        dims: AttnDims,
        dqkv: &mut Tensor,
    ) -> Result<()>;
    /// `out = a + b` (overwrites).
    fn add(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()>;
    fn add_assign(&self, dst: &mut Tensor, src: &Tensor) -> Result<()>;
    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()>;
    fn sum_squares(&self, x: &Tensor) -> Result<f64>;
    /// Inverted dropout `m = x * mask / (1 - p)`, written, accumulated or added to a
    /// residual as `mode` says; `samples` names the sample of each leading row.
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
}

/// The backend that computes on tensors of `device`.
pub fn for_device(device: Device) -> &'static dyn Backend {
    match device {
        Device::Cpu => &cpu::CpuBackend,
        Device::Cuda(id) => &cuda::get(id).backend,
    }
}
