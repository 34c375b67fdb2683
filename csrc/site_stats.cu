// Channel statistics of a feature map x (n, d, h, w) read in place (NCHW or channels_last,
// fp32 / fp16 / bf16), without materialising the (N, d) row view, N = n*h*w:
//   psi (d,d) population covariance of the rows, mu (d,) their mean, pooled (n,d) the
//   per-sample spatial means; all accumulated in fp32.
// and the backward dx = (1/N)(x - mu)(G + G^T) + gmu/N + gpooled[i]/(h*w).
//
// Forward, three kernels after the caller zero-fills psum:
//   gram:  grid (lower 64x64 channel tiles, row chunks). Each block accumulates
//          sum_r (x_r - s)(x_r - s)^T over its rows for its tile into partial[chunk], with
//          the shift s = x[0, :, 0, 0] (one data point: the shifted sum loses no precision
//          when |mu| >> sigma, unlike E[xx^T] - mu mu^T). Blocks on diagonal tiles also add
//          per-sample sums of x - s into psum (atomics: a sample spans few chunks).
//   vec:   delta = sum(x - s)/N, mu = s + delta, pooled = s + psum/(h*w).
//   psi:   psi = sum_chunks partial / N - delta delta^T, written symmetric.
// Tensor cores are not used: the Gram matrix is accumulated with fp32 FMAs (exactly the
// reference's arithmetic type).
#include "common.cuh"
#include "unidd_cuda.h"

namespace unidd {
namespace {

constexpr int TC = 64;  // channel (and, in the backward, row) tile
constexpr int BK = 32;  // depth of a shared-memory stage
constexpr int LDS = TC + 1;
constexpr int THREADS = 256;

template <typename T>
struct Map {
  const T* x;
  int n, d, hw;
  int64_t sn, sc, sp;

