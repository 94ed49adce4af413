//! The compute-bound inner loops, compiled for AVX-512, AVX2+FMA and the baseline,
//! with the variant picked at run time.
//!
//! The crate builds for the baseline x86-64 target (so one binary runs anywhere);
//! `simd_fn!` (crate::simd) recompiles a loop body with wider vector features and
//! dispatches at run time. Bodies use no explicit `mul_add` and Rust does not contract
//! floating point, so every variant gives bit-identical results.

use super::math;
use crate::backend::spec::mix64;
use crate::simd::simd_fn;

/// Sum with 16 independent accumulators (vectorisable; a fixed order, so results do
/// not depend on the variant).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// Dot product with the same fixed 16-lane order as [`sum`].
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut cx = x.chunks_exact(16);
    let mut cy = y.chunks_exact(16);
    for (a, b) in (&mut cx).zip(&mut cy) {
        for ((s, u), v) in acc.iter_mut().zip(a).zip(b) {
            *s += u * v;
        }
    }
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .map(|(u, v)| u * v)
        .sum();
    acc.iter().sum::<f32>() + tail
}

simd_fn! {
    /// Rows of `x` (width `bias.len()`): `x += bias`.
    pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
        for r in x.chunks_mut(bias.len()) {
            r.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
    }
}

simd_fn! {
    /// Rows of `pre` (width `bias.len()`): `pre += bias; out = gelu(pre)`.
    pub fn bias_gelu_rows(pre: &mut [f32], bias: &[f32], out: &mut [f32]) {
        for (p, o) in pre.chunks_mut(bias.len()).zip(out.chunks_mut(bias.len())) {
            for ((p, o), b) in p.iter_mut().zip(o.iter_mut()).zip(bias) {
                *p += b;
                *o = math::gelu(*p);
            }
        }
    }
}

simd_fn! {
    /// `dpre = dy * gelu'(pre)`.
    pub fn gelu_backward(dy: &[f32], pre: &[f32], dpre: &mut [f32]) {
        for ((o, g), x) in dpre.iter_mut().zip(dy).zip(pre) {
            *o = g * math::gelu_grad(*x);
        }
    }
}

simd_fn! {
    /// LayerNorm of the rows of `x` (width `gamma.len()`), saving mean and 1/std.
    pub fn layernorm_rows(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y: &mut [f32], mean: &mut [f32], rstd: &mut [f32]) {
        let d = gamma.len();
        for (((y, x), m), s) in y.chunks_mut(d).zip(x.chunks(d)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
            let mu = sum(x) / d as f32;
            let mut acc = [0.0f32; 16];
            let mut cx = x.chunks_exact(16);
            for c in &mut cx {
                for (a, v) in acc.iter_mut().zip(c) {
                    *a += (v - mu) * (v - mu);
                }
            }
            let tail: f32 = cx.remainder().iter().map(|v| (v - mu) * (v - mu)).sum();
            let var = (acc.iter().sum::<f32>() + tail) / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            for (((y, x), g), b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
                *y = (x - mu) * r * g + b;
            }
            *m = mu;
            *s = r;
        }
    }
}

simd_fn! {
    /// Input gradient of LayerNorm for a block of rows: `dx += …`.
    pub fn layernorm_backward_rows(dy: &[f32], x: &[f32], gamma: &[f32], mean: &[f32], rstd: &[f32], dx: &mut [f32]) {
        let d = gamma.len();
        for ((((dx, x), dy), &mu), &rs) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)).zip(mean).zip(rstd) {
            let (mut sg, mut sgx) = ([0.0f32; 16], [0.0f32; 16]);
            let (mut cx, mut cdy, mut cg) = (x.chunks_exact(16), dy.chunks_exact(16), gamma.chunks_exact(16));
            for ((xc, dyc), gc) in (&mut cx).zip(&mut cdy).zip(&mut cg) {
                for k in 0..16 {
                    let dxh = dyc[k] * gc[k];
                    sg[k] += dxh;
                    sgx[k] += dxh * (xc[k] - mu) * rs;
                }
            }
            let (mut tail_g, mut tail_gx) = (0.0f32, 0.0f32);
            for ((x, dy), g) in cx.remainder().iter().zip(cdy.remainder()).zip(cg.remainder()) {
                tail_g += dy * g;
                tail_gx += dy * g * (x - mu) * rs;
            }
            let a = (sg.iter().sum::<f32>() + tail_g) / d as f32;
            let c = (sgx.iter().sum::<f32>() + tail_gx) / d as f32;
            for (((dx, x), dy), g) in dx.iter_mut().zip(x).zip(dy).zip(gamma) {
                let xh = (x - mu) * rs;
                *dx += rs * (dy * g - a - xh * c);
            }
        }
    }
}

simd_fn! {
    /// Row-wise softmax of `scale * s` in place (rows of width `t`).
    pub fn softmax_rows(s: &mut [f32], t: usize, scale: f32) {
        for row in s.chunks_mut(t) {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            for v in row.iter_mut() {
                *v = math::exp((*v - m) * scale);
            }
            let inv = 1.0 / sum(row);
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

simd_fn! {
    /// Softmax backward in place: `ds = p ⊙ (ds − rowsum(p ⊙ ds)) · scale`.
    pub fn softmax_backward_rows(ds: &mut [f32], p: &[f32], t: usize, scale: f32) {
        for (dsr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
            let d = dot(dsr, pr);
            for (g, &pv) in dsr.iter_mut().zip(pr) {
                *g = pv * (*g - d) * scale;
            }
        }
    }
}

/// What a dropout pass does with the masked, rescaled input `m = x * mask / (1 - p)`.
#[derive(Clone, Copy)]
pub enum DropMode<'a> {
    /// `out = m`
    Write,
    /// `out += m` (backward)
    Accumulate,
    /// `out = residual + m` (dropout fused with the residual add)
    AddTo(&'a [f32]),
}

simd_fn! {
    /// Dropout over one sample's elements. Element `e` is kept iff 16-bit lane `e % 4`
    /// of `mix64(base ^ (e / 4))` is at least `threshold` (= p · 2^16). Masks are built
    /// 64 elements at a time so the hashing and the apply loop both vectorise.
    pub fn dropout_sample(x: &[f32], base: u64, threshold: u32, scale: f32, mode: DropMode, out: &mut [f32]) {
        let mut mask = [0.0f32; 64];
        for (blk, (o, x)) in out.chunks_mut(64).zip(x.chunks(64)).enumerate() {
            for (g, m) in mask.chunks_exact_mut(4).enumerate() {
                let h = mix64(base ^ (blk * 16 + g) as u64);
                for (k, m) in m.iter_mut().enumerate() {
                    *m = if ((h >> (16 * k)) & 0xffff) as u32 >= threshold { scale } else { 0.0 };
                }
            }
            let mask = &mask[..o.len()];
            match mode {
                DropMode::Write => o.iter_mut().zip(x).zip(mask).for_each(|((o, x), m)| *o = x * m),
                DropMode::Accumulate => o.iter_mut().zip(x).zip(mask).for_each(|((o, x), m)| *o += x * m),
                DropMode::AddTo(r) => {
                    let r = &r[blk * 64..blk * 64 + o.len()];
                    o.iter_mut().zip(x).zip(mask).zip(r).for_each(|(((o, x), m), r)| *o = r + x * m)
                }
            }
        }
    }
}
