// Multi-head self-attention on packed qkv [b, t, 3d] (q, k, v blocks of width d, head h at
// columns h*hd..(h+1)*hd of each block), as src/backend/cpu/attention.rs. Only the first
// `q` tokens query (q <= t); all t tokens are keys/values. out is [b, q, d].
//
// Design: one block per (image n, head h), block index = n*heads + h, 256 threads = 8 warps.
// Everything one (n, h) needs is staged in dynamic shared memory once; the block then works
// in two passes separated by one barrier, and no score matrix ever reaches global memory
// (the forward saves lse_i = max + log(sum) per row, the backward recomputes P from it):
//
//   score pass (fv_att_scores): each warp takes FV_ATT_R query rows (i = warp + 8r: 72 >= 65
//     tokens in one round), lanes take keys (j = lane + 32c, 96 per round); per head column
//     k one broadcast read of q_ik per row and one read of k_jk per key feed R*C FMAs.
//     Results go to [q][t] matrices in shared memory; row reductions are warp shuffles.
//   product pass (fv_att_product): C[r][k] (+)= sum_j A(r, j) B[j][k] with A one of those
//     [q][t] matrices (or its transpose) and B a staged [rows][hd] block; each warp takes
//     FV_ATT_PR rows, lanes take columns (k = lane + 32c), so per j one broadcast read of A
//     per row and one read of B per column feed PR*PC FMAs, and the writes to global memory
//     are contiguous 128-byte rows.
//
// Shared-memory layouts (in floats; every block starts 16-byte aligned):
//   K, V   [t][hd + 1], each padded to a multiple of 4: the odd stride keeps lanes that walk
//          keys j conflict-free (lanes that walk columns k are anyway);
//   Q, dO  [q][ldq], ldq = hd rounded up to 4: read as broadcasts, four columns per 16-byte
//          load (all lanes of a warp read the same row);
//   S/P, dS [q][lds], lds = t rounded up to 4: likewise four keys per broadcast load when
//          a product reads them by rows.
// A broadcast costs one shared-memory wavefront whatever its width, so these loads carry 4x
// the data; the score and product passes are bound by shared-memory wavefronts.
//
// Each kernel has an _f32 and a _bf16 form: qkv, the forward's out and the backward's dout
// stored in f32 or in bf16 (mixed precision; widened when staged, outputs rounded), and the
// backward's dqkv f32 when accumulated into, of qkv's type when written; lse f32.
//
// attention_forward_f32(qkv, out, lse, b, t, q, d, heads, scale)
//   grid = b*heads, block = 256, dynamic shared = q ldq + 2 r4(t (hd + 1)) + q lds floats
//   (r4: rounded up to a multiple of 4):
//   scores S = scale Q K^T, P = softmax(S) in place, out = P V (overwrite),
//   lse[(n*heads + h)*q + i] = max_i + log(sum_i).
//
// attention_backward_f32(dout, qkv, lse, dqkv, b, t, q, d, heads, scale)
// attention_backward_write_f32(same): dqkv written, not accumulated into (q == t only)
//   grid = b*heads, block = 256, dynamic shared = 2 q ldq + 2 r4(t (hd + 1)) + 2 q lds floats:
//   P_ij = exp(scale q_i.k_j - lse_i), dP_ij = dO_i.v_j, D_i = sum_j P_ij dP_ij,
//   dS_ij = P_ij (dP_ij - D_i) scale; then dQ = dS K, dK = dS^T Q, dV = P^T dO, each added
//   (+=) straight into dqkv (the _write_ forms: written, =): this block alone owns head h's
//   columns of image n.
//
// Any t >= 1, q <= t, hd = d/heads >= 1, as long as the shared memory fits the device
// (t = q = 65, hd = 64: 68,144 bytes forward, 102,464 backward; the launcher raises the
// kernel's dynamic shared-memory limit beyond 48 KiB).
#include "common.cuh"

