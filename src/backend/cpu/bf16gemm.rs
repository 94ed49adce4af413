//! Matrix products of bf16 operands on the CPU, with f32 accumulation. The operands
//! are bf16 values held widened in f32, as the CPU holds mixed precision's activations
//! (`CpuStorage::BF16Wide`): no conversion pass either way.
//!
//! Two ways, picked once per process ([`path`]):
//! - [`Bf16Path::Dot`]: AVX512-BF16's `vdpbf16ps` (two bf16 products added into each
//!   f32 lane per instruction) on operands packed in k-pairs (each value's upper 16
//!   bits: exact, as it is a bf16), 12 × 32 output tiles, the output split into one
//!   block per thread as the f32 GEMM splits it;
//! - [`Bf16Path::Widen`]: the f32 GEMM on them as they are — every CPU has it.
//!
//! Both give exact products summed in f32; the sums may differ in order (and so in
//! the last bits). `FERROVIT_CPU_BF16=dot|widen` forces one (`dot` needs the CPU
//! feature); otherwise the first bf16 product times both on a small problem and keeps
//! the faster: on the Intel Xeon measured (no AMX exposed) `vdpbf16ps` does half the
//! f32 FMA's work per cycle, while on AMD Zen 5 PyTorch's bf16 GEMM measured 4× its f32
//! (docs/PERFORMANCE.md).

use crate::backend::gemm::{self, Mat, Par, SharedMut};
use std::sync::OnceLock;
use std::time::Instant;

/// How bf16 products are computed on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Path {
    /// `vdpbf16ps` on packed bf16 operands.
    Dot,
    /// The f32 GEMM on the values held widened.
    Widen,
}

/// What [`path`] decided and why (the log line and `bench` say it).
#[derive(Clone, Copy, Debug)]
pub struct Bf16Choice {
    pub path: Bf16Path,
    /// GFLOP/s of each path on the calibration product (`None`: not timed).
    pub dot_gflops: Option<f64>,
    pub widen_gflops: Option<f64>,
    /// How it was decided: "FERROVIT_CPU_BF16", "no AVX512-BF16" or "timed".
    pub reason: &'static str,
}

impl std::fmt::Display for Bf16Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.path {
            Bf16Path::Dot => "vdpbf16ps",
            Bf16Path::Widen => "widened to f32",
        };
        write!(f, "bf16 GEMMs {name} ({}", self.reason)?;
        if let (Some(d), Some(w)) = (self.dot_gflops, self.widen_gflops) {
            write!(f, ": vdpbf16ps {d:.0} GFLOP/s, widened {w:.0} GFLOP/s")?;
        }
        f.write_str(")")
    }
}

/// Whether this CPU has `vdpbf16ps` (and the AVX-512 the kernel uses with it).
pub fn has_dot() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The way bf16 products run in this process, decided on first use.
pub fn choice() -> Bf16Choice {
    static CHOICE: OnceLock<Bf16Choice> = OnceLock::new();
    *CHOICE.get_or_init(decide)
}

/// Whether bf16 products on this CPU are fast enough that a bf16 step beats an f32
/// one: the `vdpbf16ps` path timed at least 1.25 × the widen-to-f32 path (which runs
/// at the f32 GEMM's speed), so `--precision auto` picks bf16 on the CPU.
pub fn bf16_pays() -> bool {
    let c = choice();
    match (c.path, c.dot_gflops, c.widen_gflops) {
        (Bf16Path::Dot, Some(d), Some(w)) => d >= 1.25 * w,
        _ => false,
    }
}

/// [`choice`]'s path.
pub fn path() -> Bf16Path {
    choice().path
}

