//! `reshape`: the same elements under a new shape, and the gradient back under the old.

use super::Op;
use crate::autograd::{Graph, Var};
use crate::error::Result;
use crate::tensor::Tensor;

/// What reshape's backward reads.
pub(in crate::autograd) struct ReshapeOp {
    x: Var,
}

impl Graph<'_> {
    /// The same elements under a new shape. Copies (meant for small tensors such as
    /// logits; large activations keep their shape through the ops).
    pub fn reshape(&mut self, x: Var, dims: &[usize]) -> Result<Var> {
        let out = self.value(x).clone().reshape(dims)?;
        let needs = self.needs(x);
        Ok(self.push(out, needs, Op::Reshape(ReshapeOp { x })))
    }

    pub(super) fn reshape_backward(&mut self, op: &ReshapeOp, g: &Tensor) -> Result<()> {
        let g = g.clone().reshape(self.value(op.x).shape().clone())?;
        self.accumulate(op.x, &g)
    }
}
