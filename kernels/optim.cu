// Fused optimizer updates (the CPU backend's optim.rs, PyTorch's update order): Adam/AdamW
// and SGD with momentum / Nesterov, one tensor per launch or many tensors in one launch
// (a table of tensors cut into fixed-size chunks, one block per chunk).
//
// Every operation is rounded on its own (no FMA contraction, IEEE sqrt and division even
// under fast-math flags), so a step matches the CPU backend bit for bit.
#include "common.cuh"

#ifdef FV_EMULATION
static inline float op_add(float a, float b) { return a + b; }
static inline float op_sub(float a, float b) { return a - b; }
static inline float op_mul(float a, float b) { return a * b; }
static inline float op_div(float a, float b) { return a / b; }
static inline float op_sqrt(float a) { return std::sqrt(a); }
#else
static __device__ __forceinline__ float op_add(float a, float b) { return __fadd_rn(a, b); }
static __device__ __forceinline__ float op_sub(float a, float b) { return __fsub_rn(a, b); }
static __device__ __forceinline__ float op_mul(float a, float b) { return __fmul_rn(a, b); }
static __device__ __forceinline__ float op_div(float a, float b) { return __fdiv_rn(a, b); }
static __device__ __forceinline__ float op_sqrt(float a) { return __fsqrt_rn(a); }
#endif

// One Adam/AdamW element update. step_size = lr / (1 - beta1^t),
// bias_correction2_sqrt = sqrt(1 - beta2^t).
static __device__ __forceinline__ void adam_update(float* __restrict__ p, const float* __restrict__ g,
                                                   float* __restrict__ m, float* __restrict__ v, long i, float lr,
                                                   float beta1, float beta2, float eps, float weight_decay,
                                                   int decoupled, float step_size, float bias_correction2_sqrt) {
  float pi = p[i], gi = g[i], mi = m[i], vi = v[i];
  if (decoupled) {
    pi = op_mul(pi, op_sub(1.f, op_mul(lr, weight_decay)));
  } else {
    gi = op_add(gi, op_mul(weight_decay, pi));
  }
  // torch's lerp_ with weight 1 - beta1
  mi = op_add(mi, op_mul(op_sub(1.f, beta1), op_sub(gi, mi)));
  vi = op_add(op_mul(vi, beta2), op_mul(op_mul(op_sub(1.f, beta2), gi), gi));
  const float denom = op_add(op_div(op_sqrt(vi), bias_correction2_sqrt), eps);
  pi = op_sub(pi, op_mul(step_size, op_div(mi, denom)));
  p[i] = pi;
  m[i] = mi;
  v[i] = vi;
}

// One SGD element update; buf is not touched (may be null) when momentum == 0.
// first: the momentum buffer is empty and starts as the gradient.
static __device__ __forceinline__ void sgd_update(float* __restrict__ p, const float* __restrict__ g,
                                                  float* __restrict__ buf, long i, float lr, float momentum,
                                                  float dampening, float weight_decay, int nesterov, int first) {
  const float pi = p[i];
  const float d = op_add(g[i], op_mul(weight_decay, pi));
  if (momentum == 0.f) {
    p[i] = op_sub(pi, op_mul(lr, d));
  } else {
    const float bi = first ? d : op_add(op_mul(buf[i], momentum), op_mul(op_sub(1.f, dampening), d));
    buf[i] = bi;
    p[i] = op_sub(pi, op_mul(lr, nesterov ? op_add(d, op_mul(momentum, bi)) : bi));
  }
}

// grid-stride, block 256: one Adam/AdamW step over one tensor of n elements.
extern "C" __global__ void adam_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                    float* __restrict__ v, long n, float lr, float beta1, float beta2, float eps,
                                    float weight_decay, int decoupled, float step_size, float bias_correction2_sqrt) {
  for (long i = fv_global_id(); i < n; i += fv_grid_stride())
    adam_update(p, g, m, v, i, lr, beta1, beta2, eps, weight_decay, decoupled, step_size, bias_correction2_sqrt);
}