#define FV_ATT_THREADS 256
#define FV_ATT_WARPS 8
#define FV_ATT_R 9   // query rows per warp in the score pass
#define FV_ATT_C 3   // keys per lane in the score pass (32 * 3 = 96 per round)
#define FV_ATT_PR 9  // rows per warp in the product pass
#define FV_ATT_PC 2  // columns per lane in the product pass (32 * 2 = 64 per round)

__host__ __device__ __forceinline__ int fv_round4(int n) { return (n + 3) & ~3; }

// X[r][k] = src[r * src_ld + k] (widened to f32) for r < rows, k < hd, X's row stride ld.
template <class T>
__device__ __forceinline__ void fv_att_stage(float* X, int ld, const T* src, long src_ld, int rows, int hd) {
  for (int idx = threadIdx.x; idx < rows * hd; idx += FV_ATT_THREADS) {
    int r = idx / hd, k = idx % hd;
    X[r * ld + k] = fv_f32(src[r * src_ld + k]);
  }
}

// N consecutive floats of shared memory at an (4 N)-byte-aligned address: one load.
template <int N>
struct alignas(4 * N) fv_att_vec {
  float v[N];
};
template <int N>
__device__ __forceinline__ fv_att_vec<N> fv_att_load(const float* p) {
  return *reinterpret_cast<const fv_att_vec<N>*>(p);
}

// x rounded to T's precision (kept in f32): P and dS under mixed precision, as the
// tensor-core kernels (attention_tc.cu) and the CPU round them.
template <class T>
__device__ __forceinline__ float fv_att_round(float x) {
  return fv_f32(fv_as<T>(x));
}

