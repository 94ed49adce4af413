//! Softmax cross-entropy with label smoothing, or against soft targets (Mixup/CutMix): the forward computes the loss and its
//! gradient w.r.t. the logits in one pass and keeps the gradient; the backward scales
//! it by the loss's incoming gradient.

use super::Op;
use crate::autograd::{Graph, Var};
use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// What cross-entropy's backward reads.
pub(in crate::autograd) struct CrossEntropyOp {
    logits: Var,
    /// d loss / d logits, for an incoming gradient of 1
    dlogits: Tensor,
}

impl Graph<'_> {
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
        let op = CrossEntropyOp { logits, dlogits };
        Ok(self.push(out, needs, Op::CrossEntropy(op)))
    }

    /// Mean softmax cross-entropy of `logits` `[b, classes]` against soft `targets` of
    /// the same shape (each row a distribution over the classes, as Mixup/CutMix make
    /// them; `F.cross_entropy(logits, targets)`). The result is a one-element tensor.
    pub fn cross_entropy_soft(&mut self, logits: Var, targets: &Tensor) -> Result<Var> {
        let z = self.value(logits);
        if z.shape().rank() != 2 || targets.dims() != z.dims() {
            return Err(Error::shape(
                "cross_entropy_soft",
                format!("logits [batch, classes] and targets {:?}", z.dims()),
                format!("logits {:?}, targets {:?}", z.dims(), targets.dims()),
            ));
        }
        let targets = targets.to_device(z.device())?;
        let mut dlogits = self.out(z.dims())?;
        let loss = self
            .backend
            .cross_entropy_soft(self.value(logits), &targets, &mut dlogits)?;
        let out = Tensor::from_vec(vec![loss], [1])?;
        let needs = self.needs(logits);
        let op = CrossEntropyOp { logits, dlogits };
        Ok(self.push(out, needs, Op::CrossEntropy(op)))
    }

    pub(super) fn cross_entropy_backward(&mut self, op: &CrossEntropyOp, g: &Tensor) -> Result<()> {
        let mut scaled = op.dlogits.clone();
        self.backend
            .scale(&mut scaled, g.to_device(Device::Cpu)?.f32s()?[0])?;
        self.accumulate(op.logits, &scaled)
    }
}
