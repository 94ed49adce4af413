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
#include <type_traits>

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
template <class T>
inline T __ldcg(const T* p) { return *p; }
// Orders this thread's memory accesses against other blocks' (the blocks' OS threads).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
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

// Tensor-core matrix products (nvcuda::wmma, 16x16x16 tiles: bf16 or f32 operands, f32
// accumulators). On a GPU a fragment is spread over a warp's 32 lanes in a layout CUDA
// leaves unspecified; here lane 0 of the warp holds the whole tile and does the warp's
// loads, products and stores (the other lanes' fragments are never used: kernels may
// only load, multiply, fill and store fragments, never index them, so they cannot depend
// on the layout). A missing __syncthreads or __syncwarp around the memory they read or
// write still shows, as for any other access.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 tiles are emulated");
  float v[16 * 16]; // row-major: matrix_a M x K, matrix_b K x N, accumulator M x N
};

template <class Use, class T, class L, class V>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, V x) {
  for (float& e : f.v) e = (float)x;
}

// A GPU requires 32-byte aligned fragment pointers and a leading dimension of a multiple of
// 16 bytes; the emulation stops the kernel with an error (scope 2: a fault) otherwise.
template <class T>
inline void fv_wmma_check(const T* p, unsigned ldm) {
  if ((std::uintptr_t)p % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) fv_emu_barrier(2);
}
// Whether this lane does its warp's fragment work (lane 0; the warp is converged).
inline bool fv_wmma_leader() { return fv_emu_cur->linear % 32 == 0; }
inline float fv_wmma_f32(float v) { return v; }
inline float fv_wmma_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
// Element (r, c) of a row-major (r * ldm + c) or column-major (c * ldm + r) matrix.
template <class T>
inline float fv_wmma_at(const T* p, unsigned ldm, int r, int c, bool col) {
  return fv_wmma_f32(col ? p[(long)c * ldm + r] : p[(long)r * ldm + c]);
}
template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  fv_wmma_check(p, ldm);
  if (!fv_wmma_leader()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = fv_wmma_at(p, ldm, r, c, std::is_same_v<L, col_major>);
}
template <class T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t l) {
  fv_wmma_check(p, ldm);
  if (!fv_wmma_leader()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r * 16 + c] = fv_wmma_at(p, ldm, r, c, l == mem_col_major);
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t l) {
  fv_wmma_check(p, ldm);
  if (!fv_wmma_leader()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) *(l == mem_col_major ? p + (long)c * ldm + r : p + (long)r * ldm + c) = f.v[r * 16 + c];
}
// d = a b + c, products accumulated in f32 in k order
template <class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c) {
  if (!fv_wmma_leader()) return;
  float out[16 * 16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m * 16 + n];
      for (int k = 0; k < 16; ++k) s = fmaf(a.v[m * 16 + k], b.v[k * 16 + n], s);
      out[m * 16 + n] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda
