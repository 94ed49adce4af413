// Multi-head self-attention on packed qkv [b, t, 3d] (q, k, v blocks of width d, head h at
// columns h*hd..(h+1)*hd of each block), as src/backend/cpu/attention.rs. Only the first
// `q` tokens query (q <= t); all t tokens are keys/values. out is [b, q, d].
//
// Design: one block per (image n, head h), block index = n*heads + h, 128 threads = 4 warps.
// K and V of (n, h) are staged in dynamic shared memory; each warp then handles the query
// rows i = warp, warp+4, ... < q alone (no block barriers inside the row loop), with a
// per-warp shared row for the scores and for q_i (and dO_i in the backward). Reductions
// over keys are warp shuffles. No score matrix ever reaches global memory: the forward
// saves lse_i = max + log(sum) per row, the backward recomputes P from it.
//
// Shared-memory layouts. "k-major" means X[k*t + j] (head column k, token j); lanes that
// walk tokens j then hit consecutive words, and lanes that walk columns k hit stride t,
// conflict-free whenever t is odd (ViT's 65 tokens). "row-major" means X[j*hd + k].
//
// attention_forward_f32(qkv, out, lse, b, t, q, d, heads, scale)
//   grid = b*heads, block = 128, dynamic shared = (2*t*hd + 4*(t + hd)) floats:
//     Kt  [hd][t]  k-major      (scores: lanes over j)
//     V   [t][hd]  row-major    (output: lanes over k)
//     per warp w: S_w [t] (scores, then exp), Q_w [hd] (q_i)
//   writes out[n, i, h*hd + k] (overwrite) and lse[(n*heads + h)*q + i].
//
// attention_backward_f32(dout, qkv, lse, dqkv, b, t, q, d, heads, scale)
//   grid = b*heads, block = 128, dynamic shared = (4*t*hd + 4*(2*t + 2*hd)) floats:
//     Kt, Vt, dKt, dVt  [hd][t] each, k-major (dK/dV accumulators zeroed first)
//     per warp w: P_w [t], dS_w [t] (dP, then dS), Q_w [hd], dO_w [hd]
//   per row i: P_ij = exp(scale q_i.k_j - lse_i), dP_ij = dO_i.v_j, D_i = sum_j P_ij dP_ij,
//   dS_ij = P_ij (dP_ij - D_i) scale; dQ_i += sum_j dS_ij k_j straight into dqkv (this block
//   owns those columns, this warp that row); dK_j += dS_ij q_i, dV_j += P_ij dO_i by
//   shared-memory atomicAdd; after all rows, __syncthreads and dqkv += dK, dV.
//   Accumulates (+=) into dqkv.
//
// Any t >= 1, q <= t, hd = d/heads >= 1 (up to 128; no multiple-of-32 requirement).
// (Large t*hd needs the launcher to raise cudaFuncAttributeMaxDynamicSharedMemorySize
// beyond 48 KiB: e.g. t=65, hd=64 backward is 17672 floats = 70688 bytes.)
#include "common.cuh"

#define FV_ATT_THREADS 128
#define FV_ATT_WARPS 4

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS)
attention_forward_f32(const float* __restrict__ qkv, float* __restrict__ out, float* __restrict__ lse,
    int b, int t, int q, int d, int heads, float scale) {
  FV_DYNAMIC_SHARED(float, smem);
  (void)b;
  const int hd = d / heads;
  const int bh = blockIdx.x;
  const int n = bh / heads, h = bh % heads;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const long d3 = 3L * d;
  const float* base = qkv + (long)n * t * d3 + (long)h * hd;

  float* Kt = smem;                        // [hd][t]
  float* V = Kt + (long)t * hd;            // [t][hd]
  float* S = V + (long)t * hd + warp * t;  // this warp's scores [t]
  float* Qr = V + (long)t * hd + FV_ATT_WARPS * t + warp * hd; // this warp's q_i [hd]

  for (int idx = tid; idx < t * hd; idx += FV_ATT_THREADS) {
    int j = idx / hd, k = idx % hd;
    const float* row = base + j * d3;
    Kt[k * t + j] = row[d + k];
    V[idx] = row[2 * d + k];
  }
  __syncthreads();

  for (int i = warp; i < q; i += FV_ATT_WARPS) {
    const float* qi = base + i * d3;
    for (int k = lane; k < hd; k += 32) Qr[k] = qi[k];
    __syncwarp();
    float m = -INFINITY;
    for (int j = lane; j < t; j += 32) {
      float s = 0.f;
      for (int k = 0; k < hd; ++k) s = fmaf(Qr[k], Kt[k * t + j], s);
      s *= scale;
      S[j] = s;
      m = fmaxf(m, s);
    }
    m = fv_warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < t; j += 32) {
      float e = expf(S[j] - m);
      S[j] = e;
      sum += e;
    }
    sum = fv_warp_sum(sum);
    __syncwarp();
    const float inv = 1.f / sum;
    float* orow = out + ((long)n * q + i) * d + (long)h * hd;
    for (int k = lane; k < hd; k += 32) {
      float acc = 0.f;
      for (int j = 0; j < t; ++j) acc = fmaf(S[j], V[j * hd + k], acc);
      orow[k] = acc * inv;
    }
    if (lane == 0) lse[(long)bh * q + i] = m + logf(sum);
    __syncwarp(); // S and Qr are rewritten by the next row
  }
}

