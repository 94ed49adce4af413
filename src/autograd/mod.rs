//! A thin reverse-mode tape over coarse ops.
//!
//! A [`Graph`] is an arena of nodes addressed by index ([`Var`]); inputs always have
//! smaller indices than their consumers, so the backward pass is one reverse sweep.
//! Each op is one fused backend computation with a hand-written backward. Parameter
//! gradients accumulate straight into the [`ParamStore`]; `backward_from(var, grad)`
//! starts the sweep at any node with a given gradient (what a pipeline stage needs
//! when its output gradient arrives from the next stage).

mod params;

pub use params::{Param, ParamId, ParamStore};

use crate::backend::{self, AttnDims, Backend, DropoutKey, DropoutMode};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Shape, Tensor};
use std::sync::Arc;

/// A node of a [`Graph`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

/// The precision a graph computes in. Parameters, every gradient, optimizer state,
/// LayerNorm statistics and the residual stream are f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands.
    #[default]
    F32,
    /// Mixed precision: GEMM operands in bf16 (weights and output gradients cast once
    /// per use) with f32 accumulation — tensor cores on a GPU — and the activations
    /// that only feed GEMMs, attention, GELU and dropout stored in bf16 ([`Out`]).
    Bf16,
}

impl Precision {
    /// `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::Config(format!(
                "unknown precision {s:?}: expected f32 or bf16"
            ))),
        }
    }

    /// `f32`, `bf16`, or `auto`: bf16 on a CUDA device (tensor cores), f32 on the CPU.
    pub fn resolve(s: &str, device: Device) -> Result<Precision> {
        match s {
            "auto" if device == Device::Cpu => Ok(Precision::F32),
            "auto" => Ok(Precision::Bf16),
            "f32" | "bf16" => Precision::parse(s),
            _ => Err(Error::Config(format!(
                "unknown precision {s:?}: expected auto, f32 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// How an op's output is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    /// f32 always: the residual stream itself, the logits, what goes to another rank.
    F32,
    /// bf16 under [`Precision::Bf16`], f32 otherwise: outputs that only feed GEMMs, the
    /// ops that read bf16 (attention, bias+GELU, dropout) and the adds onto the f32
    /// residual stream — as PyTorch's autocast keeps linear outputs in bf16 and
    /// LayerNorm statistics and residuals in f32.
    Compute,
}

/// Activation fused into a linear layer's epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Gelu,
}

enum Op {
    /// A tensor from outside (images, or a received activation).
    Input,
    Param(ParamId),
    Patchify,
    Linear {
        x: Var,
        w: Var,
        b: Option<Var>,
        /// pre-activation output, kept when the activation is GELU
        pre: Option<Tensor>,
        /// bf16 copies of x and W that the forward GEMM used ([`Precision::Bf16`])
        half: Option<(Tensor, Tensor)>,
    },
    Embed {
        patches: Var,
        cls: Var,
        pos: Var,
    },
    LayerNorm {
        x: Var,
        gamma: Var,
        beta: Var,
        mean: Tensor,
        rstd: Tensor,
    },
    Attention {
        qkv: Var,
        dims: AttnDims,
        probs: Tensor,
    },
    Add {
        a: Var,
        b: Var,
    },
    Dropout {
        x: Var,
        p: f32,
        key: DropoutKey,
        samples: Arc<[u64]>,
        /// `Some(r)`: the op is `r + dropout(x)` (dropout fused with a residual add)
        residual: Option<Var>,
    },
    SelectRows {
        x: Var,
        stride_rows: usize,
    },
    Reshape {
        x: Var,
    },
    CrossEntropy {
        logits: Var,
        dlogits: Tensor,
    },
}

struct Node {
    /// `None` for parameters (their value lives in the store) and after the backward
    /// sweep has released it.
    value: Option<Tensor>,
    grad: Option<Tensor>,
    needs_grad: bool,
    op: Op,
}

/// The parameters a graph reads and accumulates gradients into: borrowed for one
/// scoped computation, or owned while an [`Engine`](crate::engine::Engine) holds a
/// graph between its `forward` and `backward` calls.
enum Store<'a> {
    Borrowed(&'a mut ParamStore),
    Owned(ParamStore),
}

impl std::ops::Deref for Store<'_> {
    type Target = ParamStore;
    fn deref(&self) -> &ParamStore {
        match self {
            Store::Borrowed(s) => s,
            Store::Owned(s) => s,
        }
    }
}

impl std::ops::DerefMut for Store<'_> {
    fn deref_mut(&mut self) -> &mut ParamStore {
        match self {
            Store::Borrowed(s) => s,
            Store::Owned(s) => s,
        }
    }
}

/// One forward computation, recorded for its backward pass.
pub struct Graph<'a> {
    store: Store<'a>,
    nodes: Vec<Node>,
    param_vars: Vec<Option<Var>>,
    backend: &'static dyn Backend,
    device: Device,
    precision: Precision,
}

