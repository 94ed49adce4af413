//! Fused f32 kernels for the ViT op set, multi-threaded with rayon.
//!
//! Every kernel is one pass over its data where PyTorch eager would launch several
//! ops. Work is split into fixed-size chunks (never "one chunk per thread"), so results
//! do not depend on the thread count. Gradient outputs accumulate (`+=`), because a
//! tensor may feed several consumers.

use super::simd::{self, DropMode};
use crate::backend::spec::{mix64, site_key};
use crate::backend::{AugmentBatch, DropoutKey};
use crate::tensor::convert;
use rayon::prelude::*;

/// Elements per parallel task for elementwise loops.
const CHUNK: usize = 1 << 15;
/// Rows per parallel task for row-wise kernels whose rows are a few hundred wide.
const ROWS: usize = 32;

/// Whether a kernel rounds its output to bf16 (nearest even) as it writes it: mixed
/// precision's activations held widened in f32 (`CpuStorage::BF16Wide`), rounded block
/// by block while each block is still in cache rather than in a pass of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    No,
    Bf16,
}

impl Round {
    /// Rounds a block the calling task has just written.
    pub fn block(self, x: &mut [f32]) {
        if self == Round::Bf16 {
            convert::round_in_place_serial(x);
        }
    }

    /// Rounds a whole output, in a parallel pass of its own.
    pub fn all(self, x: &mut [f32]) {
        if self == Round::Bf16 {
            convert::round_in_place(x);
        }
    }
}

/// `dst += src`
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
}

/// `out = a + b`
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    assert!(a.len() == b.len() && a.len() == out.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// `x *= s`
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// Sum of squares, accumulated in f64 per chunk (for global-norm clipping).
pub fn sum_squares(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum())
        .collect();
    partial.iter().sum()
}

/// Sums over rows into `acc` (length `width`): each task of `ROWS` rows fills a
/// private partial with `f(row, partial)`; partials are added in row order.
fn reduce_rows<F>(rows: usize, width: usize, acc: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let tasks = rows.div_ceil(ROWS);
    let partials: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let mut p = vec![0.0f32; width];
            for r in t * ROWS..((t + 1) * ROWS).min(rows) {
                f(r, &mut p);
            }
            p
        })
        .collect();
    for p in partials {
        acc.iter_mut().zip(&p).for_each(|(a, v)| *a += v);
    }
}

/// Every row of `out` (`[n, d]`) set to `bias` (`[d]`), rounded as `round` says.
pub fn fill_rows(out: &mut [f32], bias: &[f32], round: Round) {
    let d = bias.len();
    out.par_chunks_mut(d * ROWS).for_each(|c| {
        c.chunks_mut(d).for_each(|r| r.copy_from_slice(bias));
        round.block(c);
    });
}

/// `bias` (`[d]`) added to every row of `out` (`[n, d]`), rounded as `round` says: a
/// GEMM's bias, added in the same pass that rounds its output.
pub fn add_rows(out: &mut [f32], bias: &[f32], round: Round) {
    let d = bias.len();
    out.par_chunks_mut(d * ROWS).for_each(|c| {
        simd::add_bias_rows(c, bias);
        round.block(c);
    });
}

/// `db += column sums of dy` (`dy` is `[n, d]`).
pub fn bias_grad(dy: &[f32], db: &mut [f32]) {
    let d = db.len();
    reduce_rows(dy.len() / d, d, db, |r, p| {
        p.iter_mut()
            .zip(&dy[r * d..(r + 1) * d])
            .for_each(|(p, g)| *p += g)
    });
}

/// In one pass: `pre += bias` (row-wise) and `out = gelu(pre)`, each rounded as its
/// [`Round`] says (the GELU reads `pre` before it is rounded, as the GPU kernel does).
pub fn bias_gelu(pre: &mut [f32], bias: &[f32], out: &mut [f32], round: (Round, Round)) {
    let d = bias.len();
    pre.par_chunks_mut(d * ROWS)
        .zip(out.par_chunks_mut(d * ROWS))
        .for_each(|(p, o)| {
            simd::bias_gelu_rows(p, bias, o);
            round.0.block(p);
            round.1.block(o);
        });
}

