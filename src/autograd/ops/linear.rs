//! The linear layer `y = act(x Wᵀ + b)`, its activation (GELU) fused into the GEMM's
//! epilogue or into one bias+GELU pass, and its backward: GELU's, the bias's, W's and
//! x's gradients. Under [`Precision::Bf16`] the GEMMs read copies of x and W rounded to
//! bf16 (`Backend::gemm_operand`) made once in the forward and kept for the backward.

use super::Op;
use crate::autograd::grad::as_dtype;
use crate::autograd::{Graph, Out, Precision, Var};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::borrow::Cow;

/// Activation fused into a linear layer's epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    Gelu,
}

/// What a linear layer's backward reads.
pub(in crate::autograd) struct LinearOp {
    x: Var,
    w: Var,
    b: Option<Var>,
    /// pre-activation output, kept when the activation is GELU
    pre: Option<Tensor>,
    /// x and W rounded to bf16 as the forward GEMM used them ([`Precision::Bf16`])
    half: Option<(Tensor, Tensor)>,
}

/// `dims` with the last one replaced by `last`.
fn with_last(dims: &[usize], last: usize) -> Vec<usize> {
    let mut d = dims.to_vec();
    if let Some(l) = d.last_mut() {
        *l = last;
    }
    d
}

impl Graph<'_> {
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
        let out_f = self.linear_check(x, w, b)?;
        let half = match self.precision {
            Precision::F32 => None,
            Precision::Bf16 => {
                let w = self.gemm_weight(w)?;
                Some((self.backend.gemm_operand(self.value(x))?, w))
            }
        };
        let (xv, wv) = (self.value(x), self.value(w));
        let mnk = (xv.shape().rows(), out_f, xv.shape().last());
        let mut out = self.out_as(&with_last(xv.dims(), out_f), store)?;
        let (xv, wv) = half.as_ref().map_or((xv, wv), |(x, w)| (x, w));
        let bias = b.map(|b| self.value(b));
        let pre = match act {
            Activation::None => {
                match bias {
                    // the bias in the GEMM's epilogue where the device can (cuBLASLt)
                    Some(bias) => self.backend.matmul_bias(&mut out, xv, wv, bias, mnk)?,
                    None => self
                        .backend
                        .matmul(&mut out, xv, false, wv, true, mnk, false)?,
                }
                None
            }
            Activation::Gelu => Some(self.linear_gelu(&mut out, xv, wv, bias, mnk, store)?),
        };
        let needs = self.needs(x) || self.needs(w) || b.is_some_and(|b| self.needs(b));
        let op = LinearOp { x, w, b, pre, half };
        Ok(self.push(out, needs, Op::Linear(op)))
    }

    /// Checks W (and b) against x; the number of output features.
    fn linear_check(&self, x: Var, w: Var, b: Option<Var>) -> Result<usize> {
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
        Ok(out_f)
    }

    /// `out = gelu(x Wᵀ + b)`: the GEMM into the pre-activation, then one bias+GELU
    /// pass; the pre-activation (returned) is what GELU's backward reads.
    fn linear_gelu(
        &self,
        out: &mut Tensor,
        xv: &Tensor,
        wv: &Tensor,
        bias: Option<&Tensor>,
        mnk: (usize, usize, usize),
        store: Out,
    ) -> Result<Tensor> {
        let mut pre = self.out_as(out.dims(), store)?;
        self.backend
            .matmul(&mut pre, xv, false, wv, true, mnk, false)?;
        let zero;
        let bias = match bias {
            Some(b) => b,
            None => {
                zero = Tensor::try_zeros([mnk.1], self.device)?;
                &zero
            }
        };
        self.backend.bias_gelu(&mut pre, bias, out)?;
        Ok(pre)
    }

    pub(super) fn linear_backward(&mut self, op: &LinearOp, g: &Tensor) -> Result<()> {
        let LinearOp { x, w, b, pre, half } = op;
        let be = self.backend;
        let dpre = match pre {
            Some(pre) => Cow::Owned(self.gelu_backward(g, pre)?),
            None => Cow::Borrowed(g),
        };
        let out_f = dpre.shape().last();
        let n = dpre.shape().rows();
        let in_f = self.value(*x).shape().last();
        if let Some(b) = *b {
            self.update_grad(b, |_, db| be.bias_grad(&dpre, db))?;
        }
        let (wt, xt) = ((out_f, in_f, n), (n, in_f, out_f));
        // mixed precision: the GEMMs take the output gradient rounded to bf16 (once
        // here; as the backend multiplies it fastest)
        let dpre = match half {
            Some(_) => Cow::Owned(be.gemm_operand(&dpre)?),
            None => Cow::Borrowed(&*dpre),
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
        Ok(())
    }

    /// GELU's input gradient, stored as its input `pre` is.
    fn gelu_backward(&self, g: &Tensor, pre: &Tensor) -> Result<Tensor> {
        let g = as_dtype(g, pre.dtype())?;
        let mut d = Tensor::try_uninit_as(g.shape().clone(), pre.dtype(), self.device)?;
        self.backend.gelu_backward(&g, pre, &mut d)?;
        Ok(d)
    }
}
