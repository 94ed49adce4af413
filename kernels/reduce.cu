// Deterministic reductions (no float atomics on global memory): column sums of a row-major
// matrix in one launch (per-chunk partials; the block that finishes a group of columns last
// adds that group's partials in a fixed order), and the per-block f64 sums of squares for
// global-norm clipping.
#include "columns.cuh"

// grid (ceil(cols/32), ceil(rows/rows_per_chunk)), block (32, FV_COLUMN_ROWS), counters
// zero and at least gridDim.x of them: out[j] += sum of x[r*ld + j] over every row r. Each
// block writes its chunk's sum to partial[blockIdx.y*cols + j] (the threads of a column take
// interleaved rows, then the rows are added in order); the last block of a column group
// adds them up (fv_last_block_adds). x of type T (f32, or a bf16 activation's gradient
// under mixed precision).
template <class T>
__device__ __forceinline__ void fv_column_sums(const T* __restrict__ x, float* partial, float* out,
                                               unsigned* counters, int rows, int cols, long ld,
                                               int rows_per_chunk) {
  __shared__ float sums[FV_COLUMN_ROWS][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = blockIdx.x * 32 + tx;
  const long r0 = (long)blockIdx.y * rows_per_chunk;
  long r1 = r0 + rows_per_chunk;
  if (r1 > rows) r1 = rows;
  float acc = 0.f;
  if (j < cols) {
    for (long r = r0 + ty; r < r1; r += FV_COLUMN_ROWS) acc += fv_f32(x[r * ld + j]);
  }
  sums[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && j < cols) {
    float s = sums[0][tx];
    for (int k = 1; k < FV_COLUMN_ROWS; ++k) s += sums[k][tx];
    partial[(long)blockIdx.y * cols + j] = s;
  }
  fv_last_block_adds(partial, &out, 1, counters, cols);
}
extern "C" __global__ void column_sums_f32(const float* __restrict__ x, float* partial, float* out,
                                           unsigned* counters, int rows, int cols, long ld, int rows_per_chunk) {
  fv_column_sums(x, partial, out, counters, rows, cols, ld, rows_per_chunk);
}
extern "C" __global__ void column_sums_bf16(const fv_bf16* __restrict__ x, float* partial, float* out,
                                            unsigned* counters, int rows, int cols, long ld, int rows_per_chunk) {
  fv_column_sums(x, partial, out, counters, rows, cols, ld, rows_per_chunk);
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
