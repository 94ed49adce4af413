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