fn decide() -> Bf16Choice {
    let fixed = |path, reason| Bf16Choice {
        path,
        dot_gflops: None,
        widen_gflops: None,
        reason,
    };
    let forced = std::env::var("FERROVIT_CPU_BF16").ok();
    match forced.as_deref() {
        Some("widen") => return fixed(Bf16Path::Widen, "FERROVIT_CPU_BF16"),
        Some("dot") if has_dot() => return fixed(Bf16Path::Dot, "FERROVIT_CPU_BF16"),
        Some("dot") => {
            tracing::warn!("FERROVIT_CPU_BF16=dot: this CPU has no AVX512-BF16; widening to f32");
        }
        Some(other) if other != "auto" => {
            tracing::warn!("FERROVIT_CPU_BF16={other:?} is not dot, widen or auto; ignored");
        }
        _ => {}
    }
    if !has_dot() {
        return fixed(Bf16Path::Widen, "no AVX512-BF16");
    }
    let (dot, widen) = (timed(Bf16Path::Dot), timed(Bf16Path::Widen));
    Bf16Choice {
        path: if dot > widen {
            Bf16Path::Dot
        } else {
            Bf16Path::Widen
        },
        dot_gflops: Some(dot),
        widen_gflops: Some(widen),
        reason: "timed",
    }
}

/// GFLOP/s of `path` on a 256 × 256 × 256 product on this thread (best of 5).
fn timed(path: Bf16Path) -> f64 {
    const N: usize = 256;
    let a: Vec<f32> = (0..N * N).map(|i| (i % 7) as f32).collect();
    let mut c = vec![0.0f32; N * N];
    let v = Mat::dense(N, N);
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            matmul_with(path, &mut c, &a, v, &a, v, false, Par::Single);
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    2.0 * (N * N * N) as f64 / best.max(1e-9) / 1e9
}

/// `c (+)= a · b` for a dense row-major f32 `c` `[a.rows, b.cols]` and views `a`, `b`
/// of bf16 values held widened in f32 (every element exactly a bf16: the dot path
/// reads only its upper 16 bits), the way [`path`] says, on all of rayon's threads.
///
/// # Panics
/// If the views' shapes disagree or reach outside their slices (a bug in ferrovit).
pub fn matmul(c: &mut [f32], lhs: &[f32], a: Mat, rhs: &[f32], b: Mat, accumulate: bool) {
    matmul_with(path(), c, lhs, a, rhs, b, accumulate, Par::Pool);
}

