// Elementwise f32 kernels of the ViT op set (the CPU backend's ops.rs / simd.rs): fills,
// adds, scaling, bias+GELU and its backward, dropout, cls-token selection, patchify and
// the token embedding. All are 1-D grid-stride loops (block 256, any grid), so the
// launcher may pick any grid size; indices are 64-bit.
#include "common.cuh"

// A product that is never fused with a following add (nvcc contracts a*b+c into an FMA by
// default; the CPU backend never does), so results round exactly as on the CPU.
#ifdef FV_EMULATION
static inline float ew_mul_rn(float a, float b) { return a * b; }
#else
static __device__ __forceinline__ float ew_mul_rn(float a, float b) { return __fmul_rn(a, b); }
#endif

// The hot kernels move four elements per access (fv_load4/fv_store4: 16 bytes of f32; every
// device buffer is a whole allocation, 256-byte aligned), so each thread keeps several
// loads in flight — one 4-byte load per thread left an H200 at 69% of its copy bandwidth —
// and do their index arithmetic once per four elements, in 32 bits when n allows (64-bit
// division is a long software sequence on the GPU). Element n - n % 4 on is a scalar tail.
// Kernels templated over T (activation storage: f32, or bf16 under mixed precision) compute
// in f32 and round what they store.

// q = i / d, r = i % d (i, d >= 0), in 32 bits when `narrow` (i < 2^32).
__device__ __forceinline__ void ew_divmod(long i, long d, bool narrow, long& q, long& r) {
  if (narrow) {
    const unsigned a = (unsigned)i, b = (unsigned)d, qq = a / b;
    q = qq;
    r = a - qq * b;
  } else {
    q = i / d;
    r = i - q * d;
  }
}

__device__ __forceinline__ bool ew_narrow(long n) { return n <= 0xffffffffL; }

// grid-stride, block 256: x[i] = v
extern "C" __global__ void fill_f32(float* __restrict__ x, float v, long n) {
  const long n4 = n / 4;
  for (long i = fv_global_id(); i < n4; i += fv_grid_stride()) fv_store4(x, i, fv_vec4<float>{{v, v, v, v}});
  for (long i = 4 * n4 + fv_global_id(); i < n; i += fv_grid_stride()) x[i] = v;
}

// grid-stride, block 256: out[i] = bias[i % d] (every row of [n/d, d] set to bias)
template <class T>
__device__ __forceinline__ void ew_fill_rows(T* __restrict__ out, const float* __restrict__ bias, long n, int d) {
  const bool narrow = ew_narrow(n);
  long q, c;
  if (d % 4 == 0) {  // a quad never straddles rows
    for (long i = fv_global_id(); i < n / 4; i += fv_grid_stride()) {
      ew_divmod(4 * i, d, narrow, q, c);
      const fv_vec4<float> b = fv_load4(bias + c, 0);
      fv_vec4<T> o;
#pragma unroll
      for (int k = 0; k < 4; ++k) o.v[k] = fv_as<T>(b.v[k]);
      fv_store4(out, i, o);
    }
    return;
  }
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    ew_divmod(i, d, narrow, q, c);
    out[i] = fv_as<T>(bias[c]);
  }
}
extern "C" __global__ void fill_rows_f32(float* __restrict__ out, const float* __restrict__ bias, long n, int d) {
  ew_fill_rows(out, bias, n, d);
}
extern "C" __global__ void fill_rows_bf16(fv_bf16* __restrict__ out, const float* __restrict__ bias, long n, int d) {
  ew_fill_rows(out, bias, n, d);
}

// grid-stride, block 256: out = a + b (out may be a: add_assign); b f32, or bf16 (a
// mixed-precision branch added to the f32 residual stream without dropout)
template <class T>
__device__ __forceinline__ void ew_add(const float* a, const T* __restrict__ b, float* out, long n) {
  const long n4 = n / 4;
  for (long i = fv_global_id(); i < n4; i += fv_grid_stride()) {
    fv_vec4<float> x = fv_load4(a, i);
    const fv_vec4<T> y = fv_load4(b, i);
#pragma unroll
    for (int k = 0; k < 4; ++k) x.v[k] += fv_f32(y.v[k]);
    fv_store4(out, i, x);
  }
  for (long i = 4 * n4 + fv_global_id(); i < n; i += fv_grid_stride()) out[i] = a[i] + fv_f32(b[i]);
}
extern "C" __global__ void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ out,
                                   long n) {
  ew_add(a, b, out, n);
}
extern "C" __global__ void add_f32_bf16(const float* __restrict__ a, const fv_bf16* __restrict__ b,
                                        float* __restrict__ out, long n) {
  ew_add(a, b, out, n);
}

