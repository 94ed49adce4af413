//! Checksum and copy in one pass: the CRC-32 of a chunk's bytes, computed as they are
//! copied into a tensor, so that a load reads every byte from memory once.
//!
//! On x86_64 with AVX-512 and VPCLMULQDQ one loop loads 256 bytes, writes them to the
//! destination with non-temporal stores (a destination line is written whole without
//! first being read into the cache, as a plain copy does: a third less memory traffic)
//! and folds them into four 512-bit CRC accumulators: crc32fast's AVX-512 fold (after
//! Gopal et al., "Fast CRC computation for generic polynomials using PCLMULQDQ", Intel,
//! 2009), whose constants are used here. Folding keeps the accumulators congruent,
//! modulo the CRC polynomial, to the data folded in, so the CRC of their 256 bytes is
//! the data's. Elsewhere: blocks checksummed by crc32fast, each copied while still in L1.

use crc32fast::Hasher;

/// The CRC-32 of `src` (as a hasher, for [`Hasher::combine`]), copied to `dst` in the
/// same pass; both are cut to the shorter length.
pub(super) fn checksum_copy(src: &[u8], dst: &mut [u8]) -> Hasher {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    if let Some(crc) = wide::checksum_copy(src, dst) {
        return crc;
    }
    by_blocks(Hasher::new(), src, dst)
}

/// Continues `crc` over `src`, block by block: each block checksummed, then copied
/// from L1 (`src` and `dst` of one length).
fn by_blocks(mut crc: Hasher, src: &[u8], dst: &mut [u8]) -> Hasher {
    const BLOCK: usize = 32 << 10;
    for (s, d) in src.chunks(BLOCK).zip(dst.chunks_mut(BLOCK)) {
        crc.update(s);
        d.copy_from_slice(s);
    }
    crc
}

#[cfg(target_arch = "x86_64")]
mod wide {
    use super::{by_blocks, Hasher};
    use std::arch::x86_64::*;

    /// Bytes per fold step: four 512-bit registers.
    const STEP: usize = 256;

    /// [`super::checksum_copy`] of equal lengths where the CPU has AVX-512F and
    /// VPCLMULQDQ (`None` elsewhere): up to the first 64-byte boundary of `dst` and
    /// after the last whole step by blocks, the steps in between folded.
    pub(super) fn checksum_copy(src: &[u8], dst: &mut [u8]) -> Option<Hasher> {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("vpclmulqdq")) {
            return None;
        }
        let head = dst.as_ptr().align_offset(64).min(dst.len());
        let body = (dst.len() - head) / STEP * STEP;
        let (d_head, d_rest) = dst.split_at_mut(head);
        let (d_body, d_tail) = d_rest.split_at_mut(body);
        let (s_head, s_rest) = src.split_at(head);
        let (s_body, s_tail) = s_rest.split_at(body);
        let crc = by_blocks(Hasher::new(), s_head, d_head).finalize();
        // SAFETY: the CPU has both features (checked above); `d_body` starts at the
        // first 64-byte boundary of `dst`.
        let crc = unsafe { fold_copy(crc, s_body, d_body) };
        // SAFETY: SSE is part of x86_64.
        unsafe { _mm_sfence() };
        let done = Hasher::new_with_initial_len(crc, (head + body) as u64);
        Some(by_blocks(done, s_tail, d_tail))
    }

    /// Continues CRC `crc` over `src` (whole steps) while copying it to `dst` (as long)
    /// with non-temporal stores, which the caller then fences.
    ///
    /// # Safety
    /// The CPU has AVX-512F and VPCLMULQDQ, and `dst` starts on a 64-byte boundary.
    #[target_feature(enable = "avx512f,vpclmulqdq")]
    unsafe fn fold_copy(crc: u32, src: &[u8], dst: &mut [u8]) -> u32 {
        // (x^(2048+32), x^(2048-32)) mod P, bit-reflected: a fold by 256 bytes
        let k = _mm512_set4_epi64(0x1322d1430, 0x11542778a, 0x1322d1430, 0x11542778a);
        let mut steps = src.chunks_exact(STEP).zip(dst.chunks_exact_mut(STEP));
        let Some((s, d)) = steps.next() else {
            return crc;
        };
        // SAFETY (every `copy_line`): steps of `dst` start on 64-byte boundaries.
        let mut acc = [0, 1, 2, 3].map(|i| unsafe { copy_line(s, d, i) });
        // the running CRC enters as the first four bytes' complement, as in crc32fast
        acc[0] = _mm512_xor_si512(
            acc[0],
            _mm512_zextsi128_si512(_mm_cvtsi32_si128(!crc as i32)),
        );
        for (s, d) in steps {
            for (i, a) in acc.iter_mut().enumerate() {
                let (lo, hi) = (
                    _mm512_clmulepi64_epi128(*a, k, 0x00),
                    _mm512_clmulepi64_epi128(*a, k, 0x11),
                );
                let x = unsafe { copy_line(s, d, i) };
                *a = _mm512_ternarylogic_epi64(x, lo, hi, 0x96);
            }
        }
        let mut rest = [0u8; STEP];
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: `rest[64 * i..]` holds 64 bytes for i < 4; the store is unaligned.
            unsafe { _mm512_storeu_si512(rest[64 * i..].as_mut_ptr().cast(), *a) };
        }
        // the accumulators' own CRC, from a zero register (crc32fast's initial value
        // is the register's complement)
        let mut tail = Hasher::new_with_initial(!0);
        tail.update(&rest);
        tail.finalize()
    }

    /// Loads 64-byte line `i` of `src` and stores it to line `i` of `dst` with a
    /// non-temporal store.
    ///
    /// # Safety
    /// The CPU has AVX-512F, and `dst` starts on a 64-byte boundary.
    #[target_feature(enable = "avx512f")]
    unsafe fn copy_line(src: &[u8], dst: &mut [u8], i: usize) -> __m512i {
        let (s, d) = (&src[64 * i..64 * i + 64], &mut dst[64 * i..64 * i + 64]);
        // SAFETY: `s` and `d` are 64 bytes, `d` 64-byte aligned as the store needs.
        unsafe {
            let v = _mm512_loadu_si512(s.as_ptr().cast());
            _mm512_stream_si512(d.as_mut_ptr().cast(), v);
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::checksum_copy;

    /// Every length around the fold's step and block sizes, at every alignment of the
    /// source and the destination: the checksum is crc32fast's, the copy exact.
    #[test]
    fn equals_crc32fast_and_copies() {
        let data: Vec<u8> = (0..140_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut out = vec![0u8; data.len() + 64];
        let lens = [
            0, 1, 63, 64, 65, 255, 256, 257, 320, 511, 512, 4095, 4096, 33_000, 131_072,
        ];
        for len in lens {
            for (from, to) in [(0, 0), (1, 0), (0, 3), (5, 64), (17, 63), (63, 1)] {
                let src = &data[from..from + len];
                let dst = &mut out[to..to + len];
                dst.fill(0);
                let crc = checksum_copy(src, dst);
                assert_eq!(crc.total_len(), len as u64, "len {len}");
                assert_eq!(
                    crc.finalize(),
                    crc32fast::hash(src),
                    "len {len} at {from}->{to}"
                );
                assert!(dst == src, "copy, len {len} at {from}->{to}");
                let crc = super::by_blocks(crc32fast::Hasher::new(), src, dst);
                assert_eq!(crc.finalize(), crc32fast::hash(src), "blocks, len {len}");
            }
        }
    }
}