extern "C" __global__ void __launch_bounds__(FV_ATT_THREADS)
attention_backward_f32(const float* __restrict__ dout, const float* __restrict__ qkv,
    const float* __restrict__ lse, float* __restrict__ dqkv, int b, int t, int q, int d, int heads,
    float scale) {
  FV_DYNAMIC_SHARED(float, smem);
  (void)b;
  const int hd = d / heads;
  const int bh = blockIdx.x;
  const int n = bh / heads, h = bh % heads;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const long d3 = 3L * d;
  const long off = (long)n * t * d3 + (long)h * hd;
  const float* base = qkv + off;
  float* dbase = dqkv + off;
  const int th = t * hd;

  float* Kt = smem;       // [hd][t]
  float* Vt = Kt + th;    // [hd][t]
  float* dKt = Vt + th;   // [hd][t]
  float* dVt = dKt + th;  // [hd][t]
  float* rows = dVt + th;
  float* P = rows + warp * t;                                    // [t]
  float* dS = rows + FV_ATT_WARPS * t + warp * t;                // [t]
  float* Qr = rows + 2 * FV_ATT_WARPS * t + warp * hd;           // [hd]
  float* dO = rows + 2 * FV_ATT_WARPS * t + FV_ATT_WARPS * hd + warp * hd; // [hd]

  for (int idx = tid; idx < th; idx += FV_ATT_THREADS) {
    int j = idx / hd, k = idx % hd;
    const float* row = base + j * d3;
    Kt[k * t + j] = row[d + k];
    Vt[k * t + j] = row[2 * d + k];
    dKt[idx] = 0.f;
    dVt[idx] = 0.f;
  }
  __syncthreads();

  for (int i = warp; i < q; i += FV_ATT_WARPS) {
    const float* qi = base + i * d3;
    const float* doi = dout + ((long)n * q + i) * d + (long)h * hd;
    for (int k = lane; k < hd; k += 32) {
      Qr[k] = qi[k];
      dO[k] = doi[k];
    }
    __syncwarp();
    const float l = lse[(long)bh * q + i];
    float dsum = 0.f;
    for (int j = lane; j < t; j += 32) {
      float s = 0.f, dp = 0.f;
      for (int k = 0; k < hd; ++k) {
        s = fmaf(Qr[k], Kt[k * t + j], s);
        dp = fmaf(dO[k], Vt[k * t + j], dp);
      }
      float p = expf(s * scale - l);
      P[j] = p;
      dS[j] = dp;
      dsum = fmaf(p, dp, dsum);
    }
    const float D = fv_warp_sum(dsum);
    for (int j = lane; j < t; j += 32) dS[j] = P[j] * (dS[j] - D) * scale;
    __syncwarp();
    // dQ_i += dS_i K  (lanes over columns)
    float* dqi = dbase + i * d3;
    for (int k = lane; k < hd; k += 32) {
      float acc = 0.f;
      for (int j = 0; j < t; ++j) acc = fmaf(dS[j], Kt[k * t + j], acc);
      dqi[k] += acc;
    }
    // dK_j += dS_ij q_i, dV_j += P_ij dO_i  (lanes over tokens, k-major accumulators)
    for (int idx = lane; idx < th; idx += 32) {
      int k = idx / t, j = idx % t;
      atomicAdd(&dKt[idx], dS[j] * Qr[k]);
      atomicAdd(&dVt[idx], P[j] * dO[k]);
    }
    __syncwarp(); // P, dS, Qr, dO are rewritten by the next row
  }
  __syncthreads();

  for (int idx = tid; idx < th; idx += FV_ATT_THREADS) {
    int j = idx / hd, k = idx % hd;
    float* row = dbase + j * d3;
    row[d + k] += dKt[k * t + j];
    row[2 * d + k] += dVt[k * t + j];
  }
}
