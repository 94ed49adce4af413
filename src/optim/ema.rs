//! An exponential moving average of the weights, as timm's `ModelEmaV3`: after each
//! optimizer step `ema = d · ema + (1 − d) · param`, with timm's `get_decay(step)`
//! (the first update copies the weights; with warm-up the decay rises as
//! `1 − (1 + t)^(−2/3)` up to `d`). Kept for this rank's parameters, where they are
//! (CPU or GPU), and named `ema.<param>` for checkpoints.

use crate::autograd::ParamStore;
use crate::backend;
use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// The prefix of the EMA's tensor names in checkpoints.
pub const EMA_PREFIX: &str = "ema.";

/// The average, one tensor per parameter in the store's order.
#[derive(Clone, Debug)]
pub struct Ema {
    pub decay: f32,
    pub warmup: bool,
    values: Vec<Tensor>,
}

impl Ema {
    /// An average that starts as the parameters (its first update copies them anyway).
    pub fn new(decay: f32, warmup: bool, store: &ParamStore) -> Result<Ema> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::Config(format!(
                "ema_decay = {decay}: must be in [0, 1)"
            )));
        }
        let values = store.iter().map(|p| p.value.share()).collect();
        Ok(Ema {
            decay,
            warmup,
            values,
        })
    }

    /// timm's `ModelEmaV3.get_decay(step)` (`update_after_step` 0, `min_decay` 0,
    /// `warmup_gamma` 1, `warmup_power` 2/3): `step` counts optimizer updates,
    /// this one included.
    pub fn decay_at(&self, step: u64) -> f32 {
        let t = step.saturating_sub(1);
        if t == 0 {
            return 0.0;
        }
        if !self.warmup {
            return self.decay;
        }
        let d = 1.0 - (1.0 + t as f64).powf(-2.0 / 3.0);
        d.clamp(0.0, self.decay as f64) as f32
    }

    /// One update after optimizer step `step`: `ema = d · ema + (1 − d) · param`, as a
    /// scale and an add of the scaled parameter on their device.
    pub fn update(&mut self, store: &ParamStore, step: u64) -> Result<()> {
        let d = self.decay_at(step);
        for (e, p) in self.values.iter_mut().zip(store.iter()) {
            let be = backend::for_device(p.value.device());
            let mut scaled = p.value.share();
            be.scale(&mut scaled, 1.0 - d)?;
            be.scale(e, d)?;
            be.add_assign(e, &scaled)?;
        }
        Ok(())
    }

    /// `(ema.<param>, tensor)` of every parameter, for a checkpoint.
    pub fn named<'a>(&'a self, store: &'a ParamStore) -> Vec<(String, &'a Tensor)> {
        store
            .iter()
            .zip(&self.values)
            .map(|(p, t)| (format!("{EMA_PREFIX}{}", p.name), t))
            .collect()
    }

    /// Replaces the average from `get(ema.<param>)` for every parameter (all of them
    /// or nothing changes), each checked against its parameter's shape.
    pub fn load(
        &mut self,
        store: &ParamStore,
        mut get: impl FnMut(&str) -> Option<Tensor>,
    ) -> Result<()> {
        let mut values = Vec::with_capacity(self.values.len());
        for p in store.iter() {
            let key = format!("{EMA_PREFIX}{}", p.name);
            let t = get(&key).ok_or_else(|| Error::Config(format!("`{key}` is missing")))?;
            if t.shape() != p.value.shape() {
                return Err(Error::Config(format!(
                    "`{key}` has shape {} but its parameter {}",
                    t.shape(),
                    p.value.shape()
                )));
            }
            values.push(t.to_device(p.value.device())?);
        }
        self.values = values;
        Ok(())
    }

    /// Restarts the average from the parameters (after weights were loaded without it).
    pub fn reset(&mut self, store: &ParamStore) {
        self.values = store.iter().map(|p| p.value.share()).collect();
    }

    pub fn to_device(&mut self, device: Device) -> Result<()> {
        for t in &mut self.values {
            *t = t.to_device(device)?;
        }
        Ok(())
    }

    /// Exchanges the average with the parameters' values (twice restores both): to
    /// evaluate the averaged weights with the model's own forward pass.
    pub fn swap(&mut self, store: &mut ParamStore) {
        for (e, p) in self.values.iter_mut().zip(store.iter_mut()) {
            std::mem::swap(e, &mut p.value);
        }
    }
}
