//! Multi-head self-attention's core on packed qkv (the projections are linear layers):
//! the forward saves what the backend's backward reads (the attention probabilities,
//! or whatever [`Backend::attention_saved_len`] sizes), the backward writes qkv's
//! gradient.
//!
//! [`Backend::attention_saved_len`]: crate::backend::Backend::attention_saved_len

use super::Op;
use crate::autograd::grad::as_dtype;
use crate::autograd::{Graph, Var};
use crate::backend::AttnDims;
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// What attention's backward reads.
pub(in crate::autograd) struct AttentionOp {
    qkv: Var,
    dims: AttnDims,
    probs: Tensor,
}

impl Graph<'_> {
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
        Ok(self.push(out, needs, Op::Attention(AttentionOp { qkv, dims, probs })))
    }

    pub(super) fn attention_backward(&mut self, op: &AttentionOp, g: &Tensor) -> Result<()> {
        let AttentionOp { qkv, dims, probs } = op;
        // qkv's only consumer: a new gradient is written whole, not zero-filled
        // and accumulated into (when every token queries, so every row is written)
        let slot = if dims.queries == dims.tokens {
            self.take_grad_to_write(*qkv)?
        } else {
            self.take_grad(*qkv)?.map(|s| (s, false))
        };
        let Some((mut slot, fresh)) = slot else {
            return Ok(());
        };
        let qv = self.value(*qkv);
        let g = as_dtype(g, qv.dtype())?;
        let r = self
            .backend
            .attention_backward(&g, qv, probs, *dims, &mut slot, !fresh);
        self.put_grad(*qkv, Some(slot));
        r
    }
}
