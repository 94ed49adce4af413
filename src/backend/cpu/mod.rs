//! The CPU backend: f32, multi-threaded with rayon, GEMMs through the `gemm` crate;
//! bf16 activations (mixed precision) are rounded where stored and held widened in f32
//! (`CpuStorage::BF16Wide`), so no op converts to read them, the bf16 GEMMs included.
//! It is also the reference every other backend is tested against.

pub mod attention;
pub mod bf16gemm;
pub mod math;
pub mod ops;
pub mod optim;
pub mod simd;

use super::check::{
    check_attn, check_attn_backward, check_augment, check_cross_entropy, check_cross_entropy_soft,
    check_dropout, check_embed, check_embed_backward, check_layernorm, check_layernorm_backward,
    check_matmul, check_matmul_bias, check_patchify, check_rows, check_same, check_select_rows,
};
use super::gemm;
use super::{AdamStep, AttnDims, AugmentBatch, Backend, DropoutKey, DropoutMode, SgdStep};
use crate::error::{Error, Result};
use crate::tensor::{convert, Buf, DType, Device, Tensor};
use ops::Round;

/// Sets the number of CPU threads (rayon's global pool, which the GEMMs use too).
/// Call once, before any compute; `0` means one per core.
pub fn set_num_threads(n: usize) -> Result<()> {
    let max = max_threads();
    if n > max {
        // checked first: building a pool of 100,000 threads takes minutes to fail
        return Err(Error::Config(format!(
            "threads = {n}: must be at most {max} (4 × the {} cores, at most 1024)",
            available_cores()
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Error::Config(format!("cannot set thread count to {n}: {e}")))
}

/// Cores this process may use (its CPU affinity and quota).
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Most compute threads accepted: 4 per core, at most 1024.
pub fn max_threads() -> usize {
    (4 * available_cores()).min(1024)
}

/// Number of threads compute runs on.
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// The machine's physical memory in bytes (`None` where it cannot be read), for
/// refusing a model that cannot fit before allocating it.
pub fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system constants.
        let (pages, size) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let (pages, size) = (u64::try_from(pages).ok()?, u64::try_from(size).ok()?);
        pages.checked_mul(size)
    }
    #[cfg(not(unix))]
    None
}

pub struct CpuBackend;

/// An input's elements as f32: f32 data and bf16 held widened as they are; bf16 held
/// as bf16 (a tensor converted with `to_dtype`) widened exactly into a pooled buffer.
enum F32s<'a> {
    Borrowed(&'a [f32]),
    Widened(Buf),
}

impl std::ops::Deref for F32s<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32s::Borrowed(s) => s,
            F32s::Widened(b) => b.as_slice(),
        }
    }
}

fn read(t: &Tensor) -> Result<F32s<'_>> {
    if let Some(wide) = t.bf16_wide() {
        return Ok(F32s::Borrowed(wide));
    }
    match t.dtype() {
        DType::BF16 => Ok(F32s::Widened(widened(t.bf16s()?))),
        _ => t.f32s().map(F32s::Borrowed),
    }
}

/// bf16 values widened into a pooled f32 buffer.
fn widened(h: &[half::bf16]) -> Buf {
    let mut b = Buf::uninit(h.len());
    convert::widen(h, b.as_mut_slice());
    b
}

/// Runs `f` on an output's data as f32. A bf16 output is held widened in f32 from then
/// on, and `f` rounds what it writes to bf16 (nearest even), block by block, as the
/// [`Round`] it is given says — which is how the GPU kernels store bf16 too (they
/// compute in f32).
fn write<R>(t: &mut Tensor, f: impl FnOnce(&mut [f32], Round) -> Result<R>) -> Result<R> {
    write_as(t, true, f)
}

/// As [`write`]; `f` does not read the output when `!reads` (a bf16 output held as
/// bf16 is then not widened first).
fn write_as<R>(
    t: &mut Tensor,
    reads: bool,
    f: impl FnOnce(&mut [f32], Round) -> Result<R>,
) -> Result<R> {
    if t.dtype() != DType::BF16 {
        return f(t.f32s_mut()?, Round::No);
    }
    f(t.bf16_wide_mut(reads)?, Round::Bf16)
}