// grid-stride, block 256: one SGD step over one tensor (buf may be null when momentum == 0).
extern "C" __global__ void sgd_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf, long n,
                                   float lr, float momentum, float dampening, float weight_decay, int nesterov,
                                   int first) {
  for (long i = fv_global_id(); i < n; i += fv_grid_stride())
    sgd_update(p, g, buf, i, lr, momentum, dampening, weight_decay, nesterov, first);
}

// grid = number of chunks, block 256: block k updates elements
// [chunk_start[k], min(chunk_start[k] + chunk, n)) of tensor chunk_tensor[k]. table holds
// 6 u64 per tensor: p, g, m, v (device addresses), n, weight decay (f32 bits, low 32 bits).
extern "C" __global__ void adam_multi_f32(const unsigned long long* __restrict__ table,
                                          const int* __restrict__ chunk_tensor, const long* __restrict__ chunk_start,
                                          int chunk, float lr, float beta1, float beta2, float eps, int decoupled,
                                          float step_size, float bias_correction2_sqrt) {
  const unsigned long long* t = table + 6l * chunk_tensor[blockIdx.x];
  float* p = (float*)(size_t)t[0];
  const float* g = (const float*)(size_t)t[1];
  float* m = (float*)(size_t)t[2];
  float* v = (float*)(size_t)t[3];
  const long n = (long)t[4];
  const float wd = __uint_as_float((unsigned)(t[5] & 0xffffffffull));
  const long start = chunk_start[blockIdx.x];
  const long end = start + chunk < n ? start + chunk : n;
  for (long i = start + threadIdx.x; i < end; i += blockDim.x)
    adam_update(p, g, m, v, i, lr, beta1, beta2, eps, wd, decoupled, step_size, bias_correction2_sqrt);
}

// grid = number of chunks, block 256: as adam_multi_f32, with 5 u64 per tensor: p, g, buf
// (0 when momentum == 0), n, weight decay (f32 bits, low 32 bits).
extern "C" __global__ void sgd_multi_f32(const unsigned long long* __restrict__ table,
                                         const int* __restrict__ chunk_tensor, const long* __restrict__ chunk_start,
                                         int chunk, float lr, float momentum, float dampening, int nesterov,
                                         int first) {
  const unsigned long long* t = table + 5l * chunk_tensor[blockIdx.x];
  float* p = (float*)(size_t)t[0];
  const float* g = (const float*)(size_t)t[1];
  float* buf = (float*)(size_t)t[2];
  const long n = (long)t[3];
  const float wd = __uint_as_float((unsigned)(t[4] & 0xffffffffull));
  const long start = chunk_start[blockIdx.x];
  const long end = start + chunk < n ? start + chunk : n;
  for (long i = start + threadIdx.x; i < end; i += blockDim.x)
    sgd_update(p, g, buf, i, lr, momentum, dampening, wd, nesterov, first);
}

// grid = number of chunks, block 256: every element of many tensors set to `value` in one
// launch (zeroing all parameter gradients). table holds 2 u64 per tensor: address, element
// count; block k covers elements [chunk_start[k], min(chunk_start[k] + chunk, n)) of
// tensor chunk_tensor[k].
extern "C" __global__ void fill_multi_f32(const unsigned long long* __restrict__ table,
                                          const int* __restrict__ chunk_tensor, const long* __restrict__ chunk_start,
                                          int chunk, float value) {
  const unsigned long long* t = table + 2l * chunk_tensor[blockIdx.x];
  float* x = (float*)(size_t)t[0];
  const long n = (long)t[1];
  const long start = chunk_start[blockIdx.x];
  const long end = start + chunk < n ? start + chunk : n;
  for (long i = start + threadIdx.x; i < end; i += blockDim.x) x[i] = value;
}