  __device__ __forceinline__ int64_t row_offset(int row) const {
    const unsigned i = unsigned(row) / unsigned(hw);
    return int64_t(i) * sn + int64_t(unsigned(row) - i * unsigned(hw)) * sp;
  }
  __device__ __forceinline__ float shift(int c) const { return to_float(x[c * sc]); }
};

template <typename T>
__global__ void __launch_bounds__(THREADS, 2) gram_kernel(Map<T> m, int rows_per_chunk, float* __restrict__ partial,
                                                       float* __restrict__ psum) {
  __shared__ float SA[BK][LDS];
  __shared__ float SB[BK][LDS];
  __shared__ float shift_a[TC], shift_b[TC];
  int ti, tj;
  lower_tile(blockIdx.x, ti, tj);
  const bool diag = ti == tj;
  const int ca = ti * TC, cb = tj * TC;
  const int N = m.n * m.hw;
  const int r_begin = blockIdx.y * rows_per_chunk;
  const int r_end = N - r_begin < rows_per_chunk ? N : r_begin + rows_per_chunk;
  if (threadIdx.x < TC) {
    const int t = threadIdx.x;
    shift_a[t] = ca + t < m.d ? m.shift(ca + t) : 0.f;
    shift_b[t] = cb + t < m.d ? m.shift(cb + t) : 0.f;
  }
  const bool rows_fast = m.sp == 1;  // NCHW: consecutive rows are adjacent in memory
  const int pc = threadIdx.x;         // diagonal blocks: thread pc < TC sums channel ca + pc
  int run_sample = r_begin / m.hw;
  float run = 0.f;
  float acc[4][4];
  zero(acc);
  for (int r0 = r_begin; r0 < r_end; r0 += BK) {
    __syncthreads();
#pragma unroll 2
    for (int u = 0; u < BK * TC / THREADS; ++u) {
      const int e = threadIdx.x + u * THREADS;
      const int k = rows_fast ? e % BK : e / TC;
      const int c = rows_fast ? e / BK : e % TC;
      const int row = r0 + k;
      float va = 0.f, vb = 0.f;
      if (row < r_end) {
        const T* xr = m.x + m.row_offset(row);
        if (ca + c < m.d) va = to_float(xr[(ca + c) * m.sc]) - shift_a[c];
        if (!diag && cb + c < m.d) vb = to_float(xr[(cb + c) * m.sc]) - shift_b[c];
      }
      SA[k][c] = va;
      if (!diag) SB[k][c] = vb;
    }
    __syncthreads();
    if (diag && pc < TC && ca + pc < m.d) {
      for (int k = 0; k < BK && r0 + k < r_end; ++k) {
        const int i = (r0 + k) / m.hw;
        if (i != run_sample) {
          atomicAdd(&psum[int64_t(run_sample) * m.d + ca + pc], run);
          run = 0.f;
          run_sample = i;
        }
        run += SA[k][pc];
      }
    }
    mma_4x4<BK, LDS>(acc, SA, diag ? SA : SB, threadIdx.x / 16, threadIdx.x % 16);
  }
  if (diag && pc < TC && ca + pc < m.d && r_begin < r_end) atomicAdd(&psum[int64_t(run_sample) * m.d + ca + pc], run);
  float* out = partial + int64_t(blockIdx.y) * m.d * m.d;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int a = ca + ty + 16 * i, b = cb + tx + 16 * j;
      if (a < m.d && b < m.d) out[int64_t(a) * m.d + b] = acc[i][j];
    }
}

template <typename T>
__global__ void __launch_bounds__(THREADS, 2) vec_kernel(Map<T> m, const float* __restrict__ psum,
                                                      float* __restrict__ delta, float* __restrict__ mu,
                                                      float* __restrict__ pooled) {
  const int c = blockIdx.x * THREADS + threadIdx.x;
  if (c >= m.d) return;
  const float s = m.shift(c), inv_hw = 1.f / m.hw;
  float total = 0.f;
  for (int i = 0; i < m.n; ++i) {
    const float v = psum[int64_t(i) * m.d + c];
    total += v;
    pooled[int64_t(i) * m.d + c] = s + v * inv_hw;
  }
  const float dl = total / (float(m.n) * float(m.hw));
  delta[c] = dl;
  mu[c] = s + dl;
}

__global__ void __launch_bounds__(THREADS, 2) psi_kernel(const float* __restrict__ partial, int chunks, int d, float inv_n,
                                                      const float* __restrict__ delta, float* __restrict__ psi) {
  const int a = blockIdx.y, b = blockIdx.x * THREADS + threadIdx.x;
  if (b > a) return;
  float total = 0.f;
  for (int p = 0; p < chunks; ++p) total += partial[int64_t(p) * d * d + int64_t(a) * d + b];
  const float v = total * inv_n - delta[a] * delta[b];
  psi[int64_t(a) * d + b] = v;
  psi[int64_t(b) * d + a] = v;
}

// Backward: a (N, d) x (d, d) product, blocks over (64 rows, 64 output channels), K = d in
// stages of BK channels. Thread ownership is transposed for NCHW so that the loads of x and
// the stores of dx walk the contiguous index with consecutive threads.
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) backward_kernel(Map<T> m, const float* __restrict__ mu,
                                                           const float* __restrict__ G, const float* __restrict__ gmu,
                                                           const float* __restrict__ gpooled, T* __restrict__ dx) {
  __shared__ float SX[BK][LDS];  // SX[k][row] = x[row][k0 + k] - mu[k0 + k]
  __shared__ float SG[BK][LDS];  // SG[k][col] = (G + G^T)[k0 + k][c0 + col] / N
  __shared__ int64_t row_off[TC];
  __shared__ int row_sample[TC];
  const int N = m.n * m.hw;
  const float inv_n = 1.f / float(N), inv_hw = 1.f / m.hw;
  const int r0 = blockIdx.x * TC, c0 = blockIdx.y * TC;
  if (threadIdx.x < TC) {
    const int row = r0 + threadIdx.x;
    row_off[threadIdx.x] = row < N ? m.row_offset(row) : 0;
    row_sample[threadIdx.x] = row < N ? row / m.hw : 0;
  }
  const bool rows_fast = m.sp == 1;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int rl = rows_fast ? tx : ty, cl = rows_fast ? ty : tx;
  float acc[4][4];
  zero(acc);
  for (int k0 = 0; k0 < m.d; k0 += BK) {
    __syncthreads();
#pragma unroll
    for (int u = 0; u < BK * TC / THREADS; ++u) {
      const int e = threadIdx.x + u * THREADS;
      const int row = rows_fast ? e % TC : e / BK, k = rows_fast ? e / TC : e % BK;
      const int ch = k0 + k;
      SX[k][row] = r0 + row < N && ch < m.d ? to_float(m.x[row_off[row] + ch * m.sc]) - mu[ch] : 0.f;
      const int k2 = e / TC, col = e % TC;
      SG[k2][col] = k0 + k2 < m.d && c0 + col < m.d ? G[int64_t(k0 + k2) * m.d + c0 + col] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < BK * TC / THREADS; ++u) {
      const int e = threadIdx.x + u * THREADS;
      const int k = e % BK, col = e / BK;
      const float gt = k0 + k < m.d && c0 + col < m.d ? G[int64_t(c0 + col) * m.d + k0 + k] : 0.f;
      SG[k][col] = (SG[k][col] + gt) * inv_n;
    }
    __syncthreads();
    mma_4x4<BK, LDS>(acc, SX, SG, rl, cl);
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int lr = rl + 16 * i, c = c0 + cl + 16 * j;
      if (r0 + lr >= N || c >= m.d) continue;
      float v = acc[i][j];
      if (gmu) v += gmu[c] * inv_n;
      if (gpooled) v += gpooled[int64_t(row_sample[lr]) * m.d + c] * inv_hw;
      dx[row_off[lr] + c * m.sc] = from_float<T>(v);
    }
}

