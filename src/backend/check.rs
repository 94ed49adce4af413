//! The argument checks of the op set, written once and called by every backend before
//! it touches memory, so a bad call fails alike (same error, same message) everywhere.

use super::{AttnDims, AugmentBatch};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

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

/// Checks the pixels are `[b, 3, 32, 32]` for the `b` samples the geometry names;
/// returns the number of pixels.
pub(crate) fn check_augment(batch: &AugmentBatch) -> Result<usize> {
    let n = batch.geometry.len() * 3 * 32 * 32;
    same_len("augment", n, batch.pixels.len())?;
    Ok(n)
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