// grid-stride, block 256: dst += src
extern "C" __global__ void add_assign_f32(float* dst, const float* __restrict__ src, long n) { ew_add(dst, src, dst, n); }

// grid-stride, block 256: x *= s
extern "C" __global__ void scale_f32(float* __restrict__ x, float s, long n) {
  const long n4 = n / 4;
  for (long i = fv_global_id(); i < n4; i += fv_grid_stride()) {
    fv_vec4<float> v = fv_load4(x, i);
#pragma unroll
    for (int k = 0; k < 4; ++k) v.v[k] *= s;
    fv_store4(x, i, v);
  }
  for (long i = 4 * n4 + fv_global_id(); i < n; i += fv_grid_stride()) x[i] *= s;
}

// grid-stride, block 256: p = pre[i] + bias[i % d] (in f32); pre[i] = p; out[i] = gelu(p)
template <class T>
__device__ __forceinline__ void ew_bias_gelu(T* __restrict__ pre, const float* __restrict__ bias,
                                             T* __restrict__ out, long n, int d) {
  const bool narrow = ew_narrow(n);
  long q, c;
  if (d % 4 == 0) {  // a quad never straddles rows
    for (long i = fv_global_id(); i < n / 4; i += fv_grid_stride()) {
      ew_divmod(4 * i, d, narrow, q, c);
      fv_vec4<T> p = fv_load4(pre, i), o;
      const fv_vec4<float> b = fv_load4(bias + c, 0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float v = fv_f32(p.v[k]) + b.v[k];
        p.v[k] = fv_as<T>(v);
        o.v[k] = fv_as<T>(fv_gelu(v));
      }
      fv_store4(pre, i, p);
      fv_store4(out, i, o);
    }
    return;
  }
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    ew_divmod(i, d, narrow, q, c);
    const float v = fv_f32(pre[i]) + bias[c];
    pre[i] = fv_as<T>(v);
    out[i] = fv_as<T>(fv_gelu(v));
  }
}
extern "C" __global__ void bias_gelu_f32(float* __restrict__ pre, const float* __restrict__ bias,
                                         float* __restrict__ out, long n, int d) {
  ew_bias_gelu(pre, bias, out, n, d);
}
extern "C" __global__ void bias_gelu_bf16(fv_bf16* __restrict__ pre, const float* __restrict__ bias,
                                          fv_bf16* __restrict__ out, long n, int d) {
  ew_bias_gelu(pre, bias, out, n, d);
}

// grid-stride, block 256: dpre = dy * gelu'(pre) (overwrites dpre); all three of type T
// (bf16 under mixed precision: the gradient of a bf16 activation is stored in bf16 too).
template <class T>
__device__ __forceinline__ void ew_gelu_backward(const T* __restrict__ dy, const T* __restrict__ pre,
                                                 T* __restrict__ dpre, long n) {
  const long n4 = n / 4;
  for (long i = fv_global_id(); i < n4; i += fv_grid_stride()) {
    const fv_vec4<T> g = fv_load4(dy, i), p = fv_load4(pre, i);
    fv_vec4<T> o;
#pragma unroll
    for (int k = 0; k < 4; ++k) o.v[k] = fv_as<T>(fv_f32(g.v[k]) * fv_gelu_grad(fv_f32(p.v[k])));
    fv_store4(dpre, i, o);
  }
  for (long i = 4 * n4 + fv_global_id(); i < n; i += fv_grid_stride())
    dpre[i] = fv_as<T>(fv_f32(dy[i]) * fv_gelu_grad(fv_f32(pre[i])));
}
extern "C" __global__ void gelu_backward_f32(const float* __restrict__ dy, const float* __restrict__ pre,
                                             float* __restrict__ dpre, long n) {
  ew_gelu_backward(dy, pre, dpre, n);
}
extern "C" __global__ void gelu_backward_bf16(const fv_bf16* __restrict__ dy, const fv_bf16* __restrict__ pre,
                                              fv_bf16* __restrict__ dpre, long n) {
  ew_gelu_backward(dy, pre, dpre, n);
}

