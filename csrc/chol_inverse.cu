// Batched regularized inverse (A + beta I)^-1 of symmetric (d,d) fp32 matrices by a blocked
// Cholesky factorisation L L^T, a blocked triangular inverse M = L^-1 and the product
// M^T M, for a ragged batch (groups of different d) in one set of launches.
//
// Each (d,d) matrix is copied into a (D,D) work matrix W, D = d rounded up to the tile T,
// with beta added to its diagonal and an identity block in the padding (so the factor and
// the inverse of the padding are the identity and never touch the real block). Per tile
// step s = 0 .. nt-1 (nt = D/T), in stream order:
//   factor(s): one block updates W[s,s] -= W[s,s-1] W[s,s-1]^T, factors it in shared memory
//              (L_ss) and inverts L_ss (M_ss); the other blocks apply the rank-T update of
//              step s-1 to the rest of the trailing matrix, W[i,l] -= W[i,s-1] W[l,s-1]^T.
//   panel(s):  W[i,s] <- W[i,s] M_ss^T for i > s (the column of L below the diagonal), and
//              row s of M: M[s,l] = -M_ss sum_{m=l}^{s-1} L[s,m] M[m,l] for l < s.
// then lauum: out = M^T M (lower tiles, mirrored). 2 nt + 2 launches in all, whatever the
// batch. A non-positive or non-finite pivot is replaced by 1 (so nothing downstream turns
// into Inf/NaN), its 1-based column goes to info, and that matrix's output is set to NaN.
#include "common.cuh"
#include "unidd_cuda.h"

namespace unidd {
namespace {

constexpr int T = UNIDD_INV_TILE;
constexpr int LD = T + 1;  // padded shared rows: column and row walks are both conflict-free
constexpr int THREADS = 256;
constexpr int PER_THREAD = T * T / THREADS;
constexpr float kFloatMax = 3.402823466e38f;
static_assert(T == 64 && THREADS == 256, "the 4x4 register tiles below assume a 64x64 tile and 256 threads");

struct Batch {
  UniddInvGroup g[UNIDD_INV_MAX_GROUPS];
  int num_groups;
  float* work;
  int* info;
};

struct Mat {
  const float* a;
  float* out;
  float* W;  // (D,D) Cholesky factor L, built in place
  float* M;  // (D,D) L^-1
  int* info;
  int d, D, nt;
};

// The matrix that blockIdx.y works on.
__device__ __forceinline__ Mat locate(const Batch& b) {
  int m = blockIdx.y;
  int g = 0;
  while (g < b.num_groups - 1 && m >= b.g[g].k) m -= b.g[g++].k;
  const UniddInvGroup& G = b.g[g];
  Mat mat;
  mat.d = G.d;
  mat.nt = ceil_div(G.d, T);
  mat.D = mat.nt * T;
  const int64_t dd = int64_t(G.d) * G.d, DD = int64_t(mat.D) * mat.D;
  mat.a = G.a + m * dd;
  mat.out = G.out + m * dd;
  mat.W = b.work + G.work_offset + m * DD;
  mat.M = b.work + G.work_offset + (G.k + m) * DD;
  mat.info = b.info + G.info_offset + m;
  return mat;
}

__device__ __forceinline__ float* tile(float* X, int D, int i, int j) {
  return X + int64_t(i) * T * D + j * T;
}

// S[k][x] = src[k*ld + x] (rows_are_k) or src[x*ld + k]; reads coalesced either way.
__device__ __forceinline__ void load_kmajor(float (&S)[T][LD], const float* src, int ld, bool rows_are_k) {
#pragma unroll
  for (int u = 0; u < PER_THREAD; ++u) {
    const int e = threadIdx.x + u * THREADS;
    const int hi = e / T, lo = e % T;
    const float v = src[int64_t(hi) * ld + lo];
    if (rows_are_k)
      S[hi][lo] = v;
    else
      S[lo][hi] = v;
  }
}

// acc += op(P) op(Q) for T x T tiles of row-major matrices with leading dimension D,
// op = transpose when the flag says so. Starts and ends with every thread past a barrier
// for the shared buffers.
__device__ __forceinline__ void tile_product(float (&acc)[4][4], const float* P, bool p_t, const float* Q, bool q_t,
                                             int D, float (&SA)[T][LD], float (&SB)[T][LD]) {
  __syncthreads();
  load_kmajor(SA, P, D, p_t);
  load_kmajor(SB, Q, D, !q_t);
  __syncthreads();
  mma_4x4<T, LD>(acc, SA, SB, threadIdx.x / 16, threadIdx.x % 16);
}

// X tile -= acc (sign = -1) or X tile = acc (sign = 0) or X tile = -acc (sign = 1).
__device__ __forceinline__ void store(float* X, int D, const float (&acc)[4][4], int mode) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float* p = X + int64_t(ty + 16 * i) * D + tx + 16 * j;
      *p = mode < 0 ? *p - acc[i][j] : (mode == 0 ? acc[i][j] : -acc[i][j]);
    }
}
enum { kSubtract = -1, kAssign = 0, kAssignNegated = 1 };

