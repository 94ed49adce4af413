//! Gradient hand-over during the backward sweep: how an op's backward takes an input's
//! gradient slot out of the graph (so a kernel can write it while other nodes are
//! read), writes a first gradient whole instead of zero-filling and adding, shares an
//! f32 gradient copy-on-write, and puts the slot back.

use super::{Graph, Op, Var};
use crate::error::Result;
use crate::tensor::{DType, Device, Tensor};
use std::borrow::Cow;

impl Graph<'_> {
    /// Takes the gradient slot of `v` out (zeroed if empty) so a kernel can write it
    /// while other nodes are borrowed; [`Graph::put_grad`] puts it back.
    pub(super) fn take_grad(&mut self, v: Var) -> Result<Option<Tensor>> {
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
    pub(super) fn take_grad_to_write(&mut self, v: Var) -> Result<Option<(Tensor, bool)>> {
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
    pub(super) fn grad_or_scratch(&mut self, v: Var) -> Result<(Tensor, bool)> {
        Ok(match self.take_grad(v)? {
            Some(g) => (g, true),
            None => (
                Tensor::try_zeros(self.value(v).shape().clone(), self.device)?,
                false,
            ),
        })
    }

    pub(super) fn put_grad(&mut self, v: Var, g: Option<Tensor>) {
        let Some(g) = g else { return };
        match self.nodes[v.0].op {
            Op::Param(id) => self.store.get_mut(id).grad = g,
            _ => self.nodes[v.0].grad = Some(g),
        }
    }

    /// Runs `f` on the gradient slot of `v` (if `v` needs one) with the graph readable.
    pub(super) fn update_grad(
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
    pub(super) fn accumulate(&mut self, v: Var, g: &Tensor) -> Result<()> {
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
}

/// `t` stored as `dtype` (borrowed when it is already).
pub(super) fn as_dtype(t: &Tensor, dtype: DType) -> Result<Cow<'_, Tensor>> {
    Ok(if t.dtype() == dtype {
        Cow::Borrowed(t)
    } else {
        Cow::Owned(t.try_to_dtype(dtype)?)
    })
}
