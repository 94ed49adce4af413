//! Multi-head self-attention on a packed `qkv` tensor `[b, t, 3d]` (q, k, v blocks of
//! width `d`, head `h` at columns `h*hd..(h+1)*hd` of each block, as timm packs them).
//!
//! ViT's sequences are short (65 tokens): per (image, head) the products are 65×65×64,
//! far too small for a general GEMM's packing to pay off (the `gemm` crate reached
//! 3–15 GFLOPS here). Instead each head's q, k, v are gathered into small contiguous
//! buffers padded to the vector width (with kᵀ and vᵀ transposed), and every product
//! runs through a register-blocked micro-kernel (`simd::small_gemm`) with no packing
//! and no horizontal sums. Images run in parallel; each
//! task owns its image's slice of the output, so no unsafe sharing is needed.

use super::simd::{self, HeadDims, LANES};
use rayon::prelude::*;

/// Geometry of one attention call. Only the first `queries` tokens attend (all
/// `tokens` serve as keys and values): `queries == tokens` is ordinary self-attention,
/// `queries == 1` is what the last block needs when only the cls token is read.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub tokens: usize,
    pub queries: usize,
    pub dim: usize,
    pub heads: usize,
}

impl AttnDims {
    fn head_dim(self) -> usize {
        self.dim / self.heads
    }
}

/// Per-thread buffers for one head, padded to the micro-kernel's lane width (see
/// [`HeadDims`]); padding stays zero.
struct Scratch {
    dims: HeadDims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    kt: Vec<f32>,
    vt: Vec<f32>,
    o: Vec<f32>,
    ds: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl Scratch {
    fn new(dims: AttnDims) -> Self {
        let (t, nq) = (dims.tokens, dims.queries);
        let (tp, hp) = (
            t.next_multiple_of(LANES),
            dims.head_dim().next_multiple_of(LANES),
        );
        Scratch {
            dims: HeadDims { t, nq, tp, hp },
            q: vec![0.0; nq * hp],
            k: vec![0.0; t * hp],
            v: vec![0.0; t * hp],
            kt: vec![0.0; hp * tp],
            vt: vec![0.0; hp * tp],
            o: vec![0.0; nq * hp],
            ds: vec![0.0; nq * tp],
            dq: vec![0.0; nq * hp],
            dk: vec![0.0; t * hp],
            dv: vec![0.0; t * hp],
        }
    }

    /// Copies head `h` of one image's qkv rows (`[t, 3d]`) into q, k, v, kᵀ, vᵀ.
    fn gather(&mut self, qkv: &[f32], dims: AttnDims, h: usize) {
        let (d, hd) = (dims.dim, dims.head_dim());
        let HeadDims { t, nq, tp, hp } = self.dims;
        for j in 0..t {
            let row = &qkv[j * 3 * d..(j + 1) * 3 * d];
            let (qr, kr, vr) = (&row[h * hd..], &row[d + h * hd..], &row[2 * d + h * hd..]);
            if j < nq {
                self.q[j * hp..j * hp + hd].copy_from_slice(&qr[..hd]);
            }
            self.k[j * hp..j * hp + hd].copy_from_slice(&kr[..hd]);
            self.v[j * hp..j * hp + hd].copy_from_slice(&vr[..hd]);
            for c in 0..hd {
                self.kt[c * tp + j] = kr[c];
                self.vt[c * tp + j] = vr[c];
            }
        }
    }
}

/// `out = softmax(q kᵀ / sqrt(hd)) v` per head; saves the probabilities
/// (`probs`, `[b, heads, queries, t]`) for the backward pass.
pub fn attention(qkv: &[f32], dims: AttnDims, probs: &mut [f32], out: &mut [f32]) {
    let (t, nq, d, hd) = (dims.tokens, dims.queries, dims.dim, dims.head_dim());
    assert!(qkv.len() == dims.batch * t * 3 * d && out.len() == dims.batch * nq * d && nq <= t);
    assert!(probs.len() == dims.batch * dims.heads * nq * t && d % dims.heads == 0);
    let scale = 1.0 / (hd as f32).sqrt();
    let tp = t.next_multiple_of(LANES);
    out.par_chunks_mut(nq * d)
        .zip(probs.par_chunks_mut(dims.heads * nq * t))
        .enumerate()
        .for_each_init(
            || (Scratch::new(dims), vec![0.0f32; nq * tp]),
            |(s, p_pad), (b, (out, probs))| {
                let qkv = &qkv[b * t * 3 * d..(b + 1) * t * 3 * d];
                for (h, p) in probs.chunks_mut(nq * t).enumerate() {
                    s.gather(qkv, dims, h);
                    simd::attn_head_forward(&s.q, &s.kt, &s.v, &s.dims, scale, p_pad, &mut s.o);
                    let hp = s.dims.hp;
                    for i in 0..nq {
                        p[i * t..(i + 1) * t].copy_from_slice(&p_pad[i * tp..i * tp + t]);
                        out[i * d + h * hd..i * d + (h + 1) * hd]
                            .copy_from_slice(&s.o[i * hp..i * hp + hd]);
                    }
                }
            },
        );
}

/// Backward of [`attention`]: `dqkv += …` given `dout` and the saved `probs`.
pub fn attention_backward(
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    dims: AttnDims,
    dqkv: &mut [f32],
) {
    let (t, nq, d, hd) = (dims.tokens, dims.queries, dims.dim, dims.head_dim());
    assert!(qkv.len() == dims.batch * t * 3 * d && dqkv.len() == qkv.len() && nq <= t);
    assert!(dout.len() == dims.batch * nq * d && probs.len() == dims.batch * dims.heads * nq * t);
    let scale = 1.0 / (hd as f32).sqrt();
    let (tp, hp) = (t.next_multiple_of(LANES), hd.next_multiple_of(LANES));
    dqkv.par_chunks_mut(t * 3 * d)
        .zip(probs.par_chunks(dims.heads * nq * t))
        .enumerate()
        .for_each_init(
            || {
                (
                    Scratch::new(dims),
                    vec![0.0f32; nq * hp],
                    vec![0.0f32; nq * tp],
                )
            },
            |(s, dout_h, p_pad), (b, (dqkv, probs))| {
                let qkv = &qkv[b * t * 3 * d..(b + 1) * t * 3 * d];
                let dout = &dout[b * nq * d..(b + 1) * nq * d];
                for (h, p) in probs.chunks(nq * t).enumerate() {
                    s.gather(qkv, dims, h);
                    for i in 0..nq {
                        dout_h[i * hp..i * hp + hd]
                            .copy_from_slice(&dout[i * d + h * hd..i * d + (h + 1) * hd]);
                        p_pad[i * tp..i * tp + t].copy_from_slice(&p[i * t..(i + 1) * t]);
                    }
                    simd::attn_head_backward(
                        &s.q, &s.k, &s.vt, p_pad, dout_h, &s.dims, scale, &mut s.ds, &mut s.dq,
                        &mut s.dk, &mut s.dv,
                    );
                    for j in 0..t {
                        let row = &mut dqkv[j * 3 * d..(j + 1) * 3 * d];
                        if j < nq {
                            add(&mut row[h * hd..(h + 1) * hd], &s.dq[j * hp..j * hp + hd]);
                        }
                        add(
                            &mut row[d + h * hd..d + (h + 1) * hd],
                            &s.dk[j * hp..j * hp + hd],
                        );
                        add(
                            &mut row[2 * d + h * hd..2 * d + (h + 1) * hd],
                            &s.dv[j * hp..j * hp + hd],
                        );
                    }
                }
            },
        );
}

fn add(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}