struct ChunkPlan {
  int chunks, rows;
};

// Row chunks so that (tiles x chunks) is about 4 blocks per SM, whole BK stages each.
ChunkPlan plan_chunks(int n, int d, int hw, int num_sms) {
  const int N = n * hw, nt = ceil_div(d, TC), tiles = nt * (nt + 1) / 2;
  int chunks = ceil_div(4 * (num_sms > 0 ? num_sms : 1), tiles);
  chunks = chunks < ceil_div(N, BK) ? chunks : ceil_div(N, BK);
  const int rows = ceil_div(ceil_div(N, chunks), BK) * BK;
  return {ceil_div(N, rows), rows};
}

bool valid(const UniddFeatureMap& f) {
  return f.n > 0 && f.d > 0 && f.hw > 0 && int64_t(f.n) * f.hw < (int64_t(1) << 31) && f.dtype >= UNIDD_F32 &&
         f.dtype <= UNIDD_BF16;
}

template <typename T>
Map<T> typed(const UniddFeatureMap& f) {
  return {static_cast<const T*>(f.x), f.n, f.d, f.hw, f.stride_n, f.stride_c, f.stride_p};
}

template <typename T>
int run_forward(const UniddFeatureMap& f, int num_sms, float* partial, float* psum, float* psi, float* mu,
            float* pooled, cudaStream_t stream) {
  const Map<T> m = typed<T>(f);
  const ChunkPlan plan = plan_chunks(f.n, f.d, f.hw, num_sms);
  const int nt = ceil_div(f.d, TC);
  float* delta = partial + int64_t(plan.chunks) * f.d * f.d;
  UNIDD_LAUNCH(gram_kernel<T>, dim3(nt * (nt + 1) / 2, plan.chunks), dim3(THREADS), stream, m, plan.rows, partial,
               psum);
  UNIDD_LAUNCH(vec_kernel<T>, dim3(ceil_div(f.d, THREADS)), dim3(THREADS), stream, m, psum, delta, mu, pooled);
  UNIDD_LAUNCH(psi_kernel, dim3(ceil_div(f.d, THREADS), f.d), dim3(THREADS), stream, partial, plan.chunks, f.d,
               1.f / (float(f.n) * float(f.hw)), delta, psi);
  return cudaGetLastError();
}

template <typename T>
int run_backward(const UniddFeatureMap& f, const float* mu, const float* gpsi, const float* gmu, const float* gpooled,
             void* dx, cudaStream_t stream) {
  const dim3 grid(ceil_div(f.n * f.hw, TC), ceil_div(f.d, TC));
  UNIDD_LAUNCH(backward_kernel<T>, grid, dim3(THREADS), stream, typed<T>(f), mu, gpsi, gmu, gpooled,
               static_cast<T*>(dx));
  return cudaGetLastError();
}

}  // namespace
}  // namespace unidd

extern "C" int unidd_stats_chunks(int n, int d, int hw, int num_sms) {
  return unidd::plan_chunks(n, d, hw, num_sms).chunks;
}

extern "C" int unidd_stats_forward(UniddFeatureMap x, int num_sms, float* partial, float* psum, float* psi, float* mu,
                                   float* pooled, cudaStream_t stream) {
  using namespace unidd;
  if (!valid(x)) return cudaErrorInvalidValue;
  switch (x.dtype) {
    case UNIDD_F16: return run_forward<half_t>(x, num_sms, partial, psum, psi, mu, pooled, stream);
    case UNIDD_BF16: return run_forward<bf16_t>(x, num_sms, partial, psum, psi, mu, pooled, stream);
    default: return run_forward<float>(x, num_sms, partial, psum, psi, mu, pooled, stream);
  }
}

extern "C" int unidd_stats_backward(UniddFeatureMap x, const float* mu, const float* gpsi, const float* gmu,
                                    const float* gpooled, void* dx, cudaStream_t stream) {
  using namespace unidd;
  if (!valid(x) || !gpsi) return cudaErrorInvalidValue;
  switch (x.dtype) {
    case UNIDD_F16: return run_backward<half_t>(x, mu, gpsi, gmu, gpooled, dx, stream);
    case UNIDD_BF16: return run_backward<bf16_t>(x, mu, gpsi, gmu, gpooled, dx, stream);
    default: return run_backward<float>(x, mu, gpsi, gmu, gpooled, dx, stream);
  }
}
