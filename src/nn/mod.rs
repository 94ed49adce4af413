//! Layers: small structs holding parameter ids, each with `new` (registers and
//! initialises its parameters in a [`ParamStore`]) and `forward` (records ops on a
//! [`Graph`]).
//!
//! Initialisation follows PyTorch's defaults: `nn.Linear` and `nn.Conv2d` weights and
//! biases are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5));
//! `nn.LayerNorm` starts at weight 1, bias 0. The ViT's own tensors follow timm:
//! position embedding trunc_normal(std 0.02, cut at ±2 std), cls token normal(std 1e-6).

pub mod pos_embed;
mod vit;

pub use vit::{ForwardCtx, Part, PartInput, Vit, VitConfig, PRESETS};

use crate::autograd::{Activation, Graph, Out, ParamId, ParamStore, Var};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Where initial parameter values come from: a seeded random stream (training), or
/// zeros that are never touched (a model whose values a checkpoint replaces at once:
/// the zeros cost no time and no resident memory).
pub struct Init(Option<Rng>);

impl Init {
    pub fn random(seed: u64) -> Init {
        Init(Some(Rng::new(seed)))
    }

    pub fn zeros() -> Init {
        Init(None)
    }

    /// `n` values drawn with `f` (or zeros).
    pub fn vec(&mut self, n: usize, f: impl FnMut(&mut Rng) -> f32) -> Vec<f32> {
        match &mut self.0 {
            Some(rng) => rng.vec(n, f),
            None => vec![0.0; n],
        }
    }
}

/// `y = x Wᵀ + b`, weight `[out, in…]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamId,
    pub bias: ParamId,
}

impl Linear {
    /// `weight_dims` is `[out, in]`, or a conv kernel `[out, c, kh, kw]` (fan_in = c kh kw).
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        weight_dims: &[usize],
        init: &mut Init,
    ) -> Result<Self> {
        let out = weight_dims[0];
        let fan_in: usize = weight_dims[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n = out * fan_in;
        let w = Tensor::from_vec(init.vec(n, |r| r.uniform(-bound, bound)), weight_dims)?;
        let b = Tensor::from_vec(init.vec(out, |r| r.uniform(-bound, bound)), [out])?;
        Ok(Linear {
            weight: store.add(format!("{prefix}.weight"), w)?,
            bias: store.add(format!("{prefix}.bias"), b)?,
        })
    }

    pub fn forward(&self, g: &mut Graph, x: Var, act: Activation) -> Result<Var> {
        self.forward_to(g, x, act, Out::F32)
    }

    /// The output stored as `store` (see [`Out`]).
    pub fn forward_to(&self, g: &mut Graph, x: Var, act: Activation, store: Out) -> Result<Var> {
        let (w, b) = (g.param(self.weight), g.param(self.bias));
        g.linear_to(x, w, Some(b), act, store)
    }
}

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(store: &mut ParamStore, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: store.add(
                format!("{prefix}.weight"),
                Tensor::from_vec(vec![1.0; dim], [dim])?,
            )?,
            bias: store.add(
                format!("{prefix}.bias"),
                Tensor::from_vec(vec![0.0; dim], [dim])?,
            )?,
            eps,
        })
    }

    /// The output stored as `store` (see [`Out`]; the statistics are f32 always).
    pub fn forward(&self, g: &mut Graph, x: Var, store: Out) -> Result<Var> {
        let (w, b) = (g.param(self.weight), g.param(self.bias));
        g.layernorm_to(x, w, b, self.eps, store)
    }
}

/// Multi-head self-attention: packed qkv projection, scaled softmax, output projection.
#[derive(Clone, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub heads: usize,
}

impl Attention {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        dim: usize,
        heads: usize,
        init: &mut Init,
    ) -> Result<Self> {
        Ok(Attention {
            qkv: Linear::new(store, &format!("{prefix}.qkv"), &[3 * dim, dim], init)?,
            proj: Linear::new(store, &format!("{prefix}.proj"), &[dim, dim], init)?,
            heads,
        })
    }
}

/// `fc2(gelu(fc1(x)))`, with GELU fused into fc1's epilogue.
#[derive(Clone, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        dim: usize,
        hidden: usize,
        init: &mut Init,
    ) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new(store, &format!("{prefix}.fc1"), &[hidden, dim], init)?,
            fc2: Linear::new(store, &format!("{prefix}.fc2"), &[dim, hidden], init)?,
        })
    }
}
