// Torch-free launcher API of the CUDA kernels in csrc/*.cu.
//
// Every launcher only enqueues kernels on `stream`: no allocation, no host synchronisation,
// no host read of device data, so all of them can be captured in a CUDA graph. Buffers are
// allocated by the caller (csrc/bindings.cpp with the torch caching allocator, or the CPU
// emulation test). Return value: 0, or the cudaError_t of the failed launch.
#pragma once

#include <stdint.h>

#ifdef UNIDD_EMULATE
#include "emu.h"
#else
#include <cuda_runtime.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

// ---- site statistics (csrc/site_stats.cu) -------------------------------------------
// A feature map x (n, d, h, w) is read through element strides: row r = i*hw + p of the
// (n*h*w, d) view lives at x + i*stride_n + c*stride_c + p*stride_p (NCHW: stride_c = hw,
// stride_p = 1; channels_last: stride_c = 1, stride_p = d). dtype: 0 fp32, 1 fp16, 2 bf16.
enum { UNIDD_F32 = 0, UNIDD_F16 = 1, UNIDD_BF16 = 2 };

typedef struct {
  const void* x;
  int dtype;
  int n, d, hw;
  int64_t stride_n, stride_c, stride_p;
} UniddFeatureMap;

// Number of row chunks the forward splits the n*h*w rows into: a function of the shape only
// (not of the GPU), so every sum of the forward has one fixed order.
int unidd_stats_chunks(int n, int d, int hw);

// Floats of the forward's `partial` workspace: chunks*(d*d + 3*d) + d (per-chunk Grams,
// column sums, first- and last-sample sums, then delta).
int64_t unidd_stats_workspace(int n, int d, int hw);

// psi (d,d) population covariance, mu (d,), pooled (n,d), all fp32; no atomics.
// Workspace: partial (unidd_stats_workspace floats), psum (n*d floats, need not be
// initialised).
int unidd_stats_forward(UniddFeatureMap x, float* partial, float* psum, float* psi, float* mu,
                        float* pooled, cudaStream_t stream);

// dx = (1/N)(x - mu)(G + G^T) + gmu/N + gpooled[i]/hw, N = n*h*w, written with x's
// dtype and strides. gpsi (d,d) is required; gmu (d,) and gpooled (n,d) may be NULL.
int unidd_stats_backward(UniddFeatureMap x, const float* mu, const float* gpsi, const float* gmu,
                         const float* gpooled, void* dx, cudaStream_t stream);

// ---- batched regularized inverse (csrc/chol_inverse.cu) ---------------------------
// Tile size of the blocked Cholesky: a (d,d) matrix is factored as a (D,D) one, D = d
// rounded up to a multiple of the tile, padded with an identity block.
enum { UNIDD_INV_TILE = 64, UNIDD_INV_MAX_GROUPS = 32 };

// k matrices of size (d,d), contiguous, in a and out (out = (a + beta I)^-1). Their two
// (D,D) work matrices each live at work + work_offset (2*k*D*D floats), their status at
// info + info_offset (k ints).
typedef struct {
  const float* a;
  float* out;
  int64_t work_offset;
  int k, d, info_offset;
} UniddInvGroup;

// (A + beta I)^-1 by Cholesky for up to UNIDD_INV_MAX_GROUPS groups of any sizes, one
// set of launches (2*ceil(max D/TILE) + 2). beta: a device scalar. info[m] = 0, or the
// 1-based column of the first non-positive (or non-finite) pivot of matrix m, whose output
// is then all NaN. At most 65535 matrices in total.
int unidd_inverse(const UniddInvGroup* groups, int num_groups, const float* beta, float* work,
                  int* info, cudaStream_t stream);

// The two enum values above, for callers that cannot read this header (ctypes).
int unidd_inverse_tile(void);
int unidd_inverse_max_groups(void);

#ifdef __cplusplus
}
#endif
