// LayerNorm over rows of `d` f32 values (the output f32 or bf16) (the CPU backend's ops::layernorm and
// layernorm_backward). One warp per row for the forward pass and the input gradient
// (block 128 = 4 rows, grid ceil(rows / 4)); the parameter gradients are column sums,
// done deterministically in one launch (columns.cuh).
#include "columns.cuh"

// y = (x - mean) * rstd * gamma + beta; saves mean and rstd per row. y is f32, or bf16
// (rounded) under mixed precision, where it only feeds a GEMM.
template <class T>
__device__ __forceinline__ void ln_forward(const float* __restrict__ x, const float* __restrict__ gamma,
    const float* __restrict__ beta, T* __restrict__ y, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int rows, int d, float eps) {
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* xr = x + (long)row * d;
  float s = 0.f;
  for (int i = lane; i < d; i += 32) s += xr[i];
  float m = fv_warp_sum(s) / d;
  float v = 0.f;
  for (int i = lane; i < d; i += 32) { float c = xr[i] - m; v += c * c; }
  float r = 1.f / sqrtf(fv_warp_sum(v) / d + eps);
  T* yr = y + (long)row * d;
  for (int i = lane; i < d; i += 32) yr[i] = fv_as<T>((xr[i] - m) * r * gamma[i] + beta[i]);
  if (lane == 0) { mean_out[row] = m; rstd_out[row] = r; }
}
extern "C" __global__ void layernorm_forward_f32(const float* __restrict__ x, const float* __restrict__ gamma,
    const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int rows, int d, float eps) {
  ln_forward(x, gamma, beta, y, mean_out, rstd_out, rows, d, eps);
}
extern "C" __global__ void layernorm_forward_bf16(const float* __restrict__ x, const float* __restrict__ gamma,
    const float* __restrict__ beta, fv_bf16* __restrict__ y, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int rows, int d, float eps) {
  ln_forward(x, gamma, beta, y, mean_out, rstd_out, rows, d, eps);
}

// dx += rstd * (g dy - mean(g dy) - xhat * mean(g dy xhat)), xhat = (x - mean) * rstd.
// dy of type T (bf16 when y was a bf16 activation under mixed precision); the rest f32.
template <class T>
__device__ __forceinline__ void ln_backward_dx(const T* __restrict__ dy, const float* __restrict__ x,
    const float* __restrict__ gamma, const float* __restrict__ mean, const float* __restrict__ rstd,
    float* __restrict__ dx, int rows, int d) {
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  long off = (long)row * d;
  float mu = mean[row], rs = rstd[row];
  float sg = 0.f, sgx = 0.f;
  for (int i = lane; i < d; i += 32) {
    float g = gamma[i] * fv_f32(dy[off + i]);
    sg += g;
    sgx += g * (x[off + i] - mu) * rs;
  }
  sg = fv_warp_sum(sg) / d;
  sgx = fv_warp_sum(sgx) / d;
  for (int i = lane; i < d; i += 32) {
    float xhat = (x[off + i] - mu) * rs;
    dx[off + i] += rs * (gamma[i] * fv_f32(dy[off + i]) - sg - xhat * sgx);
  }
}
extern "C" __global__ void layernorm_backward_dx_f32(const float* __restrict__ dy, const float* __restrict__ x,
    const float* __restrict__ gamma, const float* __restrict__ mean, const float* __restrict__ rstd,
    float* __restrict__ dx, int rows, int d) {
  ln_backward_dx(dy, x, gamma, mean, rstd, dx, rows, d);
}
extern "C" __global__ void layernorm_backward_dx_bf16(const fv_bf16* __restrict__ dy, const float* __restrict__ x,
    const float* __restrict__ gamma, const float* __restrict__ mean, const float* __restrict__ rstd,
    float* __restrict__ dx, int rows, int d) {
  ln_backward_dx(dy, x, gamma, mean, rstd, dx, rows, d);
}

// dgamma += column sums of dy * xhat, dbeta += column sums of dy, in one launch: grid
// (ceil(d / 32), chunks of rows_per_chunk rows), block (32, FV_COLUMN_ROWS), counters as
// columns.cuh says; partial (scratch) is [2][chunks][d] (gamma's, then beta's).
template <class T>
__device__ __forceinline__ void ln_param_grad(const T* __restrict__ dy,
    const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,
    float* partial, float* dgamma, float* dbeta, unsigned* counters, int rows, int d, int rows_per_chunk) {
  __shared__ float sg[FV_COLUMN_ROWS][33];
  __shared__ float sb[FV_COLUMN_ROWS][33];
  int col = blockIdx.x * 32 + threadIdx.x;
  long start = (long)blockIdx.y * rows_per_chunk;
  long end = min((long)rows, start + rows_per_chunk);
  float ag = 0.f, ab = 0.f;
  if (col < d) {
    for (long r = start + threadIdx.y; r < end; r += FV_COLUMN_ROWS) {
      float g = fv_f32(dy[r * d + col]);
      ag += g * (x[r * d + col] - mean[r]) * rstd[r];
      ab += g;
    }
  }
  sg[threadIdx.y][threadIdx.x] = ag;
  sb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    float tg = 0.f, tb = 0.f;
    for (int k = 0; k < FV_COLUMN_ROWS; k++) { tg += sg[k][threadIdx.x]; tb += sb[k][threadIdx.x]; }
    long chunks = gridDim.y;
    partial[(long)blockIdx.y * d + col] = tg;
    partial[(chunks + blockIdx.y) * d + col] = tb;
  }
  float* out[2] = {dgamma, dbeta};
  fv_last_block_adds(partial, out, 2, counters, d);
}
extern "C" __global__ void layernorm_param_grad_f32(const float* __restrict__ dy,
    const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,
    float* partial, float* dgamma, float* dbeta, unsigned* counters, int rows, int d, int rows_per_chunk) {
  ln_param_grad(dy, x, mean, rstd, partial, dgamma, dbeta, counters, rows, d, rows_per_chunk);
}
extern "C" __global__ void layernorm_param_grad_bf16(const fv_bf16* __restrict__ dy,
    const float* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ rstd,
    float* partial, float* dgamma, float* dbeta, unsigned* counters, int rows, int d, int rows_per_chunk) {
  ln_param_grad(dy, x, mean, rstd, partial, dgamma, dbeta, counters, rows, d, rows_per_chunk);
}
