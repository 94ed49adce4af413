// f32 <-> bf16 conversions on the device (round to nearest even, as the `half` crate on
// the host): the groundwork of mixed precision (bf16 copies of f32 master weights).
#include "common.cuh"

// grid-stride over n, block 256.
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, __nv_bfloat16* __restrict__ out, long n) {
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) out[i] = __float2bfloat16(x[i]);
}

// grid-stride over n, block 256.
extern "C" __global__ void cast_bf16_f32(const __nv_bfloat16* __restrict__ x, float* __restrict__ out, long n) {
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) out[i] = __bfloat162float(x[i]);
}