/// `dpre = dy * gelu'(pre)` (overwrites `dpre`).
pub fn gelu_backward(dy: &[f32], pre: &[f32], dpre: &mut [f32], round: Round) {
    dpre.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK).zip(pre.par_chunks(CHUNK)))
        .for_each(|(o, (g, x))| {
            simd::gelu_backward(g, x, o);
            round.block(o);
        });
}

/// LayerNorm over the last dimension `d` of `x` (`[n, d]`); saves per-row mean and
/// 1/std for the backward pass.
pub fn layernorm(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    (y, round): (&mut [f32], Round),
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let d = gamma.len();
    y.par_chunks_mut(d * ROWS)
        .zip(x.par_chunks(d * ROWS))
        .zip(mean.par_chunks_mut(ROWS).zip(rstd.par_chunks_mut(ROWS)))
        .for_each(|((y, x), (mean, rstd))| {
            simd::layernorm_rows(x, gamma, beta, eps, y, mean, rstd);
            round.block(y);
        });
}

/// Backward of [`layernorm`]: `dx += …`, `dgamma += …`, `dbeta += …`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dy: &[f32],
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let d = gamma.len();
    let n = mean.len();
    dx.par_chunks_mut(d * ROWS).enumerate().for_each(|(t, dx)| {
        let rows = t * ROWS..t * ROWS + dx.len() / d;
        let span = rows.start * d..rows.end * d;
        simd::layernorm_backward_rows(
            &dy[span.clone()],
            &x[span],
            gamma,
            &mean[rows.clone()],
            &rstd[rows],
            dx,
        );
    });
    let mut acc = vec![0.0f32; 2 * d];
    reduce_rows(n, 2 * d, &mut acc, |r, p| {
        let (pg, pb) = p.split_at_mut(d);
        let (mu, rs) = (mean[r], rstd[r]);
        for (((pg, pb), x), dy) in pg
            .iter_mut()
            .zip(pb.iter_mut())
            .zip(&x[r * d..(r + 1) * d])
            .zip(&dy[r * d..(r + 1) * d])
        {
            *pg += dy * (x - mu) * rs;
            *pb += dy;
        }
    });
    dgamma.iter_mut().zip(&acc[..d]).for_each(|(a, v)| *a += v);
    dbeta.iter_mut().zip(&acc[d..]).for_each(|(a, v)| *a += v);
}

/// Cuts images `[b, c, h, w]` into non-overlapping `p × p` patches, row-major over the
/// patch grid, each flattened in `(c, dy, dx)` order — the order of a conv weight
/// `[dim, c, p, p]`, so patch embedding is this followed by one GEMM.
pub fn patchify(
    img: &[f32],
    (b, c, h, w): (usize, usize, usize, usize),
    p: usize,
    out: &mut [f32],
    round: Round,
) {
    let (gh, gw) = (h / p, w / p);
    let plen = c * p * p;
    out.par_chunks_mut(gh * gw * plen)
        .enumerate()
        .take(b)
        .for_each(|(n, o)| {
            let img = &img[n * c * h * w..(n + 1) * c * h * w];
            for (pi, patch) in o.chunks_mut(plen).enumerate() {
                let (py, px) = (pi / gw, pi % gw);
                for ch in 0..c {
                    for dy in 0..p {
                        let src = ch * h * w + (py * p + dy) * w + px * p;
                        let dst = ch * p * p + dy * p;
                        patch[dst..dst + p].copy_from_slice(&img[src..src + p]);
                    }
                }
            }
            round.block(o);
        });
}

/// Token embedding: `out[b, 0] = cls + pos[0]`, `out[b, 1 + l] = patches[b, l] + pos[1 + l]`.
pub fn embed(patches: &[f32], cls: &[f32], pos: &[f32], out: &mut [f32]) {
    let d = cls.len();
    let t = pos.len() / d;
    out.par_chunks_mut(t * d).enumerate().for_each(|(b, o)| {
        let patches = &patches[b * (t - 1) * d..(b + 1) * (t - 1) * d];
        for (i, (o, p)) in o.chunks_mut(d).zip(pos.chunks(d)).enumerate() {
            let src = if i == 0 {
                cls
            } else {
                &patches[(i - 1) * d..i * d]
            };
            for ((o, s), p) in o.iter_mut().zip(src).zip(p) {
                *o = s + p;
            }
        }
    });
}

