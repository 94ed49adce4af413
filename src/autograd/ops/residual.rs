//! The residual connection's ops: `add`, and `dropout_add` (`r + dropout(x)` in one
//! pass); plain `dropout` is the same kernel and node without the residual. An add's
//! backward hands its output gradient to both inputs as copy-on-write shares, so the
//! residual stream's gradient moves through the blocks without a copy.

use super::Op;
use crate::autograd::{Graph, Var};
use crate::backend::{DropoutKey, DropoutMode};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use std::sync::Arc;

/// What an add's backward reads.
pub(in crate::autograd) struct AddOp {
    a: Var,
    b: Var,
}

/// What dropout's backward reads: the mask is recomputed from the key and samples.
pub(in crate::autograd) struct DropoutOp {
    x: Var,
    p: f32,
    key: DropoutKey,
    samples: Arc<[u64]>,
    /// `Some(r)`: the op is `r + dropout(x)` (dropout fused with a residual add)
    residual: Option<Var>,
}

impl Graph<'_> {
    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let (av, bv) = (self.value(a), self.value(b));
        if av.shape() != bv.shape() {
            return Err(Error::shape("add", av.shape(), bv.shape()));
        }
        let mut out = self.out(av.dims())?;
        self.backend.add(av, bv, &mut out)?;
        let needs = self.needs(a) || self.needs(b);
        Ok(self.push(out, needs, Op::Add(AddOp { a, b })))
    }

    pub(super) fn add_backward(&mut self, op: &AddOp, g: &Tensor) -> Result<()> {
        self.accumulate(op.a, g)?;
        self.accumulate(op.b, g)
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
        let op = DropoutOp {
            x,
            p,
            key,
            samples,
            residual,
        };
        Ok(self.push(out, needs, Op::Dropout(op)))
    }

    pub(super) fn dropout_backward(&mut self, op: &DropoutOp, g: &Tensor) -> Result<()> {
        if let Some(r) = op.residual {
            self.accumulate(r, g)?;
        }
        let Some((mut d, fresh)) = self.take_grad_to_write(op.x)? else {
            return Ok(());
        };
        let mode = if fresh {
            DropoutMode::Write
        } else {
            DropoutMode::Accumulate
        };
        // (g f32 and d bf16 for a mixed-precision branch: written in one pass)
        let r = self
            .backend
            .dropout(g, op.p, op.key, &op.samples, mode, &mut d);
        self.put_grad(op.x, Some(d));
        r
    }
}
