// Channel statistics of a feature map x (n, d, h, w) read in place (NCHW or channels_last,
// fp32 / fp16 / bf16), without materialising the (N, d) row view, N = n*h*w:
//   psi (d,d) population covariance of the rows, mu (d,) their mean, pooled (n,d) the
//   per-sample spatial means; all accumulated in fp32.
// and the backward dx = (1/N)(x - mu)(G + G^T) + gmu/N + gpooled[i]/(h*w).
//
// Forward, four kernels, no atomics: every sum has one fixed order that depends only on the
// shape (the row-chunk plan is a function of (n, d, hw), not of the GPU), so the results
// are bit-identical from run to run (docs/cuda.md#reproducibility).
//   gram:   grid (lower 64x64 channel tiles, row chunks). Each block accumulates
//           sum_r (x_r - s)(x_r - s)^T over its rows for its tile into partial[chunk], with
//           the shift s = x[0, :, 0, 0] (one data point: the shifted sum loses no precision
//           when |mu| >> sigma, unlike E[xx^T] - mu mu^T). Blocks on diagonal tiles also sum
//           x - s per channel: over the whole chunk into colsum[chunk], per sample into
//           head[chunk] (the chunk's first sample), tail[chunk] (its last, when another) and
//           psum[i] (the samples inside the chunk: one writer each).
//   mean:   delta = sum_chunks colsum / N, mu = s + delta.
//   pooled: pooled[i] = s + (psum[i], or the head/tail pieces of the chunks sample i spans,
//           added in chunk order) / (h*w).
//   psi:    psi = sum_chunks partial / N - delta delta^T, written symmetric.
// mean and psi sum the chunks in two levels: LANES warps of a block each sum every
// LANES-th chunk, then one thread adds the LANES sums in lane order.
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
constexpr int WARP = 32;
constexpr int LANES = THREADS / WARP;  // the first level of the fixed-order chunk sums
// The row-chunk plan targets this many Gram blocks (4 per SM of an H100 SXM) on every GPU:
// a plan that followed the SM count would change the summation order, and so the last
// bits of psi, mu and pooled, from one GPU model to another.
constexpr int PLAN_BLOCKS = 4 * 132;

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

// The forward's fp32 workspace after the per-chunk Grams (see unidd_cuda.h).
struct Sums {
  float* colsum;  // (chunks, d): sum over the chunk's rows of x - s
  float* head;    // (chunks, d): the part of it in the chunk's first sample
  float* tail;    // (chunks, d): the part in its last sample (0 when that is the first)
  float* delta;   // (d,)
};

inline Sums sums_of(float* partial, int chunks, int d) {
  float* p = partial + int64_t(chunks) * d * d;
  return {p, p + int64_t(chunks) * d, p + int64_t(2) * chunks * d, p + int64_t(3) * chunks * d};
}

template <typename T>
__global__ void __launch_bounds__(THREADS, 2) gram_kernel(Map<T> m, int rows_per_chunk, float* __restrict__ partial,
                                                       Sums sums, float* __restrict__ psum) {
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
  // diagonal blocks: thread pc < TC sums channel ch over the rows, in row order
  const int pc = threadIdx.x, ch = ca + pc;
  const bool sums_channel = diag && pc < TC && ch < m.d;
  const int64_t own = int64_t(blockIdx.y) * m.d + ch;
  const int first_sample = r_begin / m.hw;
  int run_sample = first_sample;
  float run = 0.f, total = 0.f;
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
    if (sums_channel) {
      for (int k = 0; k < BK && r0 + k < r_end; ++k) {
        const int i = (r0 + k) / m.hw;
        if (i != run_sample) {  // sample run_sample ends inside this chunk
          if (run_sample == first_sample) sums.head[own] = run;
          else psum[int64_t(run_sample) * m.d + ch] = run;
          run = 0.f;
          run_sample = i;
        }
        run += SA[k][pc];
        total += SA[k][pc];
      }
    }
    mma_4x4<BK, LDS>(acc, SA, diag ? SA : SB, threadIdx.x / 16, threadIdx.x % 16);
  }
  if (sums_channel) {  // run_sample is the chunk's last sample
    if (run_sample == first_sample) sums.head[own] = run;
    sums.tail[own] = run_sample == first_sample ? 0.f : run;
    sums.colsum[own] = total;
  }
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