// Forward (BWD = false): S[i][j] = softmax_j(scale q_i.k_j), lse[i] = max + log(sum).
// Backward (BWD = true): S[i][j] = P_ij from lse, dS[i][j] = P_ij (dO_i.v_j - D_i) scale.
// Q, dO row stride ldq, K, V row stride hd + 1, S, dS row stride lds. P and dS are
// rounded to T (bf16 under mixed precision).
template <bool BWD, class T>
__device__ __forceinline__ void fv_att_scores(const float* Q, const float* dO, int ldq, const float* K,
    const float* V, int q, int t, int hd, float scale, float* lse, float* S, float* dS, int lds) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, ldk = hd + 1;
  for (int base = warp; base < q; base += FV_ATT_WARPS * FV_ATT_R) {
    int row[FV_ATT_R];
    float acc[FV_ATT_R];  // forward: running max; backward: sum_j P dP
#pragma unroll
    for (int r = 0; r < FV_ATT_R; ++r) {
      row[r] = min(base + FV_ATT_WARPS * r, q - 1);  // rows past q recompute row q-1, unstored
      acc[r] = BWD ? 0.f : -INFINITY;
    }
    for (int j0 = 0; j0 < t; j0 += 32 * FV_ATT_C) {
      float s[FV_ATT_R][FV_ATT_C] = {}, dp[FV_ATT_R][FV_ATT_C] = {};
      int col[FV_ATT_C];
#pragma unroll
      for (int c = 0; c < FV_ATT_C; ++c) col[c] = min(j0 + lane + 32 * c, t - 1);
      constexpr int VW = 4;  // head columns per broadcast load of a row
      int k = 0;
      for (; k + VW <= hd; k += VW) {
        float kk[VW][FV_ATT_C], vv[VW][FV_ATT_C];
#pragma unroll
        for (int u = 0; u < VW; ++u) {
#pragma unroll
          for (int c = 0; c < FV_ATT_C; ++c) {
            kk[u][c] = K[col[c] * ldk + k + u];
            if (BWD) vv[u][c] = V[col[c] * ldk + k + u];
          }
        }
#pragma unroll
        for (int r = 0; r < FV_ATT_R; ++r) {
          const fv_att_vec<VW> qv = fv_att_load<VW>(Q + row[r] * ldq + k);
          const fv_att_vec<VW> ov = BWD ? fv_att_load<VW>(dO + row[r] * ldq + k) : fv_att_vec<VW>{};
#pragma unroll
          for (int u = 0; u < VW; ++u) {
#pragma unroll
            for (int c = 0; c < FV_ATT_C; ++c) {
              s[r][c] = fmaf(qv.v[u], kk[u][c], s[r][c]);
              if (BWD) dp[r][c] = fmaf(ov.v[u], vv[u][c], dp[r][c]);
            }
          }
        }
      }
      for (; k < hd; ++k) {  // the last hd % VW columns
        float kk[FV_ATT_C], vv[FV_ATT_C];
#pragma unroll
        for (int c = 0; c < FV_ATT_C; ++c) {
          kk[c] = K[col[c] * ldk + k];
          if (BWD) vv[c] = V[col[c] * ldk + k];
        }
#pragma unroll
        for (int r = 0; r < FV_ATT_R; ++r) {
          const float qv = Q[row[r] * ldq + k];
          const float ov = BWD ? dO[row[r] * ldq + k] : 0.f;
#pragma unroll
          for (int c = 0; c < FV_ATT_C; ++c) {
            s[r][c] = fmaf(qv, kk[c], s[r][c]);
            if (BWD) dp[r][c] = fmaf(ov, vv[c], dp[r][c]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < FV_ATT_R; ++r) {
        if (base + FV_ATT_WARPS * r >= q) continue;  // warp-uniform
#pragma unroll
        for (int c = 0; c < FV_ATT_C; ++c) {
          const int j = j0 + lane + 32 * c;
          if (j >= t) continue;
          const long at = (long)row[r] * lds + j;
          if (BWD) {
            const float p = fv_att_round<T>(expf(s[r][c] * scale - lse[row[r]]));
            S[at] = p;
            dS[at] = dp[r][c];
            acc[r] = fmaf(p, dp[r][c], acc[r]);
          } else {
            S[at] = s[r][c] * scale;
            acc[r] = fmaxf(acc[r], s[r][c] * scale);
          }
        }
      }
    }
    // Finish each row; every lane revisits only the columns it wrote (j = lane mod 32).
#pragma unroll
    for (int r = 0; r < FV_ATT_R; ++r) {
      if (base + FV_ATT_WARPS * r >= q) continue;  // warp-uniform
      float* Si = S + (long)row[r] * lds;
      if (BWD) {
        const float D = fv_warp_sum(acc[r]);
        float* dSi = dS + (long)row[r] * lds;
        for (int j = lane; j < t; j += 32) dSi[j] = fv_att_round<T>(Si[j] * (dSi[j] - D) * scale);
      } else {
        const float m = fv_warp_max(acc[r]);
        float sum = 0.f;
        for (int j = lane; j < t; j += 32) {
          const float e = expf(Si[j] - m);
          Si[j] = e;
          sum += e;
        }
        sum = fv_warp_sum(sum);
        const float inv = 1.f / sum;
        for (int j = lane; j < t; j += 32) Si[j] = fv_att_round<T>(Si[j] * inv);
        if (lane == 0) lse[row[r]] = m + logf(sum);
      }
    }
  }
}

// C[r * ldc + k] (+)= sum_{j < inner} A(r, j) B[j * ldb + k] for r < rows, k < hd, where
// A(r, j) is A[r * lda + j] (lda a multiple of 4: read VW j at a time), or A[j * lda + r]
// when TRANS_A. C is f32, or bf16 (rounded; overwritten only).
template <bool TRANS_A, bool ACCUM, class TC>
__device__ __forceinline__ void fv_att_product(const float* A, int lda, const float* B, int ldb, int rows,
    int inner, int hd, TC* C, long ldc) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int base = warp; base < rows; base += FV_ATT_WARPS * FV_ATT_PR) {
    int row[FV_ATT_PR];
#pragma unroll
    for (int r = 0; r < FV_ATT_PR; ++r) row[r] = min(base + FV_ATT_WARPS * r, rows - 1);
    for (int k0 = 0; k0 < hd; k0 += 32 * FV_ATT_PC) {
      int col[FV_ATT_PC];
#pragma unroll
      for (int c = 0; c < FV_ATT_PC; ++c) col[c] = min(k0 + lane + 32 * c, hd - 1);
      float acc[FV_ATT_PR][FV_ATT_PC] = {};
      int j = 0;
      constexpr int VW = 4;  // j per broadcast load of a row
      for (; !TRANS_A && j + VW <= inner; j += VW) {
        float b[VW][FV_ATT_PC];
#pragma unroll
        for (int u = 0; u < VW; ++u) {
#pragma unroll
          for (int c = 0; c < FV_ATT_PC; ++c) b[u][c] = B[(j + u) * ldb + col[c]];
        }
#pragma unroll
        for (int r = 0; r < FV_ATT_PR; ++r) {
          const fv_att_vec<VW> a = fv_att_load<VW>(A + (long)row[r] * lda + j);
#pragma unroll
          for (int u = 0; u < VW; ++u) {
#pragma unroll
            for (int c = 0; c < FV_ATT_PC; ++c) acc[r][c] = fmaf(a.v[u], b[u][c], acc[r][c]);
          }
        }
      }
      for (; j < inner; ++j) {
        float b[FV_ATT_PC];
#pragma unroll
        for (int c = 0; c < FV_ATT_PC; ++c) b[c] = B[j * ldb + col[c]];
#pragma unroll
        for (int r = 0; r < FV_ATT_PR; ++r) {
          const float a = TRANS_A ? A[(long)j * lda + row[r]] : A[(long)row[r] * lda + j];
#pragma unroll
          for (int c = 0; c < FV_ATT_PC; ++c) acc[r][c] = fmaf(a, b[c], acc[r][c]);
        }
      }
#pragma unroll
      for (int r = 0; r < FV_ATT_PR; ++r) {
        if (base + FV_ATT_WARPS * r >= rows) continue;  // warp-uniform
#pragma unroll
        for (int c = 0; c < FV_ATT_PC; ++c) {
          const int k = k0 + lane + 32 * c;
          if (k >= hd) continue;
          TC* o = C + (long)row[r] * ldc + k;
          *o = fv_as<TC>(ACCUM ? fv_f32(*o) + acc[r][c] : acc[r][c]);
        }
      }
    }
  }
}

