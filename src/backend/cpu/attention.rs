//! Multi-head self-attention on a packed `qkv` tensor `[b, t, 3d]` (q, k, v blocks of
//! width `d`, head `h` at columns `h*hd..(h+1)*hd` of each block, as timm packs them).
//!
//! ViT's sequences are short (65 tokens), so each (image, head) pair is a handful of
//! tiny products; they run in parallel over images × heads, each single-threaded, and
//! read q, k, v in place through strides — no reshapes or copies.

use super::ops::Round;
use crate::backend::gemm::{matmul_raw, Mat, Par, SharedMut};
use crate::backend::AttnDims;
use crate::tensor::convert::round_in_place_serial;
use rayon::prelude::*;

impl AttnDims {
    fn head_dim(self) -> usize {
        self.dim / self.heads
    }
    /// View of q (`which` = 0, the querying tokens only), k (1) or v (2) of head `h`
    /// of image `b` in qkv.
    fn qkv_view(self, b: usize, h: usize, which: usize) -> Mat {
        let (t, d) = (self.tokens, self.dim);
        Mat {
            offset: b * t * 3 * d + which * d + h * self.head_dim(),
            rows: if which == 0 { self.queries } else { t },
            cols: self.head_dim(),
            rs: 3 * d,
            cs: 1,
        }
    }
    /// View of head `h` of image `b` in an output-shaped tensor `[b, queries, d]`.
    fn out_view(self, b: usize, h: usize) -> Mat {
        let (q, d) = (self.queries, self.dim);
        Mat {
            offset: b * q * d + h * self.head_dim(),
            rows: q,
            cols: self.head_dim(),
            rs: d,
            cs: 1,
        }
    }
}

/// Rounds the elements of view `m` (unit column stride) of the buffer at `ptr` as
/// `round` says.
///
/// # Safety
/// The view must lie inside the buffer, and no other thread may touch its elements.
unsafe fn round_view(ptr: SharedMut, m: Mat, round: Round) {
    debug_assert!(m.cs == 1);
    for r in 0..m.rows {
        round.block(std::slice::from_raw_parts_mut(
            ptr.get().add(m.offset + r * m.rs),
            m.cols,
        ));
    }
}

/// `out = softmax(q kᵀ / sqrt(hd)) v` per head; saves the probabilities
/// (`probs`, `[b, heads, queries, t]`) for the backward pass. With `round` (mixed
/// precision) the probabilities are rounded to bf16 before they multiply v, as the
/// GPU's kernels (and FlashAttention) do; `out` is rounded as `store` says.
pub fn attention(
    qkv: &[f32],
    dims: AttnDims,
    probs: &mut [f32],
    (out, store): (&mut [f32], Round),
    round: bool,
) {
    let (t, q, d) = (dims.tokens, dims.queries, dims.dim);
    assert!(qkv.len() == dims.batch * t * 3 * d && out.len() == dims.batch * q * d && q <= t);
    assert!(probs.len() == dims.batch * dims.heads * q * t && d % dims.heads == 0);
    let scale = 1.0 / (dims.head_dim() as f32).sqrt();
    let out_ptr = SharedMut(out.as_mut_ptr());
    probs.par_chunks_mut(q * t).enumerate().for_each(|(bh, p)| {
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        // SAFETY: all views lie inside their buffers (lengths asserted above), and
        // each (b, h) task writes only its own head's columns of `out`.
        unsafe {
            matmul_raw(
                p.as_mut_ptr(),
                Mat::dense(q, t),
                qkv.as_ptr(),
                dims.qkv_view(b, h, 0),
                qkv.as_ptr(),
                dims.qkv_view(b, h, 1).t(),
                false,
                Par::Single,
            );
        }
        super::simd::softmax_rows(p, t, scale);
        if round {
            round_in_place_serial(p);
        }
        unsafe {
            matmul_raw(
                out_ptr.get(),
                dims.out_view(b, h),
                p.as_ptr(),
                Mat::dense(q, t),
                qkv.as_ptr(),
                dims.qkv_view(b, h, 2),
                false,
                Par::Single,
            );
            round_view(out_ptr, dims.out_view(b, h), store);
        }
    });
}

/// Backward of [`attention`]: `dqkv += …` given `dout` and the saved `probs`; with
/// `round`, the score gradient dS is rounded to bf16 before its products; `dqkv` is
/// rounded as `store` says.
pub fn attention_backward(
    dout: &[f32],
    qkv: &[f32],
    probs: &[f32],
    dims: AttnDims,
    (dqkv, store): (&mut [f32], Round),
    round: bool,
) {
    let (t, q, d) = (dims.tokens, dims.queries, dims.dim);
    assert!(qkv.len() == dims.batch * t * 3 * d && dqkv.len() == qkv.len() && q <= t);
    assert!(dout.len() == dims.batch * q * d && probs.len() == dims.batch * dims.heads * q * t);
    let scale = 1.0 / (dims.head_dim() as f32).sqrt();
    let dqkv_ptr = SharedMut(dqkv.as_mut_ptr());
    probs.par_chunks(q * t).enumerate().for_each_init(
        || vec![0.0f32; q * t],
        |ds, (bh, p)| {
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let dense = Mat::dense(q, t);
            // SAFETY: views lie inside their buffers (asserted above); task (b, h)
            // writes only head h's q, k, v columns of image b in `dqkv`.
            unsafe {
                // dP = dO Vᵀ
                matmul_raw(
                    ds.as_mut_ptr(),
                    dense,
                    dout.as_ptr(),
                    dims.out_view(b, h),
                    qkv.as_ptr(),
                    dims.qkv_view(b, h, 2).t(),
                    false,
                    Par::Single,
                );
                // dV += Pᵀ dO
                matmul_raw(
                    dqkv_ptr.get(),
                    dims.qkv_view(b, h, 2),
                    p.as_ptr(),
                    dense.t(),
                    dout.as_ptr(),
                    dims.out_view(b, h),
                    true,
                    Par::Single,
                );
            }
            // dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale   (softmax backward, with the
            // 1/sqrt(hd) of the forward folded in)
            super::simd::softmax_backward_rows(ds, p, t, scale);
            if round {
                round_in_place_serial(ds);
            }
            unsafe {
                // dQ += dS K
                matmul_raw(
                    dqkv_ptr.get(),
                    dims.qkv_view(b, h, 0),
                    ds.as_ptr(),
                    dense,
                    qkv.as_ptr(),
                    dims.qkv_view(b, h, 1),
                    true,
                    Par::Single,
                );
                // dK += dSᵀ Q
                matmul_raw(
                    dqkv_ptr.get(),
                    dims.qkv_view(b, h, 1),
                    ds.as_ptr(),
                    dense.t(),
                    qkv.as_ptr(),
                    dims.qkv_view(b, h, 0),
                    true,
                    Par::Single,
                );
                for which in 0..3 {
                    round_view(dqkv_ptr, dims.qkv_view(b, h, which), store);
                }
            }
        },
    );
}
