//! LayerNorm over the last dimension: the forward saves each row's mean and 1/std (f32
//! under any precision) for the backward, which writes x's, γ's and β's gradients in
//! one pass.

use super::Op;
use crate::autograd::{Graph, Out, Var};
use crate::error::Result;
use crate::tensor::Tensor;

/// What LayerNorm's backward reads.
pub(in crate::autograd) struct LayerNormOp {
    x: Var,
    gamma: Var,
    beta: Var,
    mean: Tensor,
    rstd: Tensor,
}

impl Graph<'_> {
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
        let op = LayerNormOp {
            x,
            gamma,
            beta,
            mean,
            rstd,
        };
        Ok(self.push(y, needs, Op::LayerNorm(op)))
    }

    pub(super) fn layernorm_backward(&mut self, op: &LayerNormOp, g: &Tensor) -> Result<()> {
        let LayerNormOp {
            x,
            gamma,
            beta,
            mean,
            rstd,
        } = op;
        // the kernel writes all three gradients, wanted or not
        let (mut dx, kx) = self.grad_or_scratch(*x)?;
        let (mut dg, kg) = self.grad_or_scratch(*gamma)?;
        let (mut db, kb) = self.grad_or_scratch(*beta)?;
        let (xv, gv) = (self.value(*x), self.value(*gamma));
        let r = self
            .backend
            .layernorm_backward(g, xv, gv, mean, rstd, &mut dx, &mut dg, &mut db);
        self.put_grad(*x, kx.then_some(dx));
        self.put_grad(*gamma, kg.then_some(dg));
        self.put_grad(*beta, kb.then_some(db));
        r
    }
}