/// Backward of [`embed`]: `dpatches += …`, `dcls += …`, `dpos += …`.
pub fn embed_backward(dout: &[f32], dpatches: &mut [f32], dcls: &mut [f32], dpos: &mut [f32]) {
    let d = dcls.len();
    let t = dpos.len() / d;
    let b = dout.len() / (t * d);
    dpatches
        .par_chunks_mut((t - 1) * d)
        .enumerate()
        .for_each(|(n, dp)| add_assign_serial(dp, &dout[n * t * d + d..(n + 1) * t * d]));
    let mut acc = vec![0.0f32; t * d];
    // Rows here are whole images (t * d wide), reduced over the batch.
    let partials: Vec<Vec<f32>> = (0..b.div_ceil(4))
        .into_par_iter()
        .map(|c| {
            let mut p = vec![0.0f32; t * d];
            for n in c * 4..(c * 4 + 4).min(b) {
                add_assign_serial(&mut p, &dout[n * t * d..(n + 1) * t * d]);
            }
            p
        })
        .collect();
    for p in partials {
        add_assign_serial(&mut acc, &p);
    }
    add_assign_serial(dpos, &acc);
    add_assign_serial(dcls, &acc[..d]);
}

fn add_assign_serial(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// Row `i` of `out` (`[b, d]`) = row `i * stride_rows + offset` of `x`: picks the cls
/// token (token 0) of every image.
pub fn select_rows(x: &[f32], d: usize, stride_rows: usize, out: &mut [f32]) {
    for (i, o) in out.chunks_mut(d).enumerate() {
        o.copy_from_slice(&x[i * stride_rows * d..i * stride_rows * d + d]);
    }
}

/// Backward of [`select_rows`]: `dx[i * stride_rows] += dout[i]`.
pub fn select_rows_backward(dout: &[f32], d: usize, stride_rows: usize, dx: &mut [f32]) {
    for (i, g) in dout.chunks(d).enumerate() {
        add_assign_serial(&mut dx[i * stride_rows * d..i * stride_rows * d + d], g);
    }
}

fn sample_base(key: DropoutKey, sample: u64) -> u64 {
    mix64(site_key(key) ^ sample)
}

/// Inverted dropout: `out = m`, `out += m` or `out = residual + m` (see [`DropMode`]),
/// where `m = x * mask / (1 - p)`. `x.len() / samples.len()` elements belong to each
/// sample; with `key.per_sample` (stochastic depth) one mask bit covers a sample. Keep
/// probabilities are quantised to 1/65536.
pub fn dropout(
    x: &[f32],
    p: f32,
    key: DropoutKey,
    samples: &[u64],
    mode: DropMode,
    out: &mut [f32],
    round: Round,
) {
    let per = x.len() / samples.len();
    let threshold = (p as f64 * 65536.0).round() as u32;
    let scale = 1.0 / (1.0 - p);
    out.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .zip(samples.par_iter())
        .enumerate()
        .for_each(|(i, ((o, x), &s))| {
            let mode = match mode {
                DropMode::AddTo(r) => DropMode::AddTo(&r[i * per..(i + 1) * per]),
                m => m,
            };
            if key.per_sample {
                let m = drop_path_scale(sample_base(key, s), threshold, scale);
                apply_drop(x, m, mode, o)
            } else {
                simd::dropout_sample(x, sample_base(key, s), threshold, scale, mode, o)
            }
            round.block(o);
        });
}

/// Stochastic depth's factor for one sample: element 0's mask value (16-bit lane 0 of
/// `mix64(base)`), which every element of the sample shares.
fn drop_path_scale(base: u64, threshold: u32, scale: f32) -> f32 {
    if (mix64(base) & 0xffff) as u32 >= threshold {
        scale
    } else {
        0.0
    }
}

/// `m = x * s` for one sample, written, accumulated or added to the residual.
fn apply_drop(x: &[f32], s: f32, mode: DropMode, out: &mut [f32]) {
    match mode {
        DropMode::Write => out.iter_mut().zip(x).for_each(|(o, x)| *o = x * s),
        DropMode::Accumulate => out.iter_mut().zip(x).for_each(|(o, x)| *o += x * s),
        DropMode::AddTo(r) => out
            .iter_mut()
            .zip(x)
            .zip(r)
            .for_each(|((o, x), r)| *o = r + x * s),
    }
}

/// Softmax cross-entropy with label smoothing `eps`, averaged over the batch (PyTorch's
/// `F.cross_entropy(logits, y, label_smoothing=eps)`). Returns the loss and writes
/// d loss / d logits (= (softmax - target) / batch) into `dlogits` in the same pass.
pub fn cross_entropy(logits: &[f32], labels: &[usize], eps: f32, dlogits: &mut [f32]) -> f32 {
    let b = labels.len();
    let c = logits.len() / b;
    let mut total = 0.0f64;
    for ((z, dz), &y) in logits.chunks(c).zip(dlogits.chunks_mut(c)).zip(labels) {
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let sum: f64 = z.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let lse = m as f64 + sum.ln();
        let mean_z = z.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        total += (1.0 - eps as f64) * (lse - z[y] as f64) + eps as f64 * (lse - mean_z);
        for (k, (dz, &v)) in dz.iter_mut().zip(z).enumerate() {
            let p = ((v as f64 - lse).exp()) as f32;
            let q = eps / c as f32 + if k == y { 1.0 - eps } else { 0.0 };
            *dz = (p - q) / b as f32;
        }
    }
    (total / b as f64) as f32
}

/// Softmax cross-entropy against soft targets `[b, c]`, averaged over the batch
/// (`F.cross_entropy(logits, targets)`). Returns the loss and writes
/// d loss / d logits (= (softmax · Σt − t) / batch) into `dlogits` in the same pass.
pub fn cross_entropy_soft(logits: &[f32], targets: &[f32], c: usize, dlogits: &mut [f32]) -> f32 {
    let b = logits.len() / c;
    let mut total = 0.0f64;
    let rows = logits.chunks(c).zip(targets.chunks(c));
    for ((z, t), dz) in rows.zip(dlogits.chunks_mut(c)) {
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let sum: f64 = z.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let lse = m as f64 + sum.ln();
        let (mut row, mut mass) = (0.0f64, 0.0f64);
        for (&v, &t) in z.iter().zip(t) {
            row += t as f64 * (lse - v as f64);
            mass += t as f64;
        }
        total += row;
        for ((dz, &v), &t) in dz.iter_mut().zip(z).zip(t) {
            let p = ((v as f64 - lse).exp() * mass) as f32;
            *dz = (p - t) / b as f32;
        }
    }
    (total / b as f64) as f32
}

/// Crops, flips and normalises raw `[b, 3, side, side]` pixels into `out`, and mixes
/// each image with its partner under Mixup/CutMix, one output element at a time as the
/// CUDA kernel does (kernels/augment.cu), so the two are checked against one reference
/// (data's `RawImages::to_images`) alike.
pub fn augment(batch: &AugmentBatch, out: &mut [f32]) {
    let plane = batch.side * batch.side;
    out.par_chunks_mut(3 * plane)
        .enumerate()
        .for_each(|(s, out)| {
            for (i, o) in out.iter_mut().enumerate() {
                let (c, y, x) = (i / plane, i / batch.side % batch.side, i % batch.side);
                let at = |s: usize| augmented_at(batch, s, c, y, x);
                *o = match batch.mix {
                    None => at(s),
                    Some(m) => {
                        let p = m.partner[s] as usize;
                        match m.mix.cutmix {
                            Some(b) if (b.y0..b.y1).contains(&y) && (b.x0..b.x1).contains(&x) => {
                                at(p)
                            }
                            Some(_) => at(s),
                            None => {
                                let (lam, rest) = m.mix.factors();
                                at(s) * lam + at(p) * rest
                            }
                        }
                    }
                };
            }
        });
}

/// Image `s`'s normalised value at (`c`, `y`, `x`) after its crop and flip.
fn augmented_at(batch: &AugmentBatch, s: usize, c: usize, y: usize, x: usize) -> f32 {
    let (side, g) = (batch.side as i32, batch.geometry[s]);
    let (y, x) = (y as i32, x as i32);
    let (sy, sx) = (y + g.dy, if g.flip { side - 1 - x } else { x } + g.dx);
    let inside = (0..side).contains(&sy) && (0..side).contains(&sx);
    let plane = batch.side * batch.side;
    let v = match inside {
        true => batch.pixels[(3 * s + c) * plane + (sy * side + sx) as usize],
        false => 0,
    };
    (v as f32 / 255.0 - batch.norm.mean[c]) / batch.norm.std[c]
}