// sum_{p < count} base[p * stride] in a fixed order, by all threads of a block: warp l sums
// p = l, l + LANES, ... (its 32 threads: 32 independent sums, e.g. 32 adjacent columns),
// then thread t < WARP adds the LANES sums of column t in lane order and returns the total
// (other threads get 0). `active` false: that thread contributes nothing and reads nothing.
__device__ __forceinline__ float lane_sum(const float* base, int64_t stride, int count, bool active,
                                          float (*red)[WARP]) {
  const int lane = threadIdx.x / WARP, col = threadIdx.x % WARP;
  float v = 0.f;
  if (active)
    for (int p = lane; p < count; p += LANES) v += base[int64_t(p) * stride];
  red[lane][col] = v;
  __syncthreads();
  float total = 0.f;
  if (lane == 0)
    for (int l = 0; l < LANES; ++l) total += red[l][col];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(THREADS, 2) mean_kernel(Map<T> m, int chunks, Sums sums, float* __restrict__ mu) {
  __shared__ float red[LANES][WARP];
  const int c = blockIdx.x * WARP + threadIdx.x % WARP;
  const float total = lane_sum(sums.colsum + c, m.d, chunks, c < m.d, red);
  if (threadIdx.x < WARP && c < m.d) {
    const float dl = total / (float(m.n) * float(m.hw));
    sums.delta[c] = dl;
    mu[c] = m.shift(c) + dl;
  }
}

// Sample of the first / last row of chunk p.
__device__ __forceinline__ int chunk_first(int p, int rows_per_chunk, int hw) { return p * rows_per_chunk / hw; }
__device__ __forceinline__ int chunk_last(int p, int rows_per_chunk, int hw, int N) {
  const int end = N - p * rows_per_chunk < rows_per_chunk ? N : (p + 1) * rows_per_chunk;
  return (end - 1) / hw;
}

// One thread per (sample i, channel c): sample i's sum is psum[i] when one chunk holds it
// whole and it is neither that chunk's first nor last sample; otherwise the head / tail
// pieces of the chunks it spans, added in chunk order.
template <typename T>
__global__ void __launch_bounds__(THREADS, 2) pooled_kernel(Map<T> m, int rows_per_chunk, Sums sums,
                                                         const float* __restrict__ psum, float* __restrict__ pooled) {
  const int c = blockIdx.x * WARP + threadIdx.x % WARP, i = blockIdx.y * LANES + threadIdx.x / WARP;
  if (c >= m.d || i >= m.n) return;
  const int N = m.n * m.hw, rpc = rows_per_chunk;
  const int p0 = i * m.hw / rpc, p1 = ((i + 1) * m.hw - 1) / rpc;
  float v = 0.f;
  if (p0 == p1 && chunk_first(p0, rpc, m.hw) != i && chunk_last(p0, rpc, m.hw, N) != i) {
    v = psum[int64_t(i) * m.d + c];
  } else {
    for (int p = p0; p <= p1; ++p)
      v += (chunk_first(p, rpc, m.hw) == i ? sums.head : sums.tail)[int64_t(p) * m.d + c];
  }
  pooled[int64_t(i) * m.d + c] = m.shift(c) + v * (1.f / m.hw);
}

__global__ void __launch_bounds__(THREADS, 2) psi_kernel(const float* __restrict__ partial, int chunks, int d,
                                                      float inv_n, const float* __restrict__ delta,
                                                      float* __restrict__ psi) {
  __shared__ float red[LANES][WARP];
  const int a = blockIdx.y, b = blockIdx.x * WARP + threadIdx.x % WARP;
  const float total = lane_sum(partial + int64_t(a) * d + b, int64_t(d) * d, chunks, b <= a, red);
  if (threadIdx.x < WARP && b <= a) {
    const float v = total * inv_n - delta[a] * delta[b];
    psi[int64_t(a) * d + b] = v;
    psi[int64_t(b) * d + a] = v;
  }
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

// Row chunks so that (tiles x chunks) is about PLAN_BLOCKS blocks, whole BK stages each;
// a function of the shape only.
ChunkPlan plan_chunks(int n, int d, int hw) {
  const int N = n * hw, nt = ceil_div(d, TC), tiles = nt * (nt + 1) / 2;
  int chunks = ceil_div(PLAN_BLOCKS, tiles);
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
int run_forward(const UniddFeatureMap& f, float* partial, float* psum, float* psi, float* mu, float* pooled,
                cudaStream_t stream) {
  const Map<T> m = typed<T>(f);
  const ChunkPlan plan = plan_chunks(f.n, f.d, f.hw);
  const int nt = ceil_div(f.d, TC), col_blocks = ceil_div(f.d, WARP);
  const Sums sums = sums_of(partial, plan.chunks, f.d);
  UNIDD_LAUNCH(gram_kernel<T>, dim3(nt * (nt + 1) / 2, plan.chunks), dim3(THREADS), stream, m, plan.rows, partial,
               sums, psum);
  UNIDD_LAUNCH(mean_kernel<T>, dim3(col_blocks), dim3(THREADS), stream, m, plan.chunks, sums, mu);
  UNIDD_LAUNCH(pooled_kernel<T>, dim3(col_blocks, ceil_div(f.n, LANES)), dim3(THREADS), stream, m, plan.rows, sums,
               psum, pooled);
  UNIDD_LAUNCH(psi_kernel, dim3(col_blocks, f.d), dim3(THREADS), stream, partial, plan.chunks, f.d,
               1.f / (float(f.n) * float(f.hw)), sums.delta, psi);
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

extern "C" int unidd_stats_chunks(int n, int d, int hw) { return unidd::plan_chunks(n, d, hw).chunks; }

extern "C" int64_t unidd_stats_workspace(int n, int d, int hw) {
  return int64_t(unidd_stats_chunks(n, d, hw)) * (int64_t(d) * d + 3 * d) + d;
}

extern "C" int unidd_stats_forward(UniddFeatureMap x, float* partial, float* psum, float* psi, float* mu,
                                   float* pooled, cudaStream_t stream) {
  using namespace unidd;
  if (!valid(x)) return cudaErrorInvalidValue;
  switch (x.dtype) {
    case UNIDD_F16: return run_forward<half_t>(x, partial, psum, psi, mu, pooled, stream);
    case UNIDD_BF16: return run_forward<bf16_t>(x, partial, psum, psi, mu, pooled, stream);
    default: return run_forward<float>(x, partial, psum, psi, mu, pooled, stream);
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