__global__ void __launch_bounds__(THREADS, 2) pack_kernel(Batch b, const float* __restrict__ beta) {
  const Mat mat = locate(b);
  int ti, tj;
  lower_tile(blockIdx.x, ti, tj);
  if (ti >= mat.nt) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) *mat.info = 0;
  const float bv = *beta;
  float* W = tile(mat.W, mat.D, ti, tj);
  for (int u = 0; u < PER_THREAD; ++u) {
    const int e = threadIdx.x + u * THREADS;
    const int r = ti * T + e / T, c = tj * T + e % T;
    float v = r == c ? 1.f : 0.f;
    if (r < mat.d && c < mat.d) v = mat.a[int64_t(r) * mat.d + c] + (r == c ? bv : 0.f);
    W[int64_t(e / T) * mat.D + e % T] = v;
  }
}

// Cholesky of the T x T tile S (lower part; S[r][c] for r >= c), then B = (its factor)^-1.
// Right-looking, one barrier per column: in pass c the trailing part is updated with the
// still unscaled column c, and column c-1 (read by nobody in pass c) is scaled.
// Returns, in thread 0, the first column with a bad pivot or -1.
__device__ int factor_and_invert(float (&S)[T][LD], float (&B)[T][LD]) {
  const int q = threadIdx.x % T, r0 = threadIdx.x / T;  // owns S[r0 + 4u][q], u < 16
  constexpr int RSTEP = THREADS / T;
  int fail = -1;
  float prev_sqrt = 1.f, prev_rsqrt = 1.f;
#pragma unroll
  for (int u = 0; u < PER_THREAD; ++u) B[r0 + RSTEP * u][q] = (r0 + RSTEP * u == q) ? 1.f : 0.f;
  for (int c = 0; c <= T; ++c) {
    float sq = 1.f;
    if (c < T) {
      float p = S[c][c];
      if (!(p > 0.f && p <= kFloatMax)) {  // also catches NaN and Inf
        if (fail < 0) fail = c;
        p = 1.f;
      }
      const float inv_p = 1.f / p;
      sq = sqrtf(p);
      const float sqc = S[q][c];
#pragma unroll
      for (int u = 0; u < PER_THREAD; ++u) {
        const int r = r0 + RSTEP * u;
        if (q > c && q <= r) S[r][q] -= S[r][c] * sqc * inv_p;
      }
    }
    if (c > 0) {
#pragma unroll
      for (int u = 0; u < PER_THREAD; ++u) {
        const int r = r0 + RSTEP * u;
        if (q == c - 1 && r >= q) S[r][q] = r == q ? prev_sqrt : S[r][q] * prev_rsqrt;
      }
    }
    prev_sqrt = sq;
    prev_rsqrt = 1.f / sq;
    __syncthreads();
  }
  // L B = I by rows: pass c subtracts L[r][c] B[c] / L[c][c] from the rows below and scales row c-1.
  for (int c = 0; c <= T; ++c) {
    if (c < T) {
      const float f = 1.f / S[c][c];
      const float bcq = B[c][q];
#pragma unroll
      for (int u = 0; u < PER_THREAD; ++u) {
        const int r = r0 + RSTEP * u;
        if (r > c && q <= c) B[r][q] -= S[r][c] * f * bcq;
      }
    }
    if (c > 0) {
#pragma unroll
      for (int u = 0; u < PER_THREAD; ++u) {
        const int r = r0 + RSTEP * u;
        if (r == c - 1 && q <= r) B[r][q] /= S[r][r];
      }
    }
    __syncthreads();
  }
  return fail;
}

__global__ void __launch_bounds__(THREADS, 2) factor_kernel(Batch b, int s) {
  __shared__ float SA[T][LD];
  __shared__ float SB[T][LD];
  const Mat mat = locate(b);
  int ti, tj;
  lower_tile(blockIdx.x, ti, tj);
  const int i = s + ti, l = s + tj;
  if (i >= mat.nt) return;
  float acc[4][4];
  zero(acc);
  if (s > 0) tile_product(acc, tile(mat.W, mat.D, i, s - 1), false, tile(mat.W, mat.D, l, s - 1), true, mat.D, SA, SB);
  float* Wil = tile(mat.W, mat.D, i, l);
  if (blockIdx.x > 0) {  // trailing update of step s-1
    store(Wil, mat.D, acc, kSubtract);
    return;
  }
  __syncthreads();  // SA is free again
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      SA[ty + 16 * a][tx + 16 * c] = Wil[int64_t(ty + 16 * a) * mat.D + tx + 16 * c] - acc[a][c];
  __syncthreads();
  const int fail = factor_and_invert(SA, SB);
  if (threadIdx.x == 0 && fail >= 0 && *mat.info == 0) *mat.info = s * T + fail + 1;
  float* Mss = tile(mat.M, mat.D, s, s);
  for (int u = 0; u < PER_THREAD; ++u) {
    const int e = threadIdx.x + u * THREADS;
    Wil[int64_t(e / T) * mat.D + e % T] = SA[e / T][e % T];
    Mss[int64_t(e / T) * mat.D + e % T] = SB[e / T][e % T];
  }
}

