// Softmax cross-entropy with label smoothing (PyTorch's F.cross_entropy(..., label_smoothing
// = eps)), fused with its gradient: the CPU backend's ops.rs cross_entropy, one warp per row,
// with the log-sum-exp, mean logit and softmax in f64 as there.
#include "common.cuh"

// grid ceil(b/4), block 128 (one warp per row, any multiple of 32 works):
// row_loss[r] = (1-eps)*(lse - z[y]) + eps*(lse - mean z);
// dlogits[r,k] = (softmax_k - (eps/c + (k==y ? 1-eps : 0))) / b (overwrite).
// A label outside [0, c) gives a NaN row loss (its gradient row has no 1-eps term).
extern "C" __global__ void cross_entropy_f32(const float* __restrict__ logits, const int* __restrict__ labels,
                                             float* __restrict__ dlogits, float* __restrict__ row_loss, int b, int c,
                                             float eps) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row < b) { // whole warps take the same branch, and there is no __syncthreads
    const float* z = logits + (long)row * c;
    float* dz = dlogits + (long)row * c;
    const int y = labels[row];

    float m = -INFINITY;
    for (int k = lane; k < c; k += 32) m = fmaxf(m, z[k]);
    m = fv_warp_max(m);

    double sum_exp = 0.0, sum_z = 0.0;
    for (int k = lane; k < c; k += 32) {
      float v = z[k];
      sum_exp += exp((double)(v - m));
      sum_z += (double)v;
    }
    sum_exp = fv_warp_sum_f64(sum_exp);
    sum_z = fv_warp_sum_f64(sum_z);
    const double lse = (double)m + log(sum_exp);
    const double mean_z = sum_z / (double)c;

    const bool valid = y >= 0 && y < c;
    if (lane == 0) {
      double zy = valid ? (double)z[y] : (double)NAN;
      double e = (double)eps;
      row_loss[row] = (float)((1.0 - e) * (lse - zy) + e * (lse - mean_z));
    }

    const float smooth = eps / (float)c;
    const float hit = 1.f - eps;
    const float fb = (float)b;
    for (int k = lane; k < c; k += 32) {
      float p = (float)exp((double)z[k] - lse);
      float q = smooth + (k == y ? hit : 0.f);
      dz[k] = (p - q) / fb;
    }
  }
}

// Softmax cross-entropy against soft targets (F.cross_entropy(logits, targets) with
// [b, c] probabilities: Mixup/CutMix), fused with its gradient: the CPU backend's ops.rs
// cross_entropy_soft. grid ceil(b/4), block 128 (one warp per row):
// row_loss[r] = sum_k t_k * (lse - z_k); dlogits[r,k] = (softmax_k * sum t - t_k) / b.
extern "C" __global__ void cross_entropy_soft_f32(const float* __restrict__ logits,
                                                  const float* __restrict__ targets, float* __restrict__ dlogits,
                                                  float* __restrict__ row_loss, int b, int c) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row < b) { // whole warps take the same branch, and there is no __syncthreads
    const float* z = logits + (long)row * c;
    const float* t = targets + (long)row * c;
    float* dz = dlogits + (long)row * c;

    float m = -INFINITY;
    for (int k = lane; k < c; k += 32) m = fmaxf(m, z[k]);
    m = fv_warp_max(m);

    double sum_exp = 0.0;
    for (int k = lane; k < c; k += 32) sum_exp += exp((double)(z[k] - m));
    sum_exp = fv_warp_sum_f64(sum_exp);
    const double lse = (double)m + log(sum_exp);

    double loss = 0.0, mass = 0.0;
    for (int k = lane; k < c; k += 32) {
      loss += (double)t[k] * (lse - (double)z[k]);
      mass += (double)t[k];
    }
    loss = fv_warp_sum_f64(loss);
    mass = fv_warp_sum_f64(mass);
    if (lane == 0) row_loss[row] = (float)loss;

    const float fb = (float)b;
    for (int k = lane; k < c; k += 32) {
      float p = (float)(exp((double)z[k] - lse) * mass);
      dz[k] = (p - t[k]) / fb;
    }
  }
}

// grid ceil(b/4), block 128 (one warp per row): index of each row's largest logit (the
// first on ties, as the CPU's argmax_rows), so only b integers leave the device.
extern "C" __global__ void argmax_rows_f32(const float* __restrict__ logits, int* __restrict__ out, int b, int c) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row < b) {
    const float* z = logits + (long)row * c;
    // As the CPU's fold from element 0: NaNs never win (a NaN first element does).
    float best = -INFINITY;
    int at = c; // none yet: c sorts after every index
    for (int k = lane; k < c; k += 32) {
      if (z[k] > best) { best = z[k]; at = k; }
    }
    for (int o = 16; o > 0; o >>= 1) {
      float ob = __shfl_xor_sync(FV_FULL_MASK, best, o);
      int oa = __shfl_xor_sync(FV_FULL_MASK, at, o);
      if (ob > best || (ob == best && oa < at)) { best = ob; at = oa; }
    }
    if (lane == 0) out[row] = (at < c && !(z[0] != z[0])) ? at : 0;
  }
}
