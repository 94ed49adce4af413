// LayerNorm forward over rows of `dim` f32 values: one warp per row, sums by warp
// shuffles; writes y, and the mean and 1/std of each row for the backward pass.
// (First kernel of the CUDA backend, issue 6: compiled and resource-checked by CI; its
// conformance test against the CPU backend comes with the host emulation.)
extern "C" __global__ void layernorm_forward_f32(const float* __restrict__ x, const float* __restrict__ gamma,
    const float* __restrict__ beta, float* __restrict__ y, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int rows, int dim, float eps) {
  int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const float* xr = x + (long)row * dim;
  float s = 0.f;
  for (int i = lane; i < dim; i += 32) s += xr[i];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
  float m = s / dim;
  float v = 0.f;
  for (int i = lane; i < dim; i += 32) { float d = xr[i] - m; v += d * d; }
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  float r = rsqrtf(v / dim + eps);
  float* yr = y + (long)row * dim;
  for (int i = lane; i < dim; i += 32) yr[i] = (xr[i] - m) * r * gamma[i] + beta[i];
  if (lane == 0) { mean_out[row] = m; rstd_out[row] = r; }
}
