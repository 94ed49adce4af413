// Attention on tensor cores for bf16 qkv (mixed precision), as kernels/attention.cu computes
// it (same arguments, same saved lse, same results up to f32 rounding) when the head width
// hd is a multiple of 16. The products run as 16x16x16 wmma tiles (bf16 operands, f32
// accumulation); the softmax and its backward run in f32 on the CUDA cores. As there (and
// as FlashAttention does), P and dS are rounded to bf16 before they enter a product.
//
// One block per (image n, head h), 256 threads = 8 warps. Everything is staged in dynamic
// shared memory, rows padded with zeros to multiples of 16 (Tq = r16(q), Tk = r16(t)):
//   Q, dO  bf16 [Tq][ldh], K, V bf16 [Tk][ldh]   ldh = hd + 8
//   S, dP  f32  [Tq][lds]                        lds = Tk + 4 (S's region also holds the
//                                                f32 outputs [Tq or Tk][ldo], ldo = hd + 4)
//   P, dS  bf16 [Tq][ldp]                        ldp = Tk + 8
// every region starting on a 128-byte boundary (wmma needs 32), every leading dimension a
// multiple of 16 bytes; the padding columns spread rows over the shared-memory banks.
//
// attention_forward_tc_bf16(qkv, out, lse, b, t, q, d, heads, scale): S = Q K^T, then per
//   row (a warp each) P = softmax(scale S) rounded to bf16 and lse = max + log(sum), then
//   O = P V, written to out (bf16).
// attention_backward_tc_bf16(dout, qkv, lse, dqkv, ...): S = Q K^T and dP = dO V^T, then
//   per row P = exp(scale S - lse) (bf16), D = sum_j P dP, dS = P (dP - D) scale (bf16),
//   then dQ = dS K, dK = dS^T Q, dV = P^T dO, each added into the f32 dqkv;
// attention_backward_write_tc_bf16: the same, dqkv (bf16) written, not added to (q == t).
//
// Shared bytes: forward a(Tq ldh 2) + 2 a(Tk ldh 2) + a(4 max(Tq lds, Tq ldo)) + a(Tq ldp 2);
// backward 2 a(Tq ldh 2) + 2 a(Tk ldh 2) + a(4 max(Tq lds, Tk ldo)) + a(4 Tq lds)
// + 2 a(Tq ldp 2), a() rounding up to 128 (t = q = 65, hd = 64: 77,312 and 129,536 bytes).
#include "common.cuh"
#ifndef FV_EMULATION
#include <mma.h>
#endif
#include <type_traits>

namespace wmma = nvcuda::wmma;

#define FV_TC_THREADS 256
#define FV_TC_WARPS 8

__host__ __device__ __forceinline__ int fv_tc_r16(int n) { return (n + 15) & ~15; }
__host__ __device__ __forceinline__ long fv_tc_a128(long bytes) { return (bytes + 127) & ~127L; }

// The block's shared-memory regions (see the header).
struct FvTcLayout {
  int tq, tk, ldh, lds, ldp, ldo;
  fv_bf16 *q, *o_grad, *k, *v, *p, *ds;
  float *s, *dp;
  __device__ FvTcLayout(unsigned char* base, int q_rows, int t, int hd, bool backward) {
    tq = fv_tc_r16(q_rows);
    tk = fv_tc_r16(t);
    ldh = hd + 8;
    lds = tk + 4;
    ldp = tk + 8;
    ldo = hd + 4;
    unsigned char* at = base;
    auto take = [&](long bytes) {
      unsigned char* r = at;
      at += fv_tc_a128(bytes);
      return r;
    };
    q = reinterpret_cast<fv_bf16*>(take(2L * tq * ldh));
    o_grad = backward ? reinterpret_cast<fv_bf16*>(take(2L * tq * ldh)) : nullptr;
    k = reinterpret_cast<fv_bf16*>(take(2L * tk * ldh));
    v = reinterpret_cast<fv_bf16*>(take(2L * tk * ldh));
    const long out_rows = backward ? tk : tq;
    s = reinterpret_cast<float*>(take(4L * (tq * lds > out_rows * ldo ? tq * lds : out_rows * ldo)));
    dp = backward ? reinterpret_cast<float*>(take(4L * tq * lds)) : nullptr;
    p = reinterpret_cast<fv_bf16*>(take(2L * tq * ldp));
    ds = backward ? reinterpret_cast<fv_bf16*>(take(2L * tq * ldp)) : nullptr;
  }
};

// X[r][k] = src[r * src_ld + k] for r < rows, zero for rows..padded; k < hd.
__device__ __forceinline__ void fv_tc_stage(fv_bf16* X, int ld, const fv_bf16* src, long src_ld, int rows,
                                            int padded, int hd) {
  for (int idx = threadIdx.x; idx < padded * hd; idx += FV_TC_THREADS) {
    const int r = idx / hd, k = idx % hd;
    X[r * ld + k] = r < rows ? src[r * src_ld + k] : fv_as<fv_bf16>(0.f);
  }
}

