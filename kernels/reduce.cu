// Deterministic reductions (no float atomics on global memory): column sums of a row-major
// matrix in two passes (per-chunk partials, then an in-order sum of the partials), and
// the per-block f64 sums of squares for global-norm clipping.
#include "common.cuh"

// grid (ceil(cols/32), ceil(rows/rows_per_chunk)), block (32, 8) (blockDim.y <= 32):
// partial[by*cols + j] = sum of x[r*ld + j] over rows r of chunk by (overwrite). The
// threads of one column take interleaved rows, then thread y = 0 adds their sums in y order.
// x of type T (f32, or a bf16 activation's gradient under mixed precision).
template <class T>
__device__ __forceinline__ void fv_column_sums(const T* __restrict__ x, float* __restrict__ partial, int rows,
                                               int cols, long ld, int rows_per_chunk) {
  __shared__ float sums[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = blockIdx.x * 32 + tx;
  const long r0 = (long)blockIdx.y * rows_per_chunk;
  long r1 = r0 + rows_per_chunk;
  if (r1 > rows) r1 = rows;
  float acc = 0.f;
  if (j < cols) {
    for (long r = r0 + ty; r < r1; r += blockDim.y) acc += fv_f32(x[r * ld + j]);
  }
  sums[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < cols) {
    float s = sums[0][tx];
    for (int k = 1; k < (int)blockDim.y; ++k) s += sums[k][tx];
    partial[(long)blockIdx.y * cols + j] = s;
  }
}
extern "C" __global__ void column_sums_f32(const float* __restrict__ x, float* __restrict__ partial, int rows,
                                           int cols, long ld, int rows_per_chunk) {
  fv_column_sums(x, partial, rows, cols, ld, rows_per_chunk);
}
extern "C" __global__ void column_sums_bf16(const fv_bf16* __restrict__ x, float* __restrict__ partial, int rows,
                                            int cols, long ld, int rows_per_chunk) {
  fv_column_sums(x, partial, rows, cols, ld, rows_per_chunk);
}

// The partials of column j summed in chunk order: partial[0*cols+j] + partial[1*cols+j] + ...
__device__ __forceinline__ float fv_sum_partials(const float* __restrict__ partial, int chunks, int cols, long j) {
  float s = 0.f;
  for (int c = 0; c < chunks; ++c) s += partial[(long)c * cols + j];
  return s;
}

// grid-stride over j < cols, block 256: out[j] += the partials of column j (chunk order).
extern "C" __global__ void add_column_partials_f32(const float* __restrict__ partial, float* __restrict__ out,
                                                   int chunks, int cols) {
  for (long j = fv_global_id(); j < cols; j += fv_grid_stride()) out[j] += fv_sum_partials(partial, chunks, cols, j);
}

// grid-stride over j < 2 cols, block 256: two column sums' partials stacked ([2][chunks][cols],
// as layernorm_param_grad_partial writes dgamma's and dbeta's) added to out_a and out_b in one
// launch.
extern "C" __global__ void add_column_partials_pair_f32(const float* __restrict__ partial,
                                                        float* __restrict__ out_a, float* __restrict__ out_b,
                                                        int chunks, int cols) {
  for (long j = fv_global_id(); j < 2l * cols; j += fv_grid_stride()) {
    const bool b = j >= cols;
    const long c = b ? j - cols : j;
    const float s = fv_sum_partials(partial + (b ? (long)chunks * cols : 0l), chunks, cols, c);
    (b ? out_b : out_a)[c] += s;
  }
}

// The f64 sum of `acc` over the block, written to *out by thread 0 (every thread calls it).
__device__ __forceinline__ void fv_block_sum_f64(double acc, double* out) {
  __shared__ double warp_sums[32];
  acc = fv_warp_sum_f64(acc);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    double s = lane < warps ? warp_sums[lane] : 0.0;
    s = fv_warp_sum_f64(s);
    if (lane == 0) *out = s;
  }
}

// grid g (<= 1024), block 256 (any multiple of 32 up to 1024): partial[blockIdx.x] = sum of
// x[i]^2 in f64 over the block's grid-stride elements (the host adds the g partials).
extern "C" __global__ void sum_squares_f32(const float* __restrict__ x, long n, double* __restrict__ partial) {
  double acc = 0.0;
  for (long i = fv_global_id(); i < n; i += fv_grid_stride()) {
    double v = (double)x[i];
    acc += v * v;
  }
  fv_block_sum_f64(acc, partial + blockIdx.x);
}

// grid = number of chunks, block 256: the sum of squares of many tensors in one launch
// (global-norm clipping). table holds 2 u64 per tensor: address, element count; block k
// covers elements [chunk_start[k], min(chunk_start[k] + chunk, n)) of tensor
// chunk_tensor[k] and writes partial[k] (the host adds the partials).
extern "C" __global__ void sum_squares_multi_f32(const unsigned long long* __restrict__ table,
    const int* __restrict__ chunk_tensor, const long* __restrict__ chunk_start, int chunk,
    double* __restrict__ partial) {
  const unsigned long long* t = table + 2l * chunk_tensor[blockIdx.x];
  const float* x = (const float*)(size_t)t[0];
  const long n = (long)t[1];
  const long start = chunk_start[blockIdx.x];
  const long end = start + chunk < n ? start + chunk : n;
  double acc = 0.0;
  for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
    double v = (double)x[i];
    acc += v * v;
  }
  fv_block_sum_f64(acc, partial + blockIdx.x);
}