__global__ void __launch_bounds__(THREADS, 2) panel_kernel(Batch b, int s, int nt_max) {
  __shared__ float SA[T][LD];
  __shared__ float SB[T][LD];
  const Mat mat = locate(b);
  if (s >= mat.nt) return;
  const int below = nt_max - s - 1;  // blocks [0, below) solve for L[i,s], the rest build M[s,:]
  float acc[4][4];
  zero(acc);
  const float* Mss = tile(mat.M, mat.D, s, s);
  if (int(blockIdx.x) < below) {
    const int i = s + 1 + blockIdx.x;
    if (i >= mat.nt) return;
    float* Wis = tile(mat.W, mat.D, i, s);
    tile_product(acc, Wis, false, Mss, true, mat.D, SA, SB);
    store(Wis, mat.D, acc, kAssign);
    return;
  }
  const int l = blockIdx.x - below;
  for (int m = l; m < s; ++m)
    tile_product(acc, tile(mat.W, mat.D, s, m), false, tile(mat.M, mat.D, m, l), false, mat.D, SA, SB);
  __syncthreads();
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) SB[ty + 16 * a][tx + 16 * c] = acc[a][c];  // right operand, k-major
  load_kmajor(SA, Mss, mat.D, false);
  __syncthreads();
  float acc2[4][4];
  zero(acc2);
  mma_4x4<T, LD>(acc2, SA, SB, ty, tx);
  store(tile(mat.M, mat.D, s, l), mat.D, acc2, kAssignNegated);
}

__global__ void __launch_bounds__(THREADS, 2) lauum_kernel(Batch b) {
  __shared__ float SA[T][LD];
  __shared__ float SB[T][LD];
  const Mat mat = locate(b);
  int ti, tj;
  lower_tile(blockIdx.x, ti, tj);
  if (ti >= mat.nt) return;
  float acc[4][4];
  zero(acc);
  for (int l = ti; l < mat.nt; ++l)
    tile_product(acc, tile(mat.M, mat.D, l, ti), true, tile(mat.M, mat.D, l, tj), false, mat.D, SA, SB);
  const float nan = __int_as_float(0x7fc00000);
  const bool bad = *mat.info != 0;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  __syncthreads();
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float v = bad ? nan : acc[a][c];
      SA[ty + 16 * a][tx + 16 * c] = v;
      const int r = ti * T + ty + 16 * a, col = tj * T + tx + 16 * c;
      if (r < mat.d && col < mat.d) mat.out[int64_t(r) * mat.d + col] = v;
    }
  if (ti == tj) return;  // a diagonal tile is symmetric and already complete
  __syncthreads();
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) {  // out[col][row] = tile[row][col], coalesced along the row index
      const int r = tj * T + ty + 16 * a, col = ti * T + tx + 16 * c;
      if (r < mat.d && col < mat.d) mat.out[int64_t(r) * mat.d + col] = SA[tx + 16 * c][ty + 16 * a];
    }
}

}  // namespace
}  // namespace unidd

extern "C" int unidd_inverse_tile(void) { return UNIDD_INV_TILE; }
extern "C" int unidd_inverse_max_groups(void) { return UNIDD_INV_MAX_GROUPS; }

extern "C" int unidd_inverse(const UniddInvGroup* groups, int num_groups, const float* beta, float* work, int* info,
                             cudaStream_t stream) {
  using namespace unidd;
  if (num_groups < 1 || num_groups > UNIDD_INV_MAX_GROUPS) return cudaErrorInvalidValue;
  Batch b;
  int total = 0, nt = 0;
  for (int g = 0; g < num_groups; ++g) {
    if (groups[g].k < 0 || groups[g].d < 1) return cudaErrorInvalidValue;
    b.g[g] = groups[g];
    total += groups[g].k;
    nt = groups[g].d > nt * T ? ceil_div(groups[g].d, T) : nt;
  }
  if (total == 0) return cudaSuccess;
  if (total > 65535) return cudaErrorInvalidValue;
  b.num_groups = num_groups;
  b.work = work;
  b.info = info;
  const dim3 block(THREADS);
  const int tiles = nt * (nt + 1) / 2;
  UNIDD_LAUNCH(pack_kernel, dim3(tiles, total), block, stream, b, beta);
  for (int s = 0; s < nt; ++s) {
    const int m = nt - s;
    UNIDD_LAUNCH(factor_kernel, dim3(s == 0 ? 1 : m * (m + 1) / 2, total), block, stream, b, s);
    if (nt > 1) UNIDD_LAUNCH(panel_kernel, dim3(nt - 1, total), block, stream, b, s, nt);
  }
  UNIDD_LAUNCH(lauum_kernel, dim3(tiles, total), block, stream, b);
  return cudaGetLastError();
}