// C[M][N] (f32, ldc) = A B over 16x16 tiles, the warps taking tiles in turn. A is M x K:
// row-major A[m * lda + k], or (A_T) column-major A[k * lda + m]; B is K x N: row-major
// B[k * ldb + n], or (B_T) column-major B[n * ldb + k]. M, N, K multiples of 16.
template <bool A_T, bool B_T>
__device__ __forceinline__ void fv_tc_product(const fv_bf16* A, int lda, const fv_bf16* B, int ldb, int M, int N,
                                              int K, float* C, int ldc) {
  using LA = typename std::conditional<A_T, wmma::col_major, wmma::row_major>::type;
  using LB = typename std::conditional<B_T, wmma::col_major, wmma::row_major>::type;
  const int warp = threadIdx.x / 32, tiles_n = N / 16;
  for (int tile = warp; tile < (M / 16) * tiles_n; tile += FV_TC_WARPS) {
    const int m0 = tile / tiles_n * 16, n0 = tile % tiles_n * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < K; k0 += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, fv_bf16, LA> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, fv_bf16, LB> b;
      wmma::load_matrix_sync(a, A_T ? A + (long)k0 * lda + m0 : A + (long)m0 * lda + k0, lda);
      wmma::load_matrix_sync(b, B_T ? B + (long)n0 * ldb + k0 : B + (long)k0 * ldb + n0, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + (long)m0 * ldc + n0, acc, ldc, wmma::mem_row_major);
  }
}

// dst[r * dst_ld + k] (+)= X[r * ldx + k] for r < rows, k < hd.
template <bool ACCUM, class TD>
__device__ __forceinline__ void fv_tc_emit(TD* dst, long dst_ld, const float* X, int ldx, int rows, int hd) {
  for (int idx = threadIdx.x; idx < rows * hd; idx += FV_TC_THREADS) {
    const int r = idx / hd, k = idx % hd;
    TD* o = dst + r * dst_ld + k;
    *o = fv_as<TD>(ACCUM ? fv_f32(*o) + X[r * ldx + k] : X[r * ldx + k]);
  }
}

__device__ __forceinline__ void fv_attention_forward_tc(const fv_bf16* __restrict__ qkv, fv_bf16* __restrict__ out,
    float* __restrict__ lse, int t, int q, int d, int heads, float scale) {
  FV_DYNAMIC_SHARED(unsigned char, smem);
  const int hd = d / heads, bh = blockIdx.x, n = bh / heads, h = bh % heads;
  const long d3 = 3L * d;
  const fv_bf16* base = qkv + (long)n * t * d3 + (long)h * hd;
  const FvTcLayout L(smem, q, t, hd, false);
  fv_tc_stage(L.q, L.ldh, base, d3, q, L.tq, hd);
  fv_tc_stage(L.k, L.ldh, base + d, d3, t, L.tk, hd);
  fv_tc_stage(L.v, L.ldh, base + 2 * d, d3, t, L.tk, hd);
  __syncthreads();
  fv_tc_product<false, true>(L.q, L.ldh, L.k, L.ldh, L.tq, L.tk, hd, L.s, L.lds);  // S = Q K^T
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int i = threadIdx.x / 32; i < L.tq; i += FV_TC_WARPS) {
    const float* Si = L.s + (long)i * L.lds;
    fv_bf16* Pi = L.p + (long)i * L.ldp;
    if (i >= q) {  // padding rows: zero, so their products stay finite
      for (int j = lane; j < L.tk; j += 32) Pi[j] = fv_as<fv_bf16>(0.f);
      continue;
    }
    float m = -INFINITY;
    for (int j = lane; j < t; j += 32) m = fmaxf(m, Si[j] * scale);
    m = fv_warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < t; j += 32) sum += expf(Si[j] * scale - m);
    sum = fv_warp_sum(sum);
    const float inv = 1.f / sum;
    for (int j = lane; j < L.tk; j += 32) Pi[j] = fv_as<fv_bf16>(j < t ? expf(Si[j] * scale - m) * inv : 0.f);
    if (lane == 0) lse[(long)bh * q + i] = m + logf(sum);
  }
  __syncthreads();
  fv_tc_product<false, false>(L.p, L.ldp, L.v, L.ldh, L.tq, hd, L.tk, L.s, L.ldo);  // O = P V
  __syncthreads();
  fv_tc_emit<false>(out + (long)n * q * d + (long)h * hd, d, L.s, L.ldo, q, hd);
}