// qkv and out of type T (f32, or bf16 under mixed precision); lse f32.
template <class T>
__device__ __forceinline__ void fv_attention_forward(const T* __restrict__ qkv, T* __restrict__ out,
    float* __restrict__ lse, int t, int q, int d, int heads, float scale) {
  FV_DYNAMIC_SHARED(float, smem);
  const int hd = d / heads, ldk = hd + 1, ldq = fv_round4(hd), lds = fv_round4(t);
  const int bh = blockIdx.x;
  const int n = bh / heads, h = bh % heads;
  const long d3 = 3L * d;
  const T* base = qkv + (long)n * t * d3 + (long)h * hd;

  float* Q = smem;                         // [q][ldq]
  float* K = Q + q * ldq;                  // [t][ldk]
  float* V = K + fv_round4(t * ldk);       // [t][ldk]
  float* S = V + fv_round4(t * ldk);       // [q][lds]
  fv_att_stage(Q, ldq, base, d3, q, hd);
  fv_att_stage(K, ldk, base + d, d3, t, hd);
  fv_att_stage(V, ldk, base + 2 * d, d3, t, hd);
  __syncthreads();
  fv_att_scores<false, T>(Q, nullptr, ldq, K, nullptr, q, t, hd, scale, lse + (long)bh * q, S, nullptr, lds);
  __syncthreads();
  fv_att_product<false, false>(S, lds, V, ldk, q, t, hd, out + (long)n * q * d + (long)h * hd, d);
}