/// `c (+)= op(a) · op(b) (+ bias)` with f32 accumulation, for f32 operands or bf16 ones
/// (both the same: mixed precision; the bf16 GEMM of [`bf16gemm`]); a bf16 `c` is
/// rounded once, after the bias is added, as on a GPU (the bias is added after the
/// product, in the pass that rounds it, rather than filled in first for it to accumulate
/// onto: the GEMM then need not read `c`).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    c: &mut Tensor,
    a: &Tensor,
    ta: bool,
    b: &Tensor,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    bias: Option<&[f32]>,
) -> Result<()> {
    check_matmul(c, a, b, (m, n, k))?;
    let half = a.dtype() == DType::BF16 && b.dtype() == DType::BF16;
    let (av, bv) = (view(ta, m, k), view(tb, k, n));
    write_as(c, accumulate, |c, round| {
        let (a, b) = (read(a)?, read(b)?);
        match half {
            true => bf16gemm::matmul(c, &a, av, &b, bv, accumulate),
            false => {
                let d = gemm::Mat::dense(m, n);
                gemm::matmul_views(c, d, &a, av, &b, bv, accumulate, gemm::Par::Pool);
            }
        }
        // a pass of its own, which also adds the bias: rounding in blocks as the
        // product finishes them would split the GEMM into calls that each pack its
        // operands again (slower)
        match bias {
            Some(bias) => ops::add_rows(c, bias, round),
            None => round.all(c),
        }
        Ok(())
    })
}

