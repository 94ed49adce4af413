//! f32 ↔ bf16 over slices: vectorised (crate::simd) and split over threads for large
//! slices. Rounding is to nearest even, NaNs stay NaN (quietened), exactly as
//! `half::bf16::from_f32` and CUDA's `__float2bfloat16` do, denormals included;
//! widening is exact.

use crate::simd::simd_fn;
use half::bf16;
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 1 << 16;

/// One f32 rounded to bf16 (branch-free, so the loops vectorise).
#[inline(always)]
fn narrow_one(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet = (b >> 16) | 0x40;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    bf16::from_bits(if nan { quiet } else { rounded } as u16)
}

simd_fn! {
    fn narrow_chunk(src: &[f32], dst: &mut [bf16]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = narrow_one(s);
        }
    }
}

simd_fn! {
    fn round_chunk(src: &[f32], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(narrow_one(s).to_bits()) << 16);
        }
    }
}

simd_fn! {
    /// As [`round_in_place`] on the calling thread (for blocks a task has just written).
    pub fn round_in_place_serial(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = f32::from_bits(u32::from(narrow_one(*v).to_bits()) << 16);
        }
    }
}

simd_fn! {
    fn widen_chunk(src: &[bf16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}

/// `dst[i] = bf16(src[i])` (round to nearest even).
///
/// # Panics
/// If the lengths differ.
pub fn narrow(src: &[f32], dst: &mut [bf16]) {
    chunked(src, dst, narrow_chunk);
}

/// `dst[i] = f32(src[i])` (exact).
///
/// # Panics
/// If the lengths differ.
pub fn widen(src: &[bf16], dst: &mut [f32]) {
    chunked(src, dst, widen_chunk);
}

/// `dst[i] = f32(bf16(src[i]))`: the values bf16 storage would hold, kept as f32.
///
/// # Panics
/// If the lengths differ.
pub fn round(src: &[f32], dst: &mut [f32]) {
    chunked(src, dst, round_chunk);
}

/// `x[i] = f32(bf16(x[i]))`, as [`round`] in place.
pub fn round_in_place(x: &mut [f32]) {
    if x.len() <= CHUNK {
        return round_in_place_serial(x);
    }
    x.par_chunks_mut(CHUNK).for_each(round_in_place_serial);
}

/// `f` over matching chunks of `src` and `dst`, in parallel when they are large.
fn chunked<S: Sync, D: Send>(src: &[S], dst: &mut [D], f: fn(&[S], &mut [D])) {
    assert_eq!(src.len(), dst.len(), "bf16 conversion: lengths differ");
    if src.len() <= CHUNK {
        return f(src, dst);
    }
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| f(s, d));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every class of f32 (zeros, denormals, ties both ways, the largest finite values
    /// that round to infinity, infinities, NaNs with payloads) and a sweep of bit
    /// patterns round as `half` does, on the vector and the scalar paths.
    #[test]
    fn narrowing_matches_half_bit_for_bit() {
        let mut xs: Vec<f32> = [
            0x0000_0000u32,
            0x8000_0000,
            0x0000_0001,
            0x0000_8000,
            0x0001_8000,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_7fff,
            0x7f7f_ffff,
            0x7f7f_7fff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0xffff_ffff,
            0x7fbf_ffff,
        ]
        .into_iter()
        .map(f32::from_bits)
        .collect();
        xs.extend((0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9))));
        let want: Vec<u16> = xs.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let mut got = vec![bf16::ZERO; xs.len()];
        narrow(&xs, &mut got);
        let got: Vec<u16> = got.iter().map(|b| b.to_bits()).collect();
        assert_eq!(got, want);
        let scalar: Vec<u16> = xs.iter().map(|&x| narrow_one(x).to_bits()).collect();
        assert_eq!(scalar, want);
        let mut rounded = vec![0.0f32; xs.len()];
        round(&xs, &mut rounded);
        for (r, &w) in rounded.iter().zip(&want) {
            assert_eq!(r.to_bits(), u32::from(w) << 16);
        }
        let mut back = vec![0.0f32; xs.len()];
        let halves: Vec<bf16> = want.iter().map(|&b| bf16::from_bits(b)).collect();
        widen(&halves, &mut back);
        for (h, w) in halves.iter().zip(&back) {
            assert_eq!(h.to_f32().to_bits(), w.to_bits());
        }
    }
}