// qkv and dout of type T; lse f32; dqkv f32 when ACCUM, else of type T.
template <class T, bool ACCUM, class TD>
__device__ __forceinline__ void fv_attention_backward(const T* __restrict__ dout, const T* __restrict__ qkv,
    const float* __restrict__ lse, TD* __restrict__ dqkv, int t, int q, int d, int heads, float scale) {
  FV_DYNAMIC_SHARED(float, smem);
  const int hd = d / heads, ldk = hd + 1, ldq = fv_round4(hd), lds = fv_round4(t);
  const int bh = blockIdx.x;
  const int n = bh / heads, h = bh % heads;
  const long d3 = 3L * d;
  const long off = (long)n * t * d3 + (long)h * hd;
  const T* base = qkv + off;
  TD* dbase = dqkv + off;

  float* Q = smem;                         // [q][ldq]
  float* dO = Q + q * ldq;                 // [q][ldq]
  float* K = dO + q * ldq;                 // [t][ldk]
  float* V = K + fv_round4(t * ldk);       // [t][ldk]
  float* P = V + fv_round4(t * ldk);       // [q][lds]
  float* dS = P + q * lds;                 // [q][lds]
  fv_att_stage(Q, ldq, base, d3, q, hd);
  fv_att_stage(dO, ldq, dout + (long)n * q * d + (long)h * hd, d, q, hd);
  fv_att_stage(K, ldk, base + d, d3, t, hd);
  fv_att_stage(V, ldk, base + 2 * d, d3, t, hd);
  __syncthreads();
  // lse is read, not written, by the backward score pass
  fv_att_scores<true, T>(Q, dO, ldq, K, V, q, t, hd, scale, const_cast<float*>(lse) + (long)bh * q, P, dS, lds);
  __syncthreads();
  fv_att_product<false, ACCUM>(dS, lds, K, ldk, q, t, hd, dbase, d3);         // dQ = dS K
  fv_att_product<true, ACCUM>(dS, lds, Q, ldq, t, q, hd, dbase + d, d3);      // dK = dS^T Q
  fv_att_product<true, ACCUM>(P, lds, dO, ldq, t, q, hd, dbase + 2 * d, d3);  // dV = P^T dO
}

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS, 2)
attention_forward_f32(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse,
    int b, int t, int q, int d, int heads, float scale) {
  (void)b;
  fv_attention_forward(qkv, out, lse, t, q, d, heads, scale);
}

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS, 2)
attention_forward_bf16(const fv_bf16* __restrict__ qkv, fv_bf16* __restrict__ out, float* __restrict__ lse,
    int b, int t, int q, int d, int heads, float scale) {
  (void)b;
  fv_attention_forward(qkv, out, lse, t, q, d, heads, scale);
}

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS, 2)
attention_backward_f32(const float* __restrict__ dout, const float* __restrict__ qkv,
    const float* __restrict__ lse, float* __restrict__ dqkv, int b, int t, int q, int d, int heads,
    float scale) {
  (void)b;
  fv_attention_backward<float, true>(dout, qkv, lse, dqkv, t, q, d, heads, scale);
}

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS, 2)
attention_backward_write_f32(const float* __restrict__ dout, const float* __restrict__ qkv,
    const float* __restrict__ lse, float* __restrict__ dqkv, int b, int t, int q, int d, int heads,
    float scale) {
  (void)b;
  fv_attention_backward<float, false>(dout, qkv, lse, dqkv, t, q, d, heads, scale);
}

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS, 2)
attention_backward_bf16(const fv_bf16* __restrict__ dout, const fv_bf16* __restrict__ qkv,
    const float* __restrict__ lse, float* __restrict__ dqkv, int b, int t, int q, int d, int heads,
    float scale) {
  (void)b;
  fv_attention_backward<fv_bf16, true>(dout, qkv, lse, dqkv, t, q, d, heads, scale);
}

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS, 2)
attention_backward_write_bf16(const fv_bf16* __restrict__ dout, const fv_bf16* __restrict__ qkv,
    const float* __restrict__ lse, fv_bf16* __restrict__ dqkv, int b, int t, int q, int d, int heads,
    float scale) {
  (void)b;
  fv_attention_backward<fv_bf16, false>(dout, qkv, lse, dqkv, t, q, d, heads, scale);
}
