// f32 <-> bf16 conversions on the device (round to nearest even, as the `half` crate on
// the host): mixed precision's bf16 copies of f32 weights and of output gradients.
#include "common.cuh"

// grid-stride over n, block 256; four elements per access (as elementwise.cu), then a tail.
template <class From, class To>
__device__ __forceinline__ void fv_cast(const From* __restrict__ x, To* __restrict__ out, long n) {
  const long n4 = n / 4;
  for (long i = fv_global_id(); i < n4; i += fv_grid_stride()) {
    const fv_vec4<From> v = fv_load4(x, i);
    fv_vec4<To> o;
#pragma unroll
    for (int k = 0; k < 4; ++k) o.v[k] = fv_as<To>(fv_f32(v.v[k]));
    fv_store4(out, i, o);
  }
  for (long i = 4 * n4 + fv_global_id(); i < n; i += fv_grid_stride()) out[i] = fv_as<To>(fv_f32(x[i]));
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, fv_bf16* __restrict__ out, long n) {
  fv_cast(x, out, n);
}

extern "C" __global__ void cast_bf16_f32(const fv_bf16* __restrict__ x, float* __restrict__ out, long n) {
  fv_cast(x, out, n);
}

// grid = number of chunks, block 256: many f32 tensors cast to bf16 in one launch (mixed
// precision's copies of the weights). table holds 3 u64 per tensor: source address,
// destination address, element count; block k covers elements [chunk_start[k],
// min(chunk_start[k] + chunk, n)) of tensor chunk_tensor[k].
extern "C" __global__ void cast_multi_f32_bf16(const unsigned long long* __restrict__ table,
                                               const int* __restrict__ chunk_tensor,
                                               const long* __restrict__ chunk_start, int chunk) {
  const unsigned long long* t = table + 3l * chunk_tensor[blockIdx.x];
  const float* x = (const float*)(size_t)t[0];
  fv_bf16* out = (fv_bf16*)(size_t)t[1];
  const long n = (long)t[2];
  const long start = chunk_start[blockIdx.x];
  const long end = start + chunk < n ? start + chunk : n;
  for (long i = start + threadIdx.x; i < end; i += blockDim.x) out[i] = fv_as<fv_bf16>(x[i]);
}
