//! Resampling a position embedding to another patch grid, as timm's
//! `resample_abs_pos_embed` does when a model is loaded at another image size:
//! the cls token's position is kept, the patch positions are a `dim`-channel image
//! over the grid, resized by `torch.nn.functional.interpolate(mode="bicubic",
//! align_corners=False, antialias=False)`.
//!
//! The bicubic kernel is PyTorch's (`aten/src/ATen/native/UpSample.h`:
//! `cubic_convolution1/2` with A = -0.75, `area_pixel_compute_source_index` with
//! `cubic = true` — the source coordinate `(i + 0.5) · in / out - 0.5` is not clamped —
//! and the four taps' indices clamped to the grid, `upsample_bicubic2d`'s
//! `access`/`guard_index_and_lambda`). `scripts/make_pos_embed_fixture.py` records timm's
//! output and `tests/core/vit.rs` compares.

/// PyTorch's `A` of the cubic convolution kernel.
const A: f64 = -0.75;

/// The four weights of the taps at offsets -1, 0, 1, 2 for fraction `t` in [0, 1).
fn cubic_weights(t: f64) -> [f64; 4] {
    // cubic_convolution1 for |x| <= 1, cubic_convolution2 for 1 < |x| < 2
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// For each output index along an axis of `from` → `to` samples: the four clamped
/// source indices and their weights.
fn taps(from: usize, to: usize) -> Vec<([usize; 4], [f64; 4])> {
    // PyTorch computes the scale and the source coordinate in the input's type (f32)
    let scale = from as f32 / to as f32;
    (0..to)
        .map(|i| {
            let src = scale * (i as f32 + 0.5) - 0.5;
            let base = src.floor();
            let t = (src - base) as f64;
            let index = |k: i64| (base as i64 + k).clamp(0, from as i64 - 1) as usize;
            ([index(-1), index(0), index(1), index(2)], cubic_weights(t))
        })
        .collect()
}

/// A position embedding `[1 + from², dim]` (cls first, then the grid row by row)
/// resampled to `[1 + to², dim]`: the cls row copied, the grid bicubically resized.
pub fn resample_pos_embed(pos: &[f32], dim: usize, from: usize, to: usize) -> Vec<f32> {
    assert_eq!(
        pos.len(),
        (1 + from * from) * dim,
        "pos_embed of a {from}² grid"
    );
    let (cls, grid) = pos.split_at(dim);
    let (rows, cols) = (taps(from, to), taps(from, to));
    let mut out = Vec::with_capacity((1 + to * to) * dim);
    out.extend_from_slice(cls);
    let mut acc = vec![0f64; dim];
    for (ys, wy) in &rows {
        for (xs, wx) in &cols {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (&y, &wy) in ys.iter().zip(wy) {
                for (&x, &wx) in xs.iter().zip(wx) {
                    let w = wy * wx;
                    let src = &grid[(y * from + x) * dim..][..dim];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a += w * v as f64;
                    }
                }
            }
            out.extend(acc.iter().map(|&a| a as f32));
        }
    }
    out
}

/// The side of the square patch grid of a position embedding with `tokens` rows (one
/// of them the cls token's), if it is one.
pub fn grid_side(tokens: usize) -> Option<usize> {
    let n = tokens.checked_sub(1)?;
    let side = n.isqrt();
    (side > 0 && side * side == n).then_some(side)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_the_same_grid_is_unchanged() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let s: f64 = cubic_weights(t).iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
        let pos: Vec<f32> = (0..(1 + 16) * 3).map(|i| i as f32 * 0.1).collect();
        let same = resample_pos_embed(&pos, 3, 4, 4);
        for (a, b) in same.iter().zip(&pos) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert_eq!(grid_side(65), Some(8));
        assert_eq!(grid_side(64), None);
        assert_eq!(grid_side(1), None);
    }
}
