//! The argument checks of the op set, written once and called by every backend before
//! it touches memory, so a bad call fails alike (same error, same message) everywhere.

use super::{AttnDims, AugmentBatch, AugmentMix};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Checks patchify's image and output shapes; returns `(b, c, h, w)`.
pub(crate) fn check_patchify(
    images: &Tensor,
    patch: usize,
    out: &Tensor,
) -> Result<(usize, usize, usize, usize)> {
    let &[b, c, h, w] = images.dims() else {
        return Err(Error::shape(
            "patchify",
            "[batch, channels, height, width]",
            images.shape(),
        ));
    };
    if patch == 0 || h % patch != 0 || w % patch != 0 {
        return Err(Error::shape(
            "patchify",
            format!("sides divisible by patch {patch}"),
            images.shape(),
        ));
    }
    out.expect_dims(
        "patchify",
        &[b, (h / patch) * (w / patch), c * patch * patch],
    )?;
    Ok((b, c, h, w))
}

/// Checks that `logits` are `[batch, classes]`; returns `(batch, classes)`.
pub(crate) fn check_logits(logits: &Tensor) -> Result<(usize, usize)> {
    match *logits.dims() {
        [b, c] if c > 0 => Ok((b, c)),
        _ => Err(Error::shape(
            "argmax_rows",
            "[batch, classes]",
            logits.shape(),
        )),
    }
}

/// The gradient buffer of attention's backward pass, shared by the backends: qkv's size,
/// and overwriting only where every row is written (all tokens query).
pub(crate) fn check_attn_backward(
    d: AttnDims,
    qkv: &Tensor,
    dqkv: &Tensor,
    accumulate: bool,
) -> Result<()> {
    if dqkv.numel() != qkv.numel() {
        return Err(Error::shape(
            "attention_backward",
            qkv.shape(),
            dqkv.shape(),
        ));
    }
    if !accumulate && d.queries != d.tokens {
        return Err(Error::Config(format!(
            "attention_backward overwrites dqkv only when all {} tokens query, not {}",
            d.tokens, d.queries
        )));
    }
    Ok(())
}

/// Checks attention geometry and buffer sizes before the kernel's raw-pointer work.
pub(crate) fn check_attn(
    d: AttnDims,
    saved: usize,
    qkv: &Tensor,
    probs: &Tensor,
    out: &Tensor,
) -> Result<()> {
    if d.heads == 0 || !d.dim.is_multiple_of(d.heads) {
        return Err(Error::Config(format!(
            "dim {} is not divisible by {} heads",
            d.dim, d.heads
        )));
    }
    let (b, t, q, c) = (d.batch, d.tokens, d.queries, d.dim);
    if q == 0 || q > t {
        return Err(Error::Config(format!("{q} querying tokens out of {t}")));
    }
    for (what, have, want) in [
        ("qkv", qkv.numel(), b * t * 3 * c),
        ("saved", probs.numel(), saved),
        ("out", out.numel(), b * q * c),
    ] {
        if have != want {
            return Err(Error::shape(
                "attention",
                format!("{what} of {want} elements"),
                have,
            ));
        }
    }
    Ok(())
}

/// Largest image side the augment op takes (its kernel indexes pixels with `int`s).
pub const MAX_AUGMENT_SIDE: usize = 4096;

/// Checks the pixels are `[b, 3, side, side]` for the `b` samples the geometry names,
/// with a side in 1..=[`MAX_AUGMENT_SIDE`]; returns the number of pixels.
pub(crate) fn check_augment(batch: &AugmentBatch) -> Result<usize> {
    if !(1..=MAX_AUGMENT_SIDE).contains(&batch.side) {
        return Err(Error::shape(
            "augment",
            format!("an image side in 1..={MAX_AUGMENT_SIDE}"),
            format!("side {}", batch.side),
        ));
    }
    let plane = 3 * batch.side * batch.side;
    same_len("augment", batch.geometry.len() * plane, batch.pixels.len())?;
    if let Some(m) = &batch.mix {
        check_augment_mix(m, batch.geometry.len(), batch.side)?;
    }
    Ok(batch.outputs() * plane)
}

