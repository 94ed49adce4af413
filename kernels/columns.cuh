// One-launch deterministic column sums: blocks of (32 columns, FV_COLUMN_ROWS rows of
// threads) over a grid (column groups, chunks of rows) each write their chunk's partial
// sums; the block that finishes a column group last adds the group's partials up, in an
// order that does not depend on which block that was. The host keeps a zeroed counter per
// column group (the kernels leave them zero again).
#pragma once
#include "common.cuh"

// Rows of threads in a column-sum block (of 32 columns).
#define FV_COLUMN_ROWS 8

// Called by every thread of a (32, FV_COLUMN_ROWS) block of a grid (column groups, chunks)
// once it has written its chunk's partials: the block that finishes column group blockIdx.x
// last (counted in counters[blockIdx.x], which it resets to 0 for the next launch) adds to
// out[o][j], for each of the `parts` stacked sums o, partial[o][c][j] over every chunk c —
// thread row y the chunks y, y + 8, ..., then the rows in order, so the result does not
// depend on which block finished last. partial is [parts][chunks][cols].
__device__ __forceinline__ void fv_last_block_adds(const float* partial, float* const* out, int parts,
                                                   unsigned* counters, int cols) {
  __shared__ float sums[FV_COLUMN_ROWS][33];
  __shared__ bool last;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = blockIdx.x * 32 + tx;
  if (gridDim.y == 1) {  // the only chunk: its partials (written by this thread) are the sums
    if (ty == 0 && j < cols) {
      for (int o = 0; o < parts; ++o) out[o][j] += partial[(long)o * cols + j];
    }
    return;
  }
  __threadfence();  // this block's partials are visible before it counts itself done
  __syncthreads();
  if (tx == 0 && ty == 0) last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const long chunks = gridDim.y;
  for (int o = 0; o < parts; ++o) {
    float s = 0.f;
    if (j < cols) {
      for (long c = ty; c < chunks; c += FV_COLUMN_ROWS) s += __ldcg(&partial[(o * chunks + c) * cols + j]);
    }
    sums[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && j < cols) {
      float t = sums[0][tx];
      for (int k = 1; k < FV_COLUMN_ROWS; ++k) t += sums[k][tx];
      out[o][j] += t;
    }
    __syncthreads();
  }
  if (tx == 0 && ty == 0) counters[blockIdx.x] = 0;
}