impl<'a> Graph<'a> {
    pub fn new(store: &'a mut ParamStore) -> Self {
        Graph::with_store(Store::Borrowed(store))
    }

    fn with_store(store: Store<'a>) -> Self {
        let n = store.len();
        let device = store
            .iter()
            .next()
            .map_or(Device::Cpu, |p| p.value.device());
        Graph {
            store,
            nodes: Vec::new(),
            param_vars: vec![None; n],
            backend: backend::for_device(device),
            device,
            precision: Precision::F32,
        }
    }

    /// The precision of the ops recorded from here on (f32 until set).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }

    /// A graph that owns the parameters until [`Graph::into_store`] gives them back.
    pub fn owning(store: ParamStore) -> Graph<'static> {
        Graph::with_store(Store::Owned(store))
    }

    /// The parameters of a graph made by [`Graph::owning`] (`None` for a borrowing one).
    pub fn into_store(self) -> Option<ParamStore> {
        match self.store {
            Store::Owned(s) => Some(s),
            Store::Borrowed(_) => None,
        }
    }

    fn push(&mut self, value: Tensor, needs_grad: bool, op: Op) -> Var {
        self.nodes.push(Node {
            value: Some(value),
            grad: None,
            needs_grad,
            op,
        });
        Var(self.nodes.len() - 1)
    }

    /// A constant input (no gradient).
    pub fn input(&mut self, value: Tensor) -> Var {
        self.push(value, false, Op::Input)
    }

    /// An input whose gradient is wanted (read it with [`Graph::grad`] after backward).
    pub fn input_with_grad(&mut self, value: Tensor) -> Var {
        self.push(value, true, Op::Input)
    }

    /// The node for a parameter (one node per parameter per graph).
    pub fn param(&mut self, id: ParamId) -> Var {
        if let Some(v) = self.param_vars[id.0] {
            return v;
        }
        self.nodes.push(Node {
            value: None,
            grad: None,
            needs_grad: true,
            op: Op::Param(id),
        });
        let v = Var(self.nodes.len() - 1);
        self.param_vars[id.0] = Some(v);
        v
    }

    /// The value of a node.
    ///
    /// # Panics
    /// If the backward sweep already released it (values are freed as the sweep
    /// passes them, to bound memory).
    pub fn value(&self, v: Var) -> &Tensor {
        let node = &self.nodes[v.0];
        match (&node.op, &node.value) {
            (Op::Param(id), _) => &self.store.get(*id).value,
            (_, Some(t)) => t,
            (_, None) => panic!("value of node {} was released by backward", v.0),
        }
    }

    /// The gradient of an input node after [`Graph::backward`] (parameter gradients are
    /// in the store).
    pub fn grad(&self, v: Var) -> Option<&Tensor> {
        match self.nodes[v.0].op {
            Op::Param(id) => Some(&self.store.get(id).grad),
            _ => self.nodes[v.0].grad.as_ref(),
        }
    }

    fn needs(&self, v: Var) -> bool {
        self.nodes[v.0].needs_grad
    }

    /// An output buffer (an error, not a panic, when the device is out of memory).
    fn out(&self, dims: &[usize]) -> Result<Tensor> {
        Tensor::try_uninit(Shape::new(dims), self.device)
    }

    /// An output buffer stored as `out` says under this graph's precision.
    fn out_as(&self, dims: &[usize], out: Out) -> Result<Tensor> {
        let dtype = match (out, self.precision) {
            (Out::Compute, Precision::Bf16) => DType::BF16,
            _ => DType::F32,
        };
        Tensor::try_uninit_as(Shape::new(dims), dtype, self.device)
    }

    fn with_last(dims: &[usize], last: usize) -> Vec<usize> {
        let mut d = dims.to_vec();
        if let Some(l) = d.last_mut() {
            *l = last;
        }
        d
    }

    /// Images `[b, c, h, w]` to patches `[b, (h/p)(w/p), c p p]`. Images are data, not
    /// trained, so this has no backward.
    pub fn patchify(&mut self, images: Var, patch: usize) -> Result<Var> {
        if self.needs(images) {
            return Err(Error::Graph(
                "patchify of a tensor that needs a gradient".into(),
            ));
        }
        let x = self.value(images);
        let &[b, c, h, w] = x.dims() else {
            return Err(Error::shape(
                "patchify",
                "[batch, channels, height, width]",
                x.shape(),
            ));
        };
        // The backend checks that `patch` divides the sides.
        let p = patch.max(1);
        // stored as the images are (bf16 from the device's augmentation under mixed
        // precision: the patches only feed the embedding GEMM)
        let dims = [b, (h / p) * (w / p), c * patch * patch];
        let mut out = Tensor::try_uninit_as(Shape::new(&dims), x.dtype(), self.device)?;
        self.backend.patchify(x, patch, &mut out)?;
        Ok(self.push(out, false, Op::Patchify))
    }

    /// `y = x Wᵀ + b` over the last dimension, optionally followed by GELU in the same
    /// pass. `W` is `[out, in…]` (a conv weight `[d, c, p, p]` counts as `[d, c p p]`).
    pub fn linear(&mut self, x: Var, w: Var, b: Option<Var>, act: Activation) -> Result<Var> {
        self.linear_to(x, w, b, act, Out::F32)
    }

    /// As [`Graph::linear`], the output (and GELU's pre-activation) stored as `store`.
    pub fn linear_to(
        &mut self,
        x: Var,
        w: Var,
        b: Option<Var>,
        act: Activation,
        store: Out,
    ) -> Result<Var> {
        let (xv, wv) = (self.value(x), self.value(w));
        let out_f = wv.dims().first().copied().unwrap_or(0);
        let in_f = xv.shape().last();
        if out_f == 0 || wv.numel() != out_f * in_f {
            return Err(Error::shape(
                "linear",
                format!("weight [_, {in_f}] for input {}", xv.shape()),
                wv.shape(),
            ));
        }
        if let Some(b) = b {
            self.value(b).expect_dims("linear bias", &[out_f])?;
        }
        let n = xv.shape().rows();
        let dims = Self::with_last(xv.dims(), out_f);
        let mut out = self.out_as(&dims, store)?;
        let half = match self.precision {
            Precision::F32 => None,
            Precision::Bf16 => Some((xv.try_to_dtype(DType::BF16)?, wv.try_to_dtype(DType::BF16)?)),
        };
        let (xv, wv) = half.as_ref().map_or((xv, wv), |(x, w)| (x, w));
        let pre = match act {
            Activation::None => {
                let mnk = (n, out_f, in_f);
                match b {
                    // the bias in the GEMM's epilogue where the device can (cuBLASLt)
                    Some(b) => self
                        .backend
                        .matmul_bias(&mut out, xv, wv, self.value(b), mnk)?,
                    None => self
                        .backend
                        .matmul(&mut out, xv, false, wv, true, mnk, false)?,
                }
                None
            }
            Activation::Gelu => {
                let mut pre = self.out_as(&dims, store)?;
                self.backend
                    .matmul(&mut pre, xv, false, wv, true, (n, out_f, in_f), false)?;
                let zero;
                let bias = match b {
                    Some(b) => self.value(b),
                    None => {
                        zero = Tensor::try_zeros([out_f], self.device)?;
                        &zero
                    }
                };
                self.backend.bias_gelu(&mut pre, bias, &mut out)?;
                Some(pre)
            }
        };
        let needs = self.needs(x) || self.needs(w) || b.is_some_and(|b| self.needs(b));
        Ok(self.push(out, needs, Op::Linear { x, w, b, pre, half }))
    }

    /// Token embedding: cls token first, then the patches, plus position embeddings.
    pub fn embed(&mut self, patches: Var, cls: Var, pos: Var) -> Result<Var> {
        let (p, c, e) = (self.value(patches), self.value(cls), self.value(pos));
        let &[b, l, d] = p.dims() else {
            return Err(Error::shape(
                "embed",
                "patches [batch, tokens, dim]",
                p.shape(),
            ));
        };
        if c.numel() != d || e.numel() != (l + 1) * d {
            return Err(Error::shape(
                "embed",
                format!("cls of {d} and pos of {} elements", (l + 1) * d),
                format!("{} and {}", c.shape(), e.shape()),
            ));
        }
        let mut out = self.out(&[b, l + 1, d])?;
        self.backend.embed(p, c, e, &mut out)?;
        let needs = self.needs(patches) || self.needs(cls) || self.needs(pos);
        Ok(self.push(out, needs, Op::Embed { patches, cls, pos }))
    }

    /// LayerNorm over the last dimension.
    pub fn layernorm(&mut self, x: Var, gamma: Var, beta: Var, eps: f32) -> Result<Var> {
        self.layernorm_to(x, gamma, beta, eps, Out::F32)
    }

    /// As [`Graph::layernorm`], the output stored as `store` (statistics stay f32).
    pub fn layernorm_to(
        &mut self,
        x: Var,
        gamma: Var,
        beta: Var,
        eps: f32,
        store: Out,
    ) -> Result<Var> {
        let (xv, g, b) = (self.value(x), self.value(gamma), self.value(beta));
        let d = xv.shape().last();
        g.expect_dims("layernorm weight", &[d])?;
        b.expect_dims("layernorm bias", &[d])?;
        let rows = xv.shape().rows();
        let mut y = self.out_as(xv.dims(), store)?;
        let mut mean = self.out(&[rows])?;
        let mut rstd = self.out(&[rows])?;
        self.backend
            .layernorm(xv, g, b, eps, &mut y, &mut mean, &mut rstd)?;
        let needs = self.needs(x) || self.needs(gamma) || self.needs(beta);
        Ok(self.push(
            y,
            needs,
            Op::LayerNorm {
                x,
                gamma,
                beta,
                mean,
                rstd,
            },
        ))
    }

    /// Multi-head self-attention core on packed `qkv` `[b, t, 3d]` → `[b, t, d]`.
    pub fn attention(&mut self, qkv: Var, heads: usize) -> Result<Var> {
        let t = self.value(qkv).dims().get(1).copied().unwrap_or(0);
        self.attention_queries(qkv, heads, t)
    }

    /// Attention where only the first `queries` tokens attend (all tokens are keys and
    /// values): `[b, t, 3d]` → `[b, queries, d]`.
    pub fn attention_queries(&mut self, qkv: Var, heads: usize, queries: usize) -> Result<Var> {
        let v = self.value(qkv);
        let &[b, t, d3] = v.dims() else {
            return Err(Error::shape(
                "attention",
                "qkv [batch, tokens, 3 dim]",
                v.shape(),
            ));
        };
        if d3 % 3 != 0 {
            return Err(Error::shape(
                "attention",
                "last dimension divisible by 3",
                v.shape(),
            ));
        }
        let dims = AttnDims {
            batch: b,
            tokens: t,
            queries,
            dim: d3 / 3,
            heads,
        };
        let mut probs = self.out(&[self.backend.attention_saved_len(dims)])?;
        // stored as qkv is (bf16 under mixed precision: it only feeds the projection)
        let mut out =
            Tensor::try_uninit_as(Shape::new(&[b, queries, d3 / 3]), v.dtype(), self.device)?;
        self.backend.attention(v, dims, &mut probs, &mut out)?;
        let needs = self.needs(qkv);
        Ok(self.push(out, needs, Op::Attention { qkv, dims, probs }))
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        if av.shape() != bv.shape() {
            return Err(Error::shape("add", av.shape(), bv.shape()));
        }
        let mut out = self.out(av.dims())?;
        self.backend.add(av, bv, &mut out)?;
        let needs = self.needs(a) || self.needs(b);
        Ok(self.push(out, needs, Op::Add { a, b }))
    }

    /// Inverted dropout with a counter-based mask (see [`DropoutKey`]); `samples` holds
    /// the global index of each sample in the batch (leading dimension). `p == 0` is
    /// the identity and records nothing.
    pub fn dropout(
        &mut self,
        x: Var,
        p: f32,
        key: DropoutKey,
        samples: &Arc<[u64]>,
    ) -> Result<Var> {
        if p == 0.0 {
            return Ok(x);
        }
        self.dropout_op(x, None, p, key, samples)
    }

    /// `residual + dropout(x)` in one pass (the residual connection of a block).
    pub fn dropout_add(
        &mut self,
        residual: Var,
        x: Var,
        p: f32,
        key: DropoutKey,
        samples: &Arc<[u64]>,
    ) -> Result<Var> {
        if p == 0.0 {
            return self.add(residual, x);
        }
        self.dropout_op(x, Some(residual), p, key, samples)
    }

    fn dropout_op(
        &mut self,
        x: Var,
        residual: Option<Var>,
        p: f32,
        key: DropoutKey,
        samples: &Arc<[u64]>,
    ) -> Result<Var> {
        let xv = self.value(x);
        if xv.dims().first() != Some(&samples.len()) {
            return Err(Error::shape(
                "dropout",
                format!("leading dimension {}", samples.len()),
                xv.shape(),
            ));
        }
        // stored as x is, unless added to the (f32) residual stream
        let dtype = if residual.is_some() {
            DType::F32
        } else {
            xv.dtype()
        };
        let mut out = Tensor::try_uninit_as(xv.shape().clone(), dtype, self.device)?;
        let mode = match residual {
            Some(r) => {
                let rv = self.value(r);
                if rv.shape() != xv.shape() {
                    return Err(Error::shape("dropout_add", xv.shape(), rv.shape()));
                }
                DropoutMode::AddTo(rv)
            }
            None => DropoutMode::Write,
        };
        self.backend.dropout(xv, p, key, samples, mode, &mut out)?;
        let needs = self.needs(x) || residual.is_some_and(|r| self.needs(r));
        let samples = samples.clone();
        Ok(self.push(
            out,
            needs,
            Op::Dropout {
                x,
                p,
                key,
                samples,
                residual,
            },
        ))
    }

    /// `[b, t, d]` → `[b, 1, d]`: token 0 (the cls token) of every image.
    pub fn select_cls(&mut self, x: Var) -> Result<Var> {
        let xv = self.value(x);
        let &[b, t, d] = xv.dims() else {
            return Err(Error::shape(
                "select_cls",
                "[batch, tokens, dim]",
                xv.shape(),
            ));
        };
        let mut out = self.out(&[b, 1, d])?;
        self.backend.select_rows(xv, t, &mut out)?;
        let needs = self.needs(x);
        Ok(self.push(out, needs, Op::SelectRows { x, stride_rows: t }))
    }

    /// The same elements under a new shape. Copies (meant for small tensors such as
    /// logits; large activations keep their shape through the ops).
    pub fn reshape(&mut self, x: Var, dims: &[usize]) -> Result<Var> {
        let out = self.value(x).clone().reshape(dims)?;
        let needs = self.needs(x);
        Ok(self.push(out, needs, Op::Reshape { x }))
    }

    /// Mean softmax cross-entropy of `logits` `[b, classes]` against `labels`, with
    /// label smoothing. The result is a one-element tensor.
    pub fn cross_entropy(
        &mut self,
        logits: Var,
        labels: &[usize],
        label_smoothing: f32,
    ) -> Result<Var> {
        if !(0.0..=1.0).contains(&label_smoothing) {
            return Err(Error::Config(format!(
                "label smoothing {label_smoothing} is outside [0, 1]"
            )));
        }
        let z = self.value(logits);
        if z.shape().rank() != 2 {
            return Err(Error::shape(
                "cross_entropy",
                "logits [batch, classes]",
                z.shape(),
            ));
        }
        let mut dlogits = self.out(z.dims())?;
        let loss = self
            .backend
            .cross_entropy(z, labels, label_smoothing, &mut dlogits)?;
        let out = Tensor::from_vec(vec![loss], [1])?;
        let needs = self.needs(logits);
        Ok(self.push(out, needs, Op::CrossEntropy { logits, dlogits }))
    }

    /// Backpropagates from a one-element node (a loss) with gradient 1.
    pub fn backward(&mut self, loss: Var) -> Result<()> {
        let shape = self.value(loss).shape().clone();
        if shape.numel() != 1 {
            return Err(Error::shape("backward", "a one-element loss", shape));
        }
        let one = Tensor::try_full(shape, 1.0, self.device)?;
        self.backward_from(loss, one)
    }

    /// Backpropagates `grad` (the gradient of some objective w.r.t. `var`) through
    /// everything `var` depends on. Parameter gradients accumulate into the store;
    /// intermediate values are released as the sweep passes them.
    pub fn backward_from(&mut self, var: Var, grad: Tensor) -> Result<()> {
        let want = self.value(var).shape().clone();
        if grad.shape() != &want {
            return Err(Error::shape("backward_from", want, grad.shape()));
        }
        self.accumulate(var, &grad)?;
        for i in (0..=var.0).rev() {
            let Some(g) = self.nodes[i].grad.take() else {
                continue;
            };
            self.backward_node(i, &g)?;
            let node = &mut self.nodes[i];
            if matches!(node.op, Op::Input) {
                node.grad = Some(g); // callers read input gradients
            } else if !matches!(node.op, Op::Param(_)) {
                // The root keeps its value (callers read the loss after backward).
                if i != var.0 {
                    node.value = None;
                }
                node.op = Op::Input; // drops saved tensors
            }
        }
        Ok(())
    }

    /// Takes the gradient slot of `v` out (zeroed if empty) so a kernel can write it
    /// while other nodes are borrowed; [`Graph::put_grad`] puts it back.
    fn take_grad(&mut self, v: Var) -> Result<Option<Tensor>> {
        if !self.needs(v) {
            return Ok(None);
        }
        Ok(Some(match self.nodes[v.0].op {
            Op::Param(id) => {
                // (an empty host placeholder until put_grad returns the gradient)
                let g = &mut self.store.get_mut(id).grad;
                std::mem::replace(g, Tensor::zeros([0], Device::Cpu))
            }
            _ => match self.nodes[v.0].grad.take() {
                // a gradient written in bf16 by its first consumer is summed on in f32
                Some(g) if g.dtype() == DType::BF16 => g.try_to_dtype(DType::F32)?,
                Some(g) => g,
                None => Tensor::try_zeros(self.value(v).shape().clone(), self.device)?,
            },
        }))
    }

    /// The gradient slot of `v` (if it needs one) for an op that can write it whole:
    /// `(slot, fresh)`, a fresh slot being new and uninitialised (the op must overwrite
    /// it, not accumulate into it: no zero-fill, no read). A fresh slot is stored as the
    /// value is (bf16 for mixed precision's bf16 activations, as PyTorch's autocast
    /// does); an existing one is f32 (see [`Graph::take_grad`]).
    fn take_grad_to_write(&mut self, v: Var) -> Result<Option<(Tensor, bool)>> {
        let param = matches!(self.nodes[v.0].op, Op::Param(_));
        if !self.needs(v) || param || self.nodes[v.0].grad.is_some() {
            return Ok(self.take_grad(v)?.map(|s| (s, false)));
        }
        let value = self.value(v);
        let slot = Tensor::try_uninit_as(value.shape().clone(), value.dtype(), self.device)?;
        Ok(Some((slot, true)))
    }

    /// The gradient slot of `v`, or a scratch buffer when `v` needs no gradient (for
    /// kernels that always produce every input's gradient); the flag says which.
    fn grad_or_scratch(&mut self, v: Var) -> Result<(Tensor, bool)> {
        Ok(match self.take_grad(v)? {
            Some(g) => (g, true),
            None => (
                Tensor::try_zeros(self.value(v).shape().clone(), self.device)?,
                false,
            ),
        })
    }

    fn put_grad(&mut self, v: Var, g: Option<Tensor>) {
        let Some(g) = g else { return };
        match self.nodes[v.0].op {
            Op::Param(id) => self.store.get_mut(id).grad = g,
            _ => self.nodes[v.0].grad = Some(g),
        }
    }

    /// Runs `f` on the gradient slot of `v` (if `v` needs one) with the graph readable.
    fn update_grad(
        &mut self,
        v: Var,
        f: impl FnOnce(&Self, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        let Some(mut slot) = self.take_grad(v)? else {
            return Ok(());
        };
        let r = f(self, &mut slot);
        self.put_grad(v, Some(slot));
        r
    }

    /// Adds `g` to the gradient of `v`. The first f32 contribution to a node's gradient
    /// is taken as a share of `g` (copy-on-write; no zero-fill, no add): an add passes
    /// its output gradient on to both inputs this way, e.g. the residual stream's.
    fn accumulate(&mut self, v: Var, g: &Tensor) -> Result<()> {
        let node = &mut self.nodes[v.0];
        if node.needs_grad
            && node.grad.is_none()
            && !matches!(node.op, Op::Param(_))
            && g.dtype() == DType::F32
        {
            node.grad = Some(g.share());
            return Ok(());
        }
        let be = self.backend;
        self.update_grad(v, |_, slot| {
            be.add_assign(slot, &*as_dtype(g, slot.dtype())?)
        })
    }

    fn backward_node(&mut self, i: usize, g: &Tensor) -> Result<()> {
        // Move the op out so its saved tensors can be read while grads are written.
        let op = std::mem::replace(&mut self.nodes[i].op, Op::Input);
        let r = self.backward_op(&op, g);
        self.nodes[i].op = op;
        r
    }

    fn backward_op(&mut self, op: &Op, g: &Tensor) -> Result<()> {
        let be = self.backend;
        match op {
            Op::Input | Op::Param(_) | Op::Patchify => {}
            Op::Linear { x, w, b, pre, half } => {
                let dpre_owned;
                let dpre = match pre {
                    Some(pre) => {
                        // GELU's input gradient, stored as its input is
                        let g = as_dtype(g, pre.dtype())?;
                        let mut d =
                            Tensor::try_uninit_as(g.shape().clone(), pre.dtype(), self.device)?;
                        be.gelu_backward(&g, pre, &mut d)?;
                        dpre_owned = d;
                        &dpre_owned
                    }
                    None => g,
                };
                let out_f = dpre.shape().last();
                let n = dpre.shape().rows();
                let in_f = self.value(*x).shape().last();
                if let Some(b) = *b {
                    self.update_grad(b, |_, db| be.bias_grad(dpre, db))?;
                }
                let (wt, xt) = ((out_f, in_f, n), (n, in_f, out_f));
                // mixed precision: the GEMMs take the output gradient in bf16 (rounded
                // once here unless it is stored so already)
                let dpre = match half {
                    Some(_) => as_dtype(dpre, DType::BF16)?,
                    None => std::borrow::Cow::Borrowed(dpre),
                };
                self.update_grad(*w, |s, dw| {
                    let x = half.as_ref().map_or_else(|| s.value(*x), |(x, _)| x);
                    be.matmul(dw, &dpre, true, x, false, wt, true)
                })?;
                // x's gradient is written whole when this is its first consumer backward
                if let Some((mut dx, fresh)) = self.take_grad_to_write(*x)? {
                    let w = half.as_ref().map_or_else(|| self.value(*w), |(_, w)| w);
                    let r = be.matmul(&mut dx, &dpre, false, w, false, xt, !fresh);
                    self.put_grad(*x, Some(dx));
                    r?;
                }
            }
            Op::Embed { patches, cls, pos } => {
                let (mut dp, kp) = self.grad_or_scratch(*patches)?;
                let (mut dc, kc) = self.grad_or_scratch(*cls)?;
                let (mut de, ke) = self.grad_or_scratch(*pos)?;
                let r = be.embed_backward(g, &mut dp, &mut dc, &mut de);
                self.put_grad(*patches, kp.then_some(dp));
                self.put_grad(*cls, kc.then_some(dc));
                self.put_grad(*pos, ke.then_some(de));
                r?;
            }
            Op::LayerNorm {
                x,
                gamma,
                beta,
                mean,
                rstd,
            } => {
                let (mut dx, kx) = self.grad_or_scratch(*x)?;
                let (mut dg, kg) = self.grad_or_scratch(*gamma)?;
                let (mut db, kb) = self.grad_or_scratch(*beta)?;
                let (xv, gv) = (self.value(*x), self.value(*gamma));
                let r = be.layernorm_backward(g, xv, gv, mean, rstd, &mut dx, &mut dg, &mut db);
                self.put_grad(*x, kx.then_some(dx));
                self.put_grad(*gamma, kg.then_some(dg));
                self.put_grad(*beta, kb.then_some(db));
                r?;
            }
            Op::Attention { qkv, dims, probs } => {
                // qkv's only consumer: a new gradient is written whole, not zero-filled
                // and accumulated into (when every token queries, so every row is written)
                let slot = if dims.queries == dims.tokens {
                    self.take_grad_to_write(*qkv)?
                } else {
                    self.take_grad(*qkv)?.map(|s| (s, false))
                };
                if let Some((mut slot, fresh)) = slot {
                    let qv = self.value(*qkv);
                    let g = as_dtype(g, qv.dtype())?;
                    let r = be.attention_backward(&g, qv, probs, *dims, &mut slot, !fresh);
                    self.put_grad(*qkv, Some(slot));
                    r?;
                }
            }
            Op::Add { a, b } => {
                self.accumulate(*a, g)?;
                self.accumulate(*b, g)?;
            }
            Op::Dropout {
                x,
                p,
                key,
                samples,
                residual,
            } => {
                if let Some(r) = residual {
                    self.accumulate(*r, g)?;
                }
                if let Some((mut d, fresh)) = self.take_grad_to_write(*x)? {
                    let mode = if fresh {
                        DropoutMode::Write
                    } else {
                        DropoutMode::Accumulate
                    };
                    // (g f32 and d bf16 for a mixed-precision branch: written in one pass)
                    let r = be.dropout(g, *p, *key, samples, mode, &mut d);
                    self.put_grad(*x, Some(d));
                    r?;
                }
            }
            Op::SelectRows { x, stride_rows } => {
                self.update_grad(*x, |_, d| {
                    be.select_rows_backward(&*as_dtype(g, d.dtype())?, *stride_rows, d)
                })?;
            }
            Op::Reshape { x } => {
                let g = g.clone().reshape(self.value(*x).shape().clone())?;
                self.accumulate(*x, &g)?;
            }
            Op::CrossEntropy { logits, dlogits } => {
                let mut scaled = dlogits.clone();
                be.scale(&mut scaled, g.to_device(Device::Cpu)?.f32s()?[0])?;
                self.accumulate(*logits, &scaled)?;
            }
        }
        Ok(())
    }
}

/// `t` stored as `dtype` (borrowed when it is already).
fn as_dtype(t: &Tensor, dtype: DType) -> Result<std::borrow::Cow<'_, Tensor>> {
    Ok(if t.dtype() == dtype {
        std::borrow::Cow::Borrowed(t)
    } else {
        std::borrow::Cow::Owned(t.try_to_dtype(dtype)?)
    })
}
