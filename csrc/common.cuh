// Shared helpers of the torch-free CUDA kernels in csrc/.
//
// The same sources compile two ways:
//   * nvcc (the real build, and the compile report of kernels/cuda/nvcc.py);
//   * g++ with -DUNIDD_EMULATE, where csrc/emu.h runs every CUDA thread of a block as a
//     cooperative fibre on the CPU (tests/test_cuda_emulated.py). That checks indexing,
//     barriers and the algorithms, not races, the memory model or speed.
#pragma once

#ifdef UNIDD_EMULATE
#include "emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <stdint.h>

namespace unidd {

#ifdef UNIDD_EMULATE
using half_t = emu::half_t;
using bf16_t = emu::bf16_t;
#define UNIDD_LAUNCH(kernel, grid, block, stream, ...) \
  emu::launch(#kernel, (grid), (block), [&] { kernel(__VA_ARGS__); })
#else
using half_t = __half;
using bf16_t = __nv_bfloat16;
#define UNIDD_LAUNCH(kernel, grid, block, stream, ...) \
  kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

// Loads of any supported storage type as float, stores back with round-to-nearest-even.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(half_t v) { return __half2float(v); }
__device__ __forceinline__ float to_float(bf16_t v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ half_t from_float<half_t>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float v) { return __float2bfloat16_rn(v); }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Index of the `t`-th tile pair (i, j) with i >= j of a lower-triangular tiling,
// enumerated row by row: (0,0), (1,0), (1,1), (2,0), ...
__device__ __forceinline__ void lower_tile(int t, int& i, int& j) {
  i = 0;
  while (t > i) {
    t -= i + 1;
    ++i;
  }
  j = t;
}

// The 4x4 register tile of a 64x64 block product with 256 threads: thread (pr, qc) owns
// rows pr + 16 i and columns qc + 16 j, i, j < 4, and accumulates
// acc[i][j] += sum_{k<K} SP[k][pr + 16 i] * SQ[k][qc + 16 j] from k-major shared tiles.
template <int K, int LDS>
__device__ __forceinline__ void mma_4x4(float (&acc)[4][4], const float (*SP)[LDS], const float (*SQ)[LDS], int pr,
                                        int qc) {
#pragma unroll 8
  for (int k = 0; k < K; ++k) {
    float p[4], q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      p[i] = SP[k][pr + 16 * i];
      q[i] = SQ[k][qc + 16 * i];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(p[i], q[j], acc[i][j]);
  }
}

__device__ __forceinline__ void zero(float (&acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
}

}  // namespace unidd
