//! Fused optimizer updates: one pass over (param, grad, state) per parameter tensor,
//! with PyTorch's exact update order (so results match `torch.optim` to rounding).

use crate::backend::{AdamStep, SgdStep};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

pub fn adam(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: AdamStep) {
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                let mut g = g;
                if s.decoupled {
                    *p *= 1.0 - s.lr * s.weight_decay;
                } else {
                    g += s.weight_decay * *p;
                }
                // torch's lerp_ with weight 1 - beta1 (< 0.5 for usual betas)
                *m += (1.0 - s.beta1) * (g - *m);
                *v = *v * s.beta2 + (1.0 - s.beta2) * g * g;
                let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
                *p -= s.step_size * (*m / denom);
            }
        });
}

/// `buf` is the momentum buffer; it may be empty when `momentum == 0`.
pub fn sgd(p: &mut [f32], g: &[f32], buf: &mut [f32], s: SgdStep) {
    if s.momentum == 0.0 {
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(p, g)| {
                for (p, &g) in p.iter_mut().zip(g) {
                    *p -= s.lr * (g + s.weight_decay * *p);
                }
            });
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(buf.par_chunks_mut(CHUNK))
        .for_each(|((p, g), buf)| {
            for ((p, &g), b) in p.iter_mut().zip(g).zip(buf) {
                let d = g + s.weight_decay * *p;
                *b = if s.first {
                    d
                } else {
                    *b * s.momentum + (1.0 - s.dampening) * d
                };
                *p -= s.lr * if s.nesterov { d + s.momentum * *b } else { *b };
            }
        });
}
