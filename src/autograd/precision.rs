//! Mixed-precision policy: the precision a graph computes in ([`Precision`]) and how
//! each op's output is stored under it ([`Out`]).

use super::ops::Op;
use super::{Graph, ParamId, Var};
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape, Tensor};

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

impl Graph<'_> {
    /// The precision of the ops recorded from here on (f32 until set).
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    /// An output buffer stored as `out` says under this graph's precision.
    pub(super) fn out_as(&self, dims: &[usize], out: Out) -> Result<Tensor> {
        let dtype = match (out, self.precision) {
            (Out::Compute, Precision::Bf16) => DType::BF16,
            _ => DType::F32,
        };
        Tensor::try_uninit_as(Shape::new(dims), dtype, self.device)
    }

    /// `w` as a mixed-precision GEMM operand ([`Backend::gemm_operand`]). A parameter's
    /// is made once per graph: the first one casts every matrix parameter of the graph's
    /// store (two or more dimensions: the GEMM weights, with the position embedding and
    /// class token, a few thousand values) in one backend call, one launch on a GPU
    /// instead of one per layer.
    ///
    /// [`Backend::gemm_operand`]: crate::backend::Backend::gemm_operand
    pub(super) fn gemm_weight(&mut self, w: Var) -> Result<Tensor> {
        let Op::Param(id) = self.nodes[w.0].op else {
            return self.backend.gemm_operand(self.value(w));
        };
        if self.half_params[id.0].is_none() {
            let ids: Vec<ParamId> = (0..self.store.len())
                .map(ParamId)
                .filter(|&p| {
                    self.half_params[p.0].is_none()
                        && (p == id || self.store.get(p).value.dims().len() >= 2)
                })
                .collect();
            let values: Vec<&Tensor> = ids.iter().map(|&p| &self.store.get(p).value).collect();
            let halves = self.backend.gemm_operands(&values)?;
            for (p, h) in ids.into_iter().zip(halves) {
                self.half_params[p.0] = Some(h);
            }
        }
        self.half_params[id.0].clone().ok_or_else(|| {
            let name = &self.store.get(id).name;
            Error::Device(format!(
                "the backend made no bf16 copy of parameter `{name}`"
            ))
        })
    }
}