/// No more outputs than images, every partner one of the `rows` images, lambda in
/// [0, 1], CutMix's box inside the image.
fn check_augment_mix(m: &AugmentMix, rows: usize, side: usize) -> Result<()> {
    if m.partner.len() > rows {
        return Err(Error::shape(
            "augment",
            format!("at most {rows} mixed images"),
            format!("{} partners", m.partner.len()),
        ));
    }
    if let Some(p) = m.partner.iter().find(|&&p| p as usize >= rows) {
        return Err(Error::shape(
            "augment",
            format!("partners among the {rows} images"),
            format!("partner {p}"),
        ));
    }
    if !(0.0..=1.0).contains(&m.mix.lam) {
        return Err(Error::shape(
            "augment",
            "a mixing lambda in [0, 1]",
            format!("lambda {}", m.mix.lam),
        ));
    }
    match m.mix.cutmix {
        Some(b) if !(b.y0 <= b.y1 && b.y1 <= side && b.x0 <= b.x1 && b.x1 <= side) => {
            Err(Error::shape(
                "augment",
                format!("a CutMix box inside {side} x {side}"),
                format!("rows {}..{}, columns {}..{}", b.y0, b.y1, b.x0, b.x1),
            ))
        }
        _ => Ok(()),
    }
}

/// Checks two buffers an op reads or writes together hold as many elements.
pub(crate) fn same_len(op: &'static str, a: usize, b: usize) -> Result<()> {
    if a != b {
        return Err(Error::shape(
            op,
            format!("{a} elements"),
            format!("{b} elements"),
        ));
    }
    Ok(())
}

/// Checks `n` elements are whole rows of `width`; returns the number of rows.
pub(crate) fn rows_of(op: &'static str, n: usize, width: usize) -> Result<usize> {
    if width == 0 || !n.is_multiple_of(width) {
        return Err(Error::shape(
            op,
            format!("rows of width {width}"),
            format!("{n} elements"),
        ));
    }
    Ok(n / width)
}

/// Checks a GEMM's operands are alike (mixed precision casts first: the backends
/// multiply f32 by f32 or bf16 by bf16) and its sizes agree with `(m, n, k)`.
pub(crate) fn check_matmul(
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    (m, n, k): (usize, usize, usize),
) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(Error::Config(format!(
            "matmul of a {} by a {} operand: cast one first",
            a.dtype(),
            b.dtype()
        )));
    }
    if a.numel() != m * k || b.numel() != k * n || c.numel() != m * n {
        return Err(Error::shape(
            "matmul",
            format!("{m}x{k} · {k}x{n} -> {m}x{n}"),
            format!("{} · {} -> {} elements", a.numel(), b.numel(), c.numel()),
        ));
    }
    Ok(())
}

/// Checks embed's sizes (patches `[b, t - 1, d]`, a cls token of `d`, positions
/// `[t, d]`, output `[b, t, d]`); returns `(b, t)`. With no position rows the patches
/// are read as rows of one token, so a bad call fails on its sizes, never overflows.
pub(crate) fn check_embed(
    patches: usize,
    d: usize,
    pos: usize,
    out: usize,
) -> Result<(usize, usize)> {
    let t = rows_of("embed", pos, d)?;
    let b = rows_of("embed", patches, (t.max(2) - 1) * d)?;
    same_len("embed", b * t * d, out)?;
    Ok((b, t))
}

/// Checks embed_backward's sizes (as [`check_embed`]'s, gradients in place of
/// values); returns `(b, t)`.
pub(crate) fn check_embed_backward(
    dout: usize,
    d: usize,
    dpos: usize,
    dpatches: usize,
) -> Result<(usize, usize)> {
    let t = rows_of("embed_backward", dpos, d)?;
    let b = rows_of("embed_backward", dout, t * d)?;
    same_len("embed_backward", b * (t - 1) * d, dpatches)?;
    Ok((b, t))
}

/// One mean and one rstd per row.
fn check_stats(op: &'static str, rows: usize, mean: usize, rstd: usize) -> Result<()> {
    if mean != rows || rstd != rows {
        return Err(Error::shape(op, format!("{rows} row statistics"), mean));
    }
    Ok(())
}

/// LayerNorm: `x` and `y` rows of gamma's width, beta like gamma, a mean and rstd per
/// row; returns the rows.
pub(crate) fn check_layernorm(
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    y: &Tensor,
    (mean, rstd): (&Tensor, &Tensor),
) -> Result<usize> {
    let op = "layernorm";
    let rows = rows_of(op, x.numel(), gamma.numel())?;
    same_len(op, x.numel(), y.numel())?;
    same_len(op, gamma.numel(), beta.numel())?;
    check_stats(op, rows, mean.numel(), rstd.numel())?;
    Ok(rows)
}

