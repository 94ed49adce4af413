// Shared by every kernel: the CUDA headers on the GPU, the host emulation (emu.h)
// when the same source is compiled as C++ for the tests, and small warp/block helpers.
//
// Rules for kernels (so the emulation runs them exactly as a GPU would):
// - plain SIMT CUDA: threadIdx/blockIdx/blockDim/gridDim, __shared__ arrays, FV_DYNAMIC_SHARED
//   for dynamic shared memory (128-byte aligned), __syncthreads, __shfl_*_sync with full
//   warps, atomicAdd; and nvcuda::wmma 16x16x16 fragments that are only filled, loaded,
//   multiplied and stored (never indexed: their layout is unspecified);
// - every launch uses a block size that is a multiple of 32;
// - entry points are `extern "C" __global__` with pointer, int, unsigned, long, unsigned long
//   long or float arguments, written out (no macros), each named: build.rs reads every
//   signature (build/signatures.rs) and every launch is checked against it.
#pragma once

#ifdef FV_EMULATION
#include "emu.h"
#define FV_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(fv_emu_dynamic_shared())
#else
#include <cuda_bf16.h>
#define FV_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) unsigned char fv_dyn_smem_[]; \
  type* name = reinterpret_cast<type*>(fv_dyn_smem_)
#endif

#define FV_FULL_MASK 0xffffffffu

// Activation storage types: f32, or bf16 under mixed precision (arithmetic is f32 either
// way: widen on load, round to nearest even on store). Kernels templated over T have
// extern "C" instantiations named _f32 / _bf16.
typedef __nv_bfloat16 fv_bf16;
__device__ __forceinline__ float fv_f32(float v) { return v; }
__device__ __forceinline__ float fv_f32(fv_bf16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T fv_as(float v);
template <>
__device__ __forceinline__ float fv_as<float>(float v) { return v; }
template <>
__device__ __forceinline__ fv_bf16 fv_as<fv_bf16>(float v) { return __float2bfloat16(v); }

// Four consecutive elements moved as one access (16 bytes of f32, 8 of bf16).
template <class T>
struct alignas(4 * sizeof(T)) fv_vec4 {
  T v[4];
};
template <class T>
__device__ __forceinline__ fv_vec4<T> fv_load4(const T* p, long quad) {
  return reinterpret_cast<const fv_vec4<T>*>(p)[quad];
}
template <class T>
__device__ __forceinline__ void fv_store4(T* p, long quad, fv_vec4<T> v) {
  reinterpret_cast<fv_vec4<T>*>(p)[quad] = v;
}

__device__ __forceinline__ float fv_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FV_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float fv_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FV_FULL_MASK, v, o));
  return v;
}

__device__ __forceinline__ double fv_warp_sum_f64(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FV_FULL_MASK, v, o);
  return v;
}

// Index of this thread in a 1-D grid, and the grid-stride step.
__device__ __forceinline__ long fv_global_id() { return (long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long fv_grid_stride() { return (long)gridDim.x * blockDim.x; }

// splitmix64's finaliser: the dropout hash (the CPU backend's `mix64`).
__device__ __forceinline__ unsigned long long fv_mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Exact-erf GELU (PyTorch's default `gelu`) and its derivative.
__device__ __forceinline__ float fv_gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float fv_gelu_grad(float x) {
  return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}
