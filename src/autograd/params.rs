//! The named parameter store: every trainable tensor by its global name, with its
//! gradient. Models, optimizers and checkpoints all address parameters through it.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::HashMap;

/// Index of a parameter in its [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

impl ParamId {
    pub fn index(self) -> usize {
        self.0
    }
}

#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub value: Tensor,
    pub grad: Tensor,
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    params: Vec<Param>,
    by_name: HashMap<String, ParamId>,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a parameter; names must be unique.
    pub fn add(&mut self, name: impl Into<String>, value: Tensor) -> Result<ParamId> {
        let name = name.into();
        if self.by_name.contains_key(&name) {
            return Err(Error::Config(format!(
                "parameter `{name}` registered twice"
            )));
        }
        let id = ParamId(self.params.len());
        let grad = Tensor::zeros(value.shape().clone(), value.device());
        self.by_name.insert(name.clone(), id);
        self.params.push(Param { name, value, grad });
        Ok(id)
    }

    pub fn get(&self, id: ParamId) -> &Param {
        &self.params[id.0]
    }

    pub fn get_mut(&mut self, id: ParamId) -> &mut Param {
        &mut self.params[id.0]
    }

    pub fn id(&self, name: &str) -> Result<ParamId> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownParam(name.to_string()))
    }

    pub fn len(&self) -> usize {
        self.params.len()
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Parameters in registration order (stable: the model's construction order).
    /// Moves every value and gradient to `device`.
    pub fn to_device(&mut self, device: crate::tensor::Device) -> crate::error::Result<()> {
        for p in &mut self.params {
            p.value = p.value.to_device(device)?;
            p.grad = p.grad.to_device(device)?;
        }
        Ok(())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.params.iter_mut()
    }

    /// `(name, value)` pairs in a stable order, like PyTorch's `named_parameters()`.
    pub fn named_parameters(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.value))
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.value.numel()).sum()
    }

    /// Sets every gradient to zero (on a CUDA device in one launch for all of them).
    pub fn zero_grad(&mut self) -> Result<()> {
        use crate::tensor::Device;
        let mut by_device: Vec<(Device, Vec<&mut Tensor>)> = Vec::new();
        for p in &mut self.params {
            let device = p.grad.device();
            match by_device.iter_mut().find(|(d, _)| *d == device) {
                Some((_, grads)) => grads.push(&mut p.grad),
                None => by_device.push((device, vec![&mut p.grad])),
            }
        }
        for (device, mut grads) in by_device {
            crate::backend::for_device(device).fill_all(&mut grads, 0.0)?;
        }
        Ok(())
    }

    /// A store with the same parameter values, shared copy-on-write (O(1) per
    /// parameter), and empty gradients: lets several graphs read the parameters at
    /// once (a pipeline stage's micro-batches in flight).
    pub fn share(&self) -> ParamStore {
        let params = self
            .params
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                value: p.value.share(),
                grad: Tensor::zeros([0], p.grad.device()),
            })
            .collect();
        ParamStore {
            params,
            by_name: self.by_name.clone(),
        }
    }

    /// Exchanges the gradients of two stores with the same parameters.
    pub fn swap_grads(&mut self, other: &mut ParamStore) {
        for (a, b) in self.params.iter_mut().zip(other.params.iter_mut()) {
            std::mem::swap(&mut a.grad, &mut b.grad);
        }
    }

    /// Replaces a parameter's value; the shape must match.
    pub fn set(&mut self, name: &str, value: Tensor) -> Result<()> {
        let id = self.id(name)?;
        let p = &mut self.params[id.0];
        if p.value.shape() != value.shape() {
            return Err(Error::shape(
                "ParamStore::set",
                format!("`{name}` {}", p.value.shape()),
                value.shape(),
            ));
        }
        p.value = value.to_dtype(p.value.dtype());
        Ok(())
    }
}