/// LayerNorm's backward: `dy` and `dx` like `x`, its gradients like gamma, the saved
/// statistics per row; returns the rows.
pub(crate) fn check_layernorm_backward(
    (dy, x, gamma): (&Tensor, &Tensor, &Tensor),
    (mean, rstd): (&Tensor, &Tensor),
    (dx, dgamma, dbeta): (&Tensor, &Tensor, &Tensor),
) -> Result<usize> {
    let op = "layernorm_backward";
    let rows = rows_of(op, x.numel(), gamma.numel())?;
    same_len(op, dy.numel(), x.numel())?;
    same_len(op, dx.numel(), x.numel())?;
    same_len(op, dgamma.numel(), gamma.numel())?;
    same_len(op, dbeta.numel(), gamma.numel())?;
    check_stats(op, rows, mean.numel(), rstd.numel())?;
    Ok(rows)
}

/// Dropout: `out` like `x`, whole samples, a probability in [0, 1), a residual (when
/// added to one) like `x`.
pub(crate) fn check_dropout(
    x: &Tensor,
    p: f32,
    samples: &[u64],
    residual: Option<&Tensor>,
    out: &Tensor,
) -> Result<()> {
    let n = x.numel();
    same_len("dropout", n, out.numel())?;
    if samples.is_empty() || !n.is_multiple_of(samples.len()) {
        return Err(Error::shape(
            "dropout",
            format!("a multiple of {} samples", samples.len()),
            n,
        ));
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Config(format!(
            "dropout probability {p} is outside [0, 1)"
        )));
    }
    if let Some(r) = residual {
        same_len("dropout residual", r.numel(), n)?;
    }
    Ok(())
}

/// The cross-entropy: `dlogits` like the `[batch, classes]` logits, one label per row,
/// each a class; returns `(batch, classes)`.
pub(crate) fn check_cross_entropy(
    logits: &Tensor,
    labels: &[usize],
    dlogits: &Tensor,
) -> Result<(usize, usize)> {
    let classes = logits.shape().last();
    same_len("cross_entropy", logits.numel(), dlogits.numel())?;
    let b = rows_of("cross_entropy", logits.numel(), classes)?;
    if b != labels.len() || labels.is_empty() {
        return Err(Error::shape(
            "cross_entropy",
            format!("{b} labels"),
            labels.len(),
        ));
    }
    if let Some((i, y)) = labels.iter().enumerate().find(|(_, &y)| y >= classes) {
        return Err(Error::Config(format!(
            "label {y} of sample {i} is out of range for {classes} classes"
        )));
    }
    Ok((b, classes))
}

/// The soft-target cross-entropy: `targets` (f32) and `dlogits` like the
/// `[batch, classes]` logits, at least one row; returns `(batch, classes)`.
pub(crate) fn check_cross_entropy_soft(
    logits: &Tensor,
    targets: &Tensor,
    dlogits: &Tensor,
) -> Result<(usize, usize)> {
    let op = "cross_entropy_soft";
    let classes = logits.shape().last();
    same_len(op, logits.numel(), dlogits.numel())?;
    same_len(op, logits.numel(), targets.numel())?;
    if targets.dtype() != DType::F32 {
        return Err(Error::shape(op, "f32 targets", targets.dtype()));
    }
    let b = rows_of(op, logits.numel(), classes)?;
    if b == 0 {
        return Err(Error::shape(op, "at least one row", 0));
    }
    Ok((b, classes))
}

/// Elementwise ops: every tensor of `others` has as many elements as `first`;
/// returns that count.
pub(crate) fn check_same(op: &'static str, first: &Tensor, others: &[&Tensor]) -> Result<usize> {
    let n = first.numel();
    for t in others {
        same_len(op, n, t.numel())?;
    }
    Ok(n)
}

/// A per-column vector (a bias) over the rows of `x`; returns `(rows, width)`.
pub(crate) fn check_rows(op: &'static str, x: &Tensor, column: &Tensor) -> Result<(usize, usize)> {
    let d = column.numel();
    Ok((rows_of(op, x.numel(), d)?, d))
}

/// select_rows and its backward: `full` holds `stride` rows per row of `picked`;
/// returns `(picked elements, width)`.
pub(crate) fn check_select_rows(
    op: &'static str,
    picked: &Tensor,
    stride: usize,
    full: &Tensor,
) -> Result<(usize, usize)> {
    let n = picked.numel();
    let want = n
        .checked_mul(stride)
        .ok_or_else(|| Error::shape(op, format!("{n} × {stride} elements"), full.numel()))?;
    same_len(op, want, full.numel())?;
    Ok((n, picked.shape().last()))
}

/// A linear layer's bias: one value per output column (`n` of `(m, n, k)`).
pub(crate) fn check_matmul_bias(bias: &Tensor, (_, n, _): (usize, usize, usize)) -> Result<()> {
    same_len("matmul bias", bias.numel(), n)
}