template <bool ACCUM, class TD>
__device__ __forceinline__ void fv_attention_backward_tc(const fv_bf16* __restrict__ dout,
    const fv_bf16* __restrict__ qkv, const float* __restrict__ lse, TD* __restrict__ dqkv, int t, int q, int d,
    int heads, float scale) {
  FV_DYNAMIC_SHARED(unsigned char, smem);
  const int hd = d / heads, bh = blockIdx.x, n = bh / heads, h = bh % heads;
  const long d3 = 3L * d, off = (long)n * t * d3 + (long)h * hd;
  const FvTcLayout L(smem, q, t, hd, true);
  fv_tc_stage(L.q, L.ldh, qkv + off, d3, q, L.tq, hd);
  fv_tc_stage(L.o_grad, L.ldh, dout + (long)n * q * d + (long)h * hd, d, q, L.tq, hd);
  fv_tc_stage(L.k, L.ldh, qkv + off + d, d3, t, L.tk, hd);
  fv_tc_stage(L.v, L.ldh, qkv + off + 2 * d, d3, t, L.tk, hd);
  __syncthreads();
  fv_tc_product<false, true>(L.q, L.ldh, L.k, L.ldh, L.tq, L.tk, hd, L.s, L.lds);        // S = Q K^T
  fv_tc_product<false, true>(L.o_grad, L.ldh, L.v, L.ldh, L.tq, L.tk, hd, L.dp, L.lds);  // dP = dO V^T
  __syncthreads();
  const int lane = threadIdx.x % 32;
  for (int i = threadIdx.x / 32; i < L.tq; i += FV_TC_WARPS) {
    const float* Si = L.s + (long)i * L.lds;
    const float* dPi = L.dp + (long)i * L.lds;
    fv_bf16* Pi = L.p + (long)i * L.ldp;
    fv_bf16* dSi = L.ds + (long)i * L.ldp;
    if (i >= q) {
      for (int j = lane; j < L.tk; j += 32) Pi[j] = dSi[j] = fv_as<fv_bf16>(0.f);
      continue;
    }
    const float li = lse[(long)bh * q + i];
    float D = 0.f;
    for (int j = lane; j < t; j += 32) {
      const fv_bf16 p = fv_as<fv_bf16>(expf(Si[j] * scale - li));
      Pi[j] = p;
      D = fmaf(fv_f32(p), dPi[j], D);
    }
    D = fv_warp_sum(D);
    for (int j = lane; j < L.tk; j += 32) {
      dSi[j] = fv_as<fv_bf16>(j < t ? fv_f32(Pi[j]) * (dPi[j] - D) * scale : 0.f);
      if (j >= t) Pi[j] = fv_as<fv_bf16>(0.f);
    }
  }
  __syncthreads();
  TD* dbase = dqkv + off;
  fv_tc_product<false, false>(L.ds, L.ldp, L.k, L.ldh, L.tq, hd, L.tk, L.s, L.ldo);  // dQ = dS K
  __syncthreads();
  fv_tc_emit<ACCUM>(dbase, d3, L.s, L.ldo, q, hd);
  __syncthreads();
  fv_tc_product<true, false>(L.ds, L.ldp, L.q, L.ldh, L.tk, hd, L.tq, L.s, L.ldo);  // dK = dS^T Q
  __syncthreads();
  fv_tc_emit<ACCUM>(dbase + d, d3, L.s, L.ldo, t, hd);
  __syncthreads();
  fv_tc_product<true, false>(L.p, L.ldp, L.o_grad, L.ldh, L.tk, hd, L.tq, L.s, L.ldo);  // dV = P^T dO
  __syncthreads();
  fv_tc_emit<ACCUM>(dbase + 2 * d, d3, L.s, L.ldo, t, hd);
}

extern "C" __global__ void __launch_bounds__(FV_TC_THREADS)
attention_forward_tc_bf16(const fv_bf16* __restrict__ qkv, fv_bf16* __restrict__ out, float* __restrict__ lse,
    int b, int t, int q, int d, int heads, float scale) {
  (void)b;
  fv_attention_forward_tc(qkv, out, lse, t, q, d, heads, scale);
}

extern "C" __global__ void __launch_bounds__(FV_TC_THREADS)
attention_backward_tc_bf16(const fv_bf16* __restrict__ dout, const fv_bf16* __restrict__ qkv,
    const float* __restrict__ lse, float* __restrict__ dqkv, int b, int t, int q, int d, int heads, float scale) {
  (void)b;
  fv_attention_backward_tc<true>(dout, qkv, lse, dqkv, t, q, d, heads, scale);
}

extern "C" __global__ void __launch_bounds__(FV_TC_THREADS)
attention_backward_write_tc_bf16(const fv_bf16* __restrict__ dout, const fv_bf16* __restrict__ qkv,
    const float* __restrict__ lse, fv_bf16* __restrict__ dqkv, int b, int t, int q, int d, int heads,
    float scale) {
  (void)b;
  fv_attention_backward_tc<false>(dout, qkv, lse, dqkv, t, q, d, heads, scale);
}
