//! Matrix products through the `gemm` crate (runtime-dispatched AVX2/AVX-512 kernels).
//!
//! Note: `gemm::gemm` computes `dst = alpha * dst + beta * lhs * rhs` — alpha and beta
//! are swapped relative to BLAS.

use gemm::Parallelism;

/// A strided view of a matrix inside a slice: element (i, j) is at
/// `offset + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Mat {
    /// A contiguous row-major `[rows, cols]` matrix at the start of the slice.
    pub fn dense(rows: usize, cols: usize) -> Mat {
        Mat {
            offset: 0,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The same memory viewed transposed.
    pub fn t(self) -> Mat {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows `start..start + n`.
    pub(crate) fn row_block(self, start: usize, n: usize) -> Mat {
        Mat {
            offset: self.offset + start * self.rs,
            rows: n,
            ..self
        }
    }

    /// Columns `start..start + n`.
    pub(crate) fn col_block(self, start: usize, n: usize) -> Mat {
        Mat {
            offset: self.offset + start * self.cs,
            cols: n,
            ..self
        }
    }

    /// One past the largest index the view touches.
    pub(crate) fn extent(self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            return self.offset;
        }
        self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
    }
}

/// How a product may use threads: all of rayon's pool, or only the calling thread
/// (for the many small per-head products that are themselves run in parallel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    Pool,
    Single,
}

/// Products below this many FLOPs run on the calling thread: fork/join would cost more.
const PAR_MIN_FLOPS: usize = 1 << 22;

/// A pointer that may cross threads; users guarantee disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(pub *mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the field).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst_view (+)= lhs_view · rhs_view` on views into slices.
///
/// # Panics
/// If the views' shapes disagree or a view reaches outside its slice: both are
/// programming errors inside ferrovit, never the result of user input.
#[allow(clippy::too_many_arguments)]
pub fn matmul_views(
    dst: &mut [f32],
    d: Mat,
    lhs: &[f32],
    a: Mat,
    rhs: &[f32],
    b: Mat,
    accumulate: bool,
    par: Par,
) {
    assert!(d.extent() <= dst.len() && a.extent() <= lhs.len() && b.extent() <= rhs.len());
    // SAFETY: every view lies inside its slice (checked above), and `dst` is borrowed
    // mutably so it cannot alias `lhs` or `rhs`.
    unsafe {
        matmul_raw(
            dst.as_mut_ptr(),
            d,
            lhs.as_ptr(),
            a,
            rhs.as_ptr(),
            b,
            accumulate,
            par,
        )
    }
}

/// Raw-pointer form of [`matmul_views`], for products that write disjoint parts of
/// one buffer from several threads (attention heads).
///
/// # Safety
/// Each view must lie inside the allocation its pointer points into, and no other
/// thread may write the elements of `d` or read them while this runs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_raw(
    dst: *mut f32,
    d: Mat,
    lhs: *const f32,
    a: Mat,
    rhs: *const f32,
    b: Mat,
    accumulate: bool,
    par: Par,
) {
    assert!(
        a.rows == d.rows && b.cols == d.cols && a.cols == b.rows,
        "matmul shapes: dst {}x{}, lhs {}x{}, rhs {}x{}",
        d.rows,
        d.cols,
        a.rows,
        a.cols,
        b.rows,
        b.cols
    );
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    let k = a.cols;
    if k == 0 {
        if !accumulate {
            for i in 0..d.rows {
                for j in 0..d.cols {
                    *dst.add(d.offset + i * d.rs + j * d.cs) = 0.0;
                }
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    if par == Par::Single || threads == 1 || 2 * d.rows * d.cols * k < PAR_MIN_FLOPS {
        gemm_single(dst, d, lhs, a, rhs, b, accumulate);
        return;
    }
    // Split the output into one block per thread along its longer side and run each
    // block single-threaded: on the machines measured, gemm's own rayon splitting
    // reached 60 GFLOPS on two cores where two single-threaded halves reach 175.
    let split_rows = d.rows >= d.cols;
    let len = if split_rows { d.rows } else { d.cols };
    // Multiples of 64 keep the AVX-512 micro-kernel's tiles full.
    let step = len.div_ceil(threads).div_ceil(64) * 64;
    // Read-only operands cross threads as addresses (raw pointers are not `Send`).
    let (dst, lhs, rhs) = (SharedMut(dst), lhs as usize, rhs as usize);
    rayon::scope(|s| {
        for start in (0..len).step_by(step) {
            let n = step.min(len - start);
            s.spawn(move |_| {
                let (dst, lhs, rhs) = (dst, lhs as *const f32, rhs as *const f32);
                let (dv, av, bv) = if split_rows {
                    (d.row_block(start, n), a.row_block(start, n), b)
                } else {
                    (d.col_block(start, n), a, b.col_block(start, n))
                };
                // SAFETY: the blocks are disjoint parts of the caller's `d` view.
                unsafe { gemm_single(dst.get(), dv, lhs, av, rhs, bv, accumulate) }
            });
        }
    });
}

/// One single-threaded gemm call on views (shapes already checked).
unsafe fn gemm_single(
    dst: *mut f32,
    d: Mat,
    lhs: *const f32,
    a: Mat,
    rhs: *const f32,
    b: Mat,
    accumulate: bool,
) {
    gemm::gemm(
        d.rows,
        d.cols,
        a.cols,
        dst.add(d.offset),
        d.cs as isize,
        d.rs as isize,
        accumulate,
        lhs.add(a.offset),
        a.cs as isize,
        a.rs as isize,
        rhs.add(b.offset),
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    ta: bool,
    b: &[f32],
    tb: bool,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    let av = if ta {
        Mat::dense(k, m).t()
    } else {
        Mat::dense(m, k)
    };
    let bv = if tb {
        Mat::dense(n, k).t()
    } else {
        Mat::dense(k, n)
    };
    matmul_views(c, Mat::dense(m, n), a, av, b, bv, accumulate, Par::Pool);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = x[i * c + j];
            }
        }
        t
    }

    #[test]
    fn all_transpose_combinations_match_naive() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let want = naive(&a, &b, m, n, k);
        let at = transpose(&a, m, k);
        let bt = transpose(&b, k, n);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let aa = if ta { &at } else { &a };
            let bb = if tb { &bt } else { &b };
            let mut c = vec![1.0; m * n];
            matmul(&mut c, aa, ta, bb, tb, (m, n, k), true);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - (y + 1.0)).abs() < 1e-4, "ta={ta} tb={tb}");
            }
            matmul(&mut c, aa, ta, bb, tb, (m, n, k), false);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "ta={ta} tb={tb}");
            }
        }
    }
}
