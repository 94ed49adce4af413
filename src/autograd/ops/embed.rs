//! Tokens into and out of the transformer: `patchify` (images to patches, no backward:
//! images are data), `embed` (cls token first, then the patches, plus position
//! embeddings) and `select_cls` (the cls token of every image, for the head).

use super::Op;
use crate::autograd::grad::as_dtype;
use crate::autograd::{Graph, Var};
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};

/// What the token embedding's backward reads.
pub(in crate::autograd) struct EmbedOp {
    patches: Var,
    cls: Var,
    pos: Var,
}

/// What `select_cls`'s backward reads.
pub(in crate::autograd) struct SelectRowsOp {
    x: Var,
    stride_rows: usize,
}

impl Graph<'_> {
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
        Ok(self.push(out, needs, Op::Embed(EmbedOp { patches, cls, pos })))
    }

    pub(super) fn embed_backward(&mut self, op: &EmbedOp, g: &Tensor) -> Result<()> {
        let EmbedOp { patches, cls, pos } = *op;
        // the kernel writes all three gradients, wanted or not
        let (mut dp, kp) = self.grad_or_scratch(patches)?;
        let (mut dc, kc) = self.grad_or_scratch(cls)?;
        let (mut de, ke) = self.grad_or_scratch(pos)?;
        let r = self.backend.embed_backward(g, &mut dp, &mut dc, &mut de);
        self.put_grad(patches, kp.then_some(dp));
        self.put_grad(cls, kc.then_some(dc));
        self.put_grad(pos, ke.then_some(de));
        r
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
        let op = SelectRowsOp { x, stride_rows: t };
        Ok(self.push(out, needs, Op::SelectRows(op)))
    }

    pub(super) fn select_rows_backward(&mut self, op: &SelectRowsOp, g: &Tensor) -> Result<()> {
        let be = self.backend;
        self.update_grad(op.x, |_, d| {
            be.select_rows_backward(&*as_dtype(g, d.dtype())?, op.stride_rows, d)
        })
    }
}
