// Host emulation of the CUDA subset kernels/*.cu use, so the same sources compile as C++
// (g++ -std=c++20 -DFV_EMULATION) and run on the CPU in the tests.
//
// The runtime is src/backend/cuda/emu.rs: it runs each block's threads as coroutines
// (one stack each) on one OS thread, blocks in parallel across OS threads. __syncthreads
// and warp shuffles are barriers the runtime resolves; a thread that exits counts as
// arrived; a barrier that can never complete is reported as a kernel error. Threads run
// in a different order after every barrier, which exposes a missing __syncthreads.
#pragma once
#include <atomic>
#include <cmath>
#include <math.h> // expf, erff, ... in the global namespace, as in CUDA
#include <cstdint>
#include <cstring>

struct dim3 {
  unsigned x, y, z;
};

// One emulated thread; the runtime points fv_emu_cur at the running one.
struct FvEmuThread {
  dim3 thread, block, block_dim, grid_dim;
  unsigned linear;                // linear thread index in the block
  unsigned long long* warp_slots; // 2 x 32 exchange slots per warp of the block
  unsigned* shuffles;             // this thread's shuffle count (picks the slot half)
  unsigned char* dynamic_shared;
};

extern thread_local const FvEmuThread* fv_emu_cur;
extern "C" void fv_emu_barrier(int scope); // 0: block, 1: warp

#define threadIdx (fv_emu_cur->thread)
#define blockIdx (fv_emu_cur->block)
#define blockDim (fv_emu_cur->block_dim)
#define gridDim (fv_emu_cur->grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Blocks run one at a time per OS thread, so a thread-local static is the block's.
#define __shared__ static thread_local

inline unsigned char* fv_emu_dynamic_shared() { return fv_emu_cur->dynamic_shared; }
inline void __syncthreads() { fv_emu_barrier(0); }
inline void __syncwarp(unsigned = 0xffffffffu) { fv_emu_barrier(1); }

template <class T>
inline T fv_emu_exchange(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  // Consecutive shuffles use alternate halves of the warp's slots, so one barrier
  // per shuffle suffices: a lane can only write a half again after the next
  // barrier, which every lane reaches after reading it.
  unsigned lane = fv_emu_cur->linear % 32;
  unsigned half = (*fv_emu_cur->shuffles)++ & 1;
  unsigned long long* slots = fv_emu_cur->warp_slots + (fv_emu_cur->linear / 32) * 64 + half * 32;
  unsigned long long mine = 0;
  std::memcpy(&mine, &v, sizeof(T));
  slots[lane] = mine;
  fv_emu_barrier(1);
  unsigned long long got = slots[src_lane < 32 ? src_lane : lane];
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
  return fv_emu_exchange(v, (fv_emu_cur->linear % 32) ^ (unsigned)mask);
}
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
  return fv_emu_exchange(v, (unsigned)src % 32);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
  return fv_emu_exchange(v, fv_emu_cur->linear % 32 + delta); // out of the warp: own value
}

// Blocks of one launch run concurrently on different OS threads: real atomics.
template <class T>
inline T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <class T>
inline T __ldg(const T* p) { return *p; }

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

// bf16 as on the GPU: the top half of an f32, rounded to nearest even.
struct __nv_bfloat16 {
  unsigned short bits;
};
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.bits << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)((u >> 16) | 0x40)}; // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(unsigned short)(u >> 16)};
}