/// A dense `[rows, cols]` operand, or (`t`) the transpose of a dense `[cols, rows]` one.
fn view(t: bool, rows: usize, cols: usize) -> gemm::Mat {
    match t {
        true => gemm::Mat::dense(cols, rows).t(),
        false => gemm::Mat::dense(rows, cols),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        ta: bool,
        b: &Tensor,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) -> Result<()> {
        gemm_into(c, a, ta, b, tb, (m, n, k), accumulate, None)
    }

    fn matmul_bias(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        b: &Tensor,
        bias: &Tensor,
        mnk: (usize, usize, usize),
    ) -> Result<()> {
        check_matmul_bias(bias, mnk)?;
        gemm_into(c, a, false, b, true, mnk, false, Some(bias.f32s()?))
    }

    fn fill_rows(&self, out: &mut Tensor, bias: &Tensor) -> Result<()> {
        check_rows("fill_rows", out, bias)?;
        let bias = bias.f32s()?;
        write_as(out, false, |out, round| {
            ops::fill_rows(out, bias, round);
            Ok(())
        })
    }

    fn bias_grad(&self, dy: &Tensor, db: &mut Tensor) -> Result<()> {
        check_rows("bias_grad", dy, db)?;
        let (dy, db) = (read(dy)?, db.f32s_mut()?);
        ops::bias_grad(&dy, db);
        Ok(())
    }

    fn bias_gelu(&self, pre: &mut Tensor, bias: &Tensor, out: &mut Tensor) -> Result<()> {
        check_same("bias_gelu", pre, &[out])?;
        check_rows("bias_gelu", pre, bias)?;
        let bias = bias.f32s()?;
        write(pre, |pre, round_pre| {
            write_as(out, false, |out, round_out| {
                ops::bias_gelu(pre, bias, out, (round_pre, round_out));
                Ok(())
            })
        })
    }

    fn gelu_backward(&self, dy: &Tensor, pre: &Tensor, dpre: &mut Tensor) -> Result<()> {
        check_same("gelu_backward", dy, &[pre, dpre])?;
        let (dy, pre) = (read(dy)?, read(pre)?);
        write_as(dpre, false, |dpre, round| {
            ops::gelu_backward(&dy, &pre, dpre, round);
            Ok(())
        })
    }

    fn layernorm(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        y: &mut Tensor,
        mean: &mut Tensor,
        rstd: &mut Tensor,
    ) -> Result<()> {
        check_layernorm(x, (gamma, beta), y, (mean, rstd))?;
        let (x, g, b) = (x.f32s()?, gamma.f32s()?, beta.f32s()?);
        let (mean, rstd) = (mean.f32s_mut()?, rstd.f32s_mut()?);
        write_as(y, false, |y, round| {
            ops::layernorm(x, g, b, eps, (y, round), mean, rstd);
            Ok(())
        })
    }

    fn layernorm_backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        gamma: &Tensor,
        mean: &Tensor,
        rstd: &Tensor,
        dx: &mut Tensor,
        dgamma: &mut Tensor,
        dbeta: &mut Tensor,
    ) -> Result<()> {
        check_layernorm_backward((dy, x, gamma), (mean, rstd), (dx, dgamma, dbeta))?;
        let (dy, x, g) = (read(dy)?, x.f32s()?, gamma.f32s()?);
        let dy = &dy[..];
        let (mean, rstd) = (mean.f32s()?, rstd.f32s()?);
        let (dx, dg, db) = (dx.f32s_mut()?, dgamma.f32s_mut()?, dbeta.f32s_mut()?);
        ops::layernorm_backward(dy, x, g, mean, rstd, dx, dg, db);
        Ok(())
    }

    fn patchify(&self, images: &Tensor, patch: usize, out: &mut Tensor) -> Result<()> {
        let (b, c, h, w) = check_patchify(images, patch, out)?;
        let images = read(images)?;
        write_as(out, false, |out, round| {
            ops::patchify(&images, (b, c, h, w), patch, out, round);
            Ok(())
        })
    }

    fn embed(&self, patches: &Tensor, cls: &Tensor, pos: &Tensor, out: &mut Tensor) -> Result<()> {
        let (p, c, e, o) = (patches.f32s()?, cls.f32s()?, pos.f32s()?, out.f32s_mut()?);
        check_embed(p.len(), c.len(), e.len(), o.len())?;
        ops::embed(p, c, e, o);
        Ok(())
    }

    fn embed_backward(
        &self,
        dout: &Tensor,
        dpatches: &mut Tensor,
        dcls: &mut Tensor,
        dpos: &mut Tensor,
    ) -> Result<()> {
        let (g, dp, dc, de) = (
            dout.f32s()?,
            dpatches.f32s_mut()?,
            dcls.f32s_mut()?,
            dpos.f32s_mut()?,
        );
        check_embed_backward(g.len(), dc.len(), de.len(), dp.len())?;
        ops::embed_backward(g, dp, dc, de);
        Ok(())
    }

    fn attention(
        &self,
        qkv: &Tensor,
        dims: AttnDims,
        probs: &mut Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        check_attn(dims, self.attention_saved_len(dims), qkv, probs, out)?;
        // mixed precision: probabilities rounded to bf16 for their product, as on a GPU
        let bf16 = qkv.dtype() == DType::BF16;
        let (qkv, probs) = (read(qkv)?, probs.f32s_mut()?);
        write_as(out, false, |out, round| {
            attention::attention(&qkv, dims, probs, (out, round), bf16);
            Ok(())
        })
    }

    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        probs: &Tensor,
        dims: AttnDims,
        dqkv: &mut Tensor,
        accumulate: bool,
    ) -> Result<()> {
        check_attn(dims, self.attention_saved_len(dims), qkv, probs, dout)?;
        check_attn_backward(dims, qkv, dqkv, accumulate)?;
        let bf16 = qkv.dtype() == DType::BF16;
        let (dout, qkv) = (read(dout)?, read(qkv)?);
        write_as(dqkv, accumulate, |dqkv, round| {
            if !accumulate {
                dqkv.fill(0.0);
            }
            attention::attention_backward(&dout, &qkv, probs.f32s()?, dims, (dqkv, round), bf16);
            Ok(())
        })
    }

    fn add(&self, a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
        // b may be a bf16 branch under mixed precision (widened exactly)
        check_same("add", a, &[b, out])?;
        let b = read(b)?;
        let (a, out) = (a.f32s()?, out.f32s_mut()?);
        ops::add(a, &b, out);
        Ok(())
    }

    fn add_assign(&self, dst: &mut Tensor, src: &Tensor) -> Result<()> {
        check_same("add_assign", dst, &[src])?;
        let (dst, src) = (dst.f32s_mut()?, src.f32s()?);
        ops::add_assign(dst, src);
        Ok(())
    }

    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()> {
        ops::scale(x.f32s_mut()?, s);
        Ok(())
    }

    fn sum_squares(&self, x: &Tensor) -> Result<f64> {
        Ok(ops::sum_squares(x.f32s()?))
    }

    fn dropout(
        &self,
        x: &Tensor,
        p: f32,
        key: DropoutKey,
        samples: &[u64],
        mode: DropoutMode,
        out: &mut Tensor,
    ) -> Result<()> {
        let residual = match mode {
            DropoutMode::AddTo(r) => Some(r),
            _ => None,
        };
        check_dropout(x, p, samples, residual, out)?;
        let x = read(x)?;
        let x = &x[..];
        let mode = match mode {
            DropoutMode::Write => simd::DropMode::Write,
            DropoutMode::Accumulate => simd::DropMode::Accumulate,
            DropoutMode::AddTo(r) => simd::DropMode::AddTo(r.f32s()?),
        };
        let reads = matches!(mode, simd::DropMode::Accumulate);
        write_as(out, reads, |out, round| {
            ops::dropout(x, p, key, samples, mode, out, round);
            Ok(())
        })
    }

    fn cross_entropy(
        &self,
        logits: &Tensor,
        labels: &[usize],
        eps: f32,
        dlogits: &mut Tensor,
    ) -> Result<f32> {
        check_cross_entropy(logits, labels, dlogits)?;
        let (z, dz) = (logits.f32s()?, dlogits.f32s_mut()?);
        Ok(ops::cross_entropy(z, labels, eps, dz))
    }

    fn cross_entropy_soft(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        dlogits: &mut Tensor,
    ) -> Result<f32> {
        let (_, classes) = check_cross_entropy_soft(logits, targets, dlogits)?;
        let (z, t, dz) = (logits.f32s()?, targets.f32s()?, dlogits.f32s_mut()?);
        Ok(ops::cross_entropy_soft(z, t, classes, dz))
    }

    fn select_rows(&self, x: &Tensor, stride_rows: usize, out: &mut Tensor) -> Result<()> {
        let (_, d) = check_select_rows("select_rows", out, stride_rows, x)?;
        let (x, o) = (x.f32s()?, out.f32s_mut()?);
        ops::select_rows(x, d, stride_rows, o);
        Ok(())
    }

    fn select_rows_backward(
        &self,
        dout: &Tensor,
        stride_rows: usize,
        dx: &mut Tensor,
    ) -> Result<()> {
        let (_, d) = check_select_rows("select_rows_backward", dout, stride_rows, dx)?;
        let (g, dx) = (dout.f32s()?, dx.f32s_mut()?);
        ops::select_rows_backward(g, d, stride_rows, dx);
        Ok(())
    }

    fn adam(
        &self,
        p: &mut Tensor,
        g: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        step: AdamStep,
    ) -> Result<()> {
        check_same("adam", p, &[g, m, v])?;
        let (p, g, m, v) = (p.f32s_mut()?, g.f32s()?, m.f32s_mut()?, v.f32s_mut()?);
        optim::adam(p, g, m, v, step);
        Ok(())
    }

    fn sgd(&self, p: &mut Tensor, g: &Tensor, buf: &mut Tensor, step: SgdStep) -> Result<()> {
        check_same("sgd", p, &[g])?;
        if step.momentum != 0.0 {
            check_same("sgd", p, &[buf])?;
        }
        let (p, g, b) = (p.f32s_mut()?, g.f32s()?, buf.f32s_mut()?);
        optim::sgd(p, g, b, step);
        Ok(())
    }

    fn gemm_operand(&self, t: &Tensor) -> Result<Tensor> {
        t.to_bf16_wide()
    }

    fn augment(&self, batch: &AugmentBatch, dtype: DType) -> Result<Tensor> {
        let n = check_augment(batch)?;
        let mut out = Tensor::uninit([n], Device::Cpu);
        ops::augment(batch, out.f32s_mut()?);
        let (b, side) = (batch.outputs(), batch.side);
        out.reshape([b, 3, side, side])?.try_to_dtype(dtype)
    }
}