// Dropout's mask for 16-bit lane `lane` of hash h, applied to x (x * 0 as on the CPU:
// keeps NaN/inf visible and the sign of zero); mode 0: out = m; 1: out += m; 2: residual + m.
__device__ __forceinline__ float ew_dropout_one(float x, unsigned long long h, int lane, unsigned threshold,
                                                float scale, int mode, float out, float residual) {
  const unsigned lane16 = (unsigned)((h >> (16 * lane)) & 0xffffull);
  const float m = ew_mul_rn(x, lane16 >= threshold ? scale : 0.f);
  return mode == 0 ? m : mode == 1 ? out + m : residual + m;
}

// grid-stride, block 256: inverted dropout (the CPU's dropout_sample). Element i is
// element e = i % per of sample s = i / per; it is kept iff 16-bit lane e % 4 of
// mix64(mix64(key ^ samples[s]) ^ (e / 4)) is >= threshold (key: the dropout site's,
// so one upload of the batch's sample indices serves every site); m = x * (kept ? scale : 0).
// mode 0: out = m; mode 1: out += m; mode 2: out = residual + m (residual null otherwise).
// whole != 0 (stochastic depth): every element takes element 0's bit (lane 0 of
// mix64(mix64(key ^ samples[s]))), so a sample is kept or dropped whole. When per % 4 == 0
// a quad is one hash's four lanes. x of type TX and out of type TO (each
// f32 or bf16: under mixed precision a bf16 branch is added to the f32 residual stream,
// and its f32 gradient is written to the branch in bf16), residual f32.
template <class TX, class TO>
__device__ __forceinline__ void ew_dropout(const TX* __restrict__ x, const float* __restrict__ residual,
                                           TO* __restrict__ out, const unsigned long long* __restrict__ samples,
                                           unsigned long long key, long per, long n, unsigned threshold, float scale,
                                           int mode, int whole) {
  const bool narrow = ew_narrow(n);
  long s, e;
  if (per % 4 == 0) {
    for (long i = fv_global_id(); i < n / 4; i += fv_grid_stride()) {
      ew_divmod(4 * i, per, narrow, s, e);
      const unsigned long long e4 = whole ? 0ull : (unsigned long long)(e >> 2);
      const unsigned long long h = fv_mix64(fv_mix64(key ^ samples[s]) ^ e4);
      const fv_vec4<TX> xv = fv_load4(x, i);
      fv_vec4<TO> o = mode == 1 ? fv_load4(out, i) : fv_vec4<TO>{};
      const fv_vec4<float> r = mode == 2 ? fv_load4(residual, i) : fv_vec4<float>{};
#pragma unroll
      for (int k = 0; k < 4; ++k)
        o.v[k] = fv_as<TO>(
            ew_dropout_one(fv_f32(xv.v[k]), h, whole ? 0 : k, threshold, scale, mode, fv_f32(o.v[k]), r.v[k]));
      fv_store4(out, i, o);
    }
    return;
  }
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    ew_divmod(i, per, narrow, s, e);
    const unsigned long long e4 = whole ? 0ull : (unsigned long long)(e >> 2);
    const unsigned long long h = fv_mix64(fv_mix64(key ^ samples[s]) ^ e4);
    out[i] = fv_as<TO>(ew_dropout_one(fv_f32(x[i]), h, whole ? 0 : (int)(e & 3), threshold, scale, mode,
                                     mode == 1 ? fv_f32(out[i]) : 0.f, mode == 2 ? residual[i] : 0.f));
  }
}
extern "C" __global__ void dropout_f32(const float* __restrict__ x, const float* __restrict__ residual,
                                       float* __restrict__ out, const unsigned long long* __restrict__ samples,
                                       unsigned long long key, long per, long n, unsigned threshold, float scale,
                                       int mode, int whole) {
  ew_dropout(x, residual, out, samples, key, per, n, threshold, scale, mode, whole);
}
extern "C" __global__ void dropout_bf16(const fv_bf16* __restrict__ x, const float* __restrict__ residual,
                                        fv_bf16* __restrict__ out, const unsigned long long* __restrict__ samples,
                                        unsigned long long key, long per, long n, unsigned threshold, float scale,
                                        int mode, int whole) {
  ew_dropout(x, residual, out, samples, key, per, n, threshold, scale, mode, whole);
}
extern "C" __global__ void dropout_bf16_f32(const fv_bf16* __restrict__ x, const float* __restrict__ residual,
                                            float* __restrict__ out, const unsigned long long* __restrict__ samples,
                                            unsigned long long key, long per, long n, unsigned threshold,
                                            float scale, int mode, int whole) {
  ew_dropout(x, residual, out, samples, key, per, n, threshold, scale, mode, whole);
}
extern "C" __global__ void dropout_f32_bf16(const float* __restrict__ x, const float* __restrict__ residual,
                                            fv_bf16* __restrict__ out, const unsigned long long* __restrict__ samples,
                                            unsigned long long key, long per, long n, unsigned threshold,
                                            float scale, int mode, int whole) {
  ew_dropout(x, residual, out, samples, key, per, n, threshold, scale, mode, whole);
}