/// [`matmul`] the way `path` says (the dot path only on a CPU with [`has_dot`]), on
/// rayon's threads or (`Par::Single`) this one.
///
/// # Panics
/// If the views disagree, or `path` is the dot path on a CPU without it.
#[allow(clippy::too_many_arguments)]
pub fn matmul_with(
    path: Bf16Path,
    c: &mut [f32],
    lhs: &[f32],
    a: Mat,
    rhs: &[f32],
    b: Mat,
    accumulate: bool,
    par: Par,
) {
    assert!(
        a.cols == b.rows && c.len() == a.rows * b.cols,
        "bf16 matmul shapes"
    );
    assert!(
        a.extent() <= lhs.len() && b.extent() <= rhs.len(),
        "bf16 matmul views"
    );
    if a.cols == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let d = Mat::dense(a.rows, b.cols);
    match path {
        Bf16Path::Widen => gemm::matmul_views(c, d, lhs, a, rhs, b, accumulate, par),
        Bf16Path::Dot => {
            assert!(has_dot(), "the vdpbf16ps path on a CPU without AVX512-BF16");
            #[cfg(target_arch = "x86_64")]
            dot::matmul(c, lhs, a, rhs, b, accumulate, par == Par::Single);
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("the dot path is only chosen on x86-64")
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod dot {
    //! The `vdpbf16ps` GEMM: B packed per 32 columns, A per 12 rows, both in k-pairs
    //! (`[x(k), x(k + 1)]` as bf16 in one 32-bit word), zero-padded to whole tiles and
    //! pairs.

    use super::{Mat, SharedMut};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    const MR: usize = 12;
    const NR: usize = 32;
    /// k-pairs per packed block (512 values of k).
    const KP: usize = 256;
    /// Rows of A per packed block.
    const MC: usize = 8 * MR;
    /// Columns of B per packed block.
    const NC: usize = 8 * NR;

    thread_local! {
        static PACKS: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// `c (+)= a · b` (dense row-major `c`), the output split into one block per thread
    /// along its longer side (or on this thread alone when `single`).
    pub fn matmul(
        c: &mut [f32],
        lhs: &[f32],
        a: Mat,
        rhs: &[f32],
        b: Mat,
        accumulate: bool,
        single: bool,
    ) {
        let (m, n) = (a.rows, b.cols);
        let threads = if single {
            1
        } else {
            rayon::current_num_threads()
        };
        let flops = 2 * m * n * a.cols;
        if threads == 1 || flops < 1 << 22 {
            return block(c.as_mut_ptr(), n, lhs, a, rhs, b, accumulate);
        }
        let split_rows = m >= n;
        let len = if split_rows { m } else { n };
        let step = len.div_ceil(threads).div_ceil(NR * 2) * NR * 2;
        let dst = SharedMut(c.as_mut_ptr());
        rayon::scope(|s| {
            for start in (0..len).step_by(step) {
                let cnt = step.min(len - start);
                s.spawn(move |_| {
                    let (at, av, bv) = match split_rows {
                        true => (start * n, a.row_block(start, cnt), b),
                        false => (start, a, b.col_block(start, cnt)),
                    };
                    // SAFETY: the blocks write disjoint parts of `c`.
                    let out = unsafe { dst.get().add(at) };
                    block(out, n, lhs, av, rhs, bv, accumulate);
                });
            }
        });
    }

    /// One thread's product into `c` (row stride `ldc`), blocked for the caches.
    fn block(c: *mut f32, ldc: usize, lhs: &[f32], a: Mat, rhs: &[f32], b: Mat, acc: bool) {
        let (m, n, k) = (a.rows, b.cols, a.cols);
        PACKS.with(|p| {
            let (pa, pb) = &mut *p.borrow_mut();
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                for (blk, pc) in (0..k).step_by(2 * KP).enumerate() {
                    let kc = (2 * KP).min(k - pc);
                    pack(pb, rhs, b.row_block(pc, kc).col_block(jc, nc).t(), NR);
                    for ic in (0..m).step_by(MC) {
                        let mc = MC.min(m - ic);
                        pack(pa, lhs, a.row_block(ic, mc).col_block(pc, kc), MR);
                        let first = blk == 0 && !acc;
                        // SAFETY: (ic, jc) + the block lies inside the caller's c.
                        let out = unsafe { c.add(ic * ldc + jc) };
                        tiles(out, ldc, pa, pb, (mc, nc, kc.div_ceil(2)), !first);
                    }
                }
            }
        });
    }

    /// The microkernel over every tile of a packed block.
    fn tiles(
        c: *mut f32,
        ldc: usize,
        pa: &[u32],
        pb: &[u32],
        (mc, nc, pairs): (usize, usize, usize),
        acc: bool,
    ) {
        for (jt, bp) in pb.chunks(pairs * NR).enumerate().take(nc.div_ceil(NR)) {
            let cols = NR.min(nc - jt * NR);
            for (it, ap) in pa.chunks(pairs * MR).enumerate().take(mc.div_ceil(MR)) {
                let rows = MR.min(mc - it * MR);
                // SAFETY: the tile lies inside the block; the panels hold `pairs`
                // k-pairs of MR rows / NR columns; the CPU has the features (the Dot
                // path is only chosen when it does).
                unsafe {
                    let out = c.add(it * MR * ldc + jt * NR);
                    kernel(pairs, ap.as_ptr(), bp.as_ptr(), out, ldc, (rows, cols), acc);
                }
            }
        }
    }

    /// Two bf16 values held widened as one 32-bit word of bf16s, `lo` in the low half:
    /// each one's upper 16 bits, which are the whole value.
    #[inline(always)]
    fn pair(lo: f32, hi: f32) -> u32 {
        lo.to_bits() >> 16 | (hi.to_bits() & 0xffff_0000)
    }

    /// The rows of `v` (k along its columns) as panels of `r` rows: per k-pair, `r`
    /// words (rows past `v.rows` and a k past `v.cols` are zero). A's blocks are packed
    /// as they are, B's transposed (rows are its columns).
    fn pack(out: &mut Vec<u32>, src: &[f32], v: Mat, r: usize) {
        let pairs = v.cols.div_ceil(2);
        out.clear();
        out.resize(v.rows.div_ceil(r) * pairs * r, 0);
        let at = |i: usize, j: usize| match j < v.cols {
            true => src[v.offset + i * v.rs + j * v.cs],
            false => 0.0,
        };
        for (ip, panel) in out.chunks_mut(pairs * r).enumerate() {
            for (p, words) in panel.chunks_mut(r).enumerate() {
                for (x, w) in words.iter_mut().enumerate().take(v.rows - ip * r) {
                    let i = ip * r + x;
                    *w = pair(at(i, 2 * p), at(i, 2 * p + 1));
                }
            }
        }
    }

    /// One MR × NR tile: `c (+)= Σ_p a[p] ⊗ b[p]` over `pairs` k-pairs, storing the
    /// first `rows` × `cols` of it.
    ///
    /// # Safety
    /// `a` holds `pairs * MR` words, `b` `pairs * NR`; `c` has `rows` rows of `cols`
    /// writable values `ldc` apart; the CPU has AVX512-F/BW/VL and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn kernel(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        (rows, cols): (usize, usize),
        acc: bool,
    ) {
        let mut sum = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..pairs {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
            for (r, s) in sum.iter_mut().enumerate() {
                let w = *a.add(p * MR + r) as i32;
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(w));
                s[0] = _mm512_dpbf16_ps(s[0], x, b0);
                s[1] = _mm512_dpbf16_ps(s[1], x, b1);
            }
        }
        let lo = mask(cols.min(16));
        let hi = mask(cols.saturating_sub(16));
        for (r, s) in sum.iter().enumerate().take(rows) {
            let row = c.add(r * ldc);
            for (h, (m, v)) in [(lo, s[0]), (hi, s[1])].into_iter().enumerate() {
                let at = row.add(16 * h);
                let v = match acc {
                    true => _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, at)),
                    false => v,
                };
                _mm512_mask_storeu_ps(at, m, v);
            }
        }
    }

    /// The first `n` (≤ 16) lanes.
    fn mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Both paths against an f64 reference of the same bf16 values: odd shapes (edge
    /// tiles, an odd k), every transpose, several k-blocks, accumulation, one and all
    /// threads. The dot path is skipped (and says so) on CPUs without AVX512-BF16.
    #[test]
    fn both_paths_match_a_reference() {
        let paths: Vec<Bf16Path> = match has_dot() {
            true => vec![Bf16Path::Dot, Bf16Path::Widen],
            false => {
                eprintln!("SKIPPED the vdpbf16ps path: this CPU has no AVX512-BF16");
                vec![Bf16Path::Widen]
            }
        };
        for (m, n, k) in [
            (37, 29, 53),
            (1, 1, 1),
            (130, 70, 1100),
            (12, 32, 2),
            (300, 40, 7),
        ] {
            // bf16 values held widened, as the CPU holds bf16 activations
            let val =
                |i: usize, s: usize| bf16::from_f32(((i * s) % 23) as f32 / 8.0 - 1.4).to_f32();
            let a: Vec<f32> = (0..m * k).map(|i| val(i, 7919)).collect();
            let b: Vec<f32> = (0..k * n).map(|i| val(i, 104_729)).collect();
            let want: Vec<f64> = (0..m * n)
                .map(|ij| {
                    let (i, j) = (ij / n, ij % n);
                    (0..k)
                        .map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j]))
                        .sum()
                })
                .collect();
            let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
            let bt: Vec<f32> = (0..n * k).map(|x| b[(x % k) * n + x / k]).collect();
            for &path in &paths {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (la, va) = match ta {
                        true => (&at, Mat::dense(k, m).t()),
                        false => (&a, Mat::dense(m, k)),
                    };
                    let (lb, vb) = match tb {
                        true => (&bt, Mat::dense(n, k).t()),
                        false => (&b, Mat::dense(k, n)),
                    };
                    for par in [Par::Single, Par::Pool] {
                        let mut c = vec![0.5f32; m * n];
                        matmul_with(path, &mut c, la, va, lb, vb, true, par);
                        for (x, w) in c.iter().zip(&want) {
                            let tol = 1e-4 * (1.0 + w.abs());
                            assert!(
                                (*x as f64 - 0.5 - w).abs() < tol,
                                "{path:?} {m}x{n}x{k} ta={ta} tb={tb}: {x} vs {w}"
                            );
                        }
                        matmul_with(path, &mut c, la, va, lb, vb, false, par);
                        for (x, w) in c.iter().zip(&want) {
                            let tol = 1e-4 * (1.0 + w.abs());
                            assert!(
                                (*x as f64 - w).abs() < tol,
                                "{path:?} {m}x{n}x{k}: {x} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }
}