// grid-stride over n = rows * d, block 256: out[r, :] = x[r * stride_rows, :]
extern "C" __global__ void select_rows_f32(const float* __restrict__ x, float* __restrict__ out, long n, int d,
                                           int stride_rows) {
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    long r = i / d;
    long k = i - r * d;
    out[i] = x[r * stride_rows * d + k];
  }
}

// grid-stride over n = rows * d, block 256: dx[r * stride_rows, :] += dout[r, :]
extern "C" __global__ void select_rows_backward_f32(const float* __restrict__ dout, float* __restrict__ dx, long n,
                                                    int d, int stride_rows) {
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    long r = i / d;
    long k = i - r * d;
    dx[r * stride_rows * d + k] += dout[i];
  }
}

// grid-stride over the b*(h/p)*(w/p)*c*p*p outputs (= b*c*h*w), block 256: images
// [b, c, h, w] to patches [b, (h/p)*(w/p), c*p*p], patch grid row-major, each patch
// flattened in (channel, dy, dx) order.
template <class T>
__device__ __forceinline__ void ew_patchify(const T* __restrict__ img, T* __restrict__ out, int b, int c, int h,
                                            int w, int p) {
  const int gh = h / p, gw = w / p;
  const long pp = (long)p * p;
  const long plen = (long)c * pp;
  const long per_img = (long)gh * gw * plen;
  const long n = (long)b * per_img;
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    long img_i = i / per_img;
    long rem = i - img_i * per_img;
    long pi = rem / plen;
    long q = rem - pi * plen;
    long ch = q / pp;
    long q2 = q - ch * pp;
    long dy = q2 / p;
    long dx = q2 - dy * p;
    long py = pi / gw;
    long px = pi - py * gw;
    out[i] = img[((img_i * c + ch) * h + py * p + dy) * w + px * p + dx];
  }
}
extern "C" __global__ void patchify_f32(const float* __restrict__ img, float* __restrict__ out, int b, int c, int h,
                                        int w, int p) {
  ew_patchify(img, out, b, c, h, w, p);
}
// bf16 images (mixed precision) to bf16 patches: a copy, no rounding
extern "C" __global__ void patchify_bf16(const fv_bf16* __restrict__ img, fv_bf16* __restrict__ out, int b, int c,
                                         int h, int w, int p) {
  ew_patchify(img, out, b, c, h, w, p);
}

// grid-stride over b*t*d, block 256: out[n,0,:] = cls + pos[0,:];
// out[n,1+l,:] = patches[n,l,:] + pos[1+l,:] (patches is [b, t-1, d]); overwrites.
extern "C" __global__ void embed_f32(const float* __restrict__ patches, const float* __restrict__ cls,
                                     const float* __restrict__ pos, float* __restrict__ out, int b, int t, int d) {
  const long td = (long)t * d;
  const long n = (long)b * td;
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    long img_i = i / td;
    long rem = i - img_i * td; // = tok * d + k
    float s = rem < d ? cls[rem] : patches[img_i * (td - d) + rem - d];
    out[i] = s + pos[rem];
  }
}

// grid-stride over b*(t-1)*d, block 256: dpatches[n,l,:] += dout[n,1+l,:]
extern "C" __global__ void embed_backward_patches_f32(const float* __restrict__ dout, float* __restrict__ dpatches,
                                                      int b, int t, int d) {
  const long per = (long)(t - 1) * d;
  const long n = (long)b * per;
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    long img_i = i / per;
    dpatches[i] += dout[i + (img_i + 1) * (long)d];
  }
}
