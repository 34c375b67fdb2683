// A CPU emulation of the CUDA execution model, for testing csrc/ kernels without a GPU.
//
// Blocks of a grid run one after another; the threads of a block run as cooperative
// fibres (ucontext) that switch only at __syncthreads(). So a kernel's indexing, masking,
// barrier placement and arithmetic are executed for real, in fp32, on the CPU. What this
// does NOT check: data races between threads of a block (fibres never interleave between
// barriers), races between blocks, the GPU memory model, warp-level behaviour, speed.
// Blocks run in grid order, or in a seeded pseudo-random order after
// unidd_emu_set_block_order(seed != 0): a kernel whose result depends on the order in which
// blocks finish (atomics across blocks) gives different bits under different seeds.
// A __syncthreads() reached by some threads of a block while others have exited is
// reported as an error (a deadlock or undefined behaviour on a GPU).
//
// Used only with g++ -DUNIDD_EMULATE (tests/test_cuda_emulated.py); never by nvcc.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef struct emu_stream_* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr cudaError_t cudaErrorLaunchFailure = 719;

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline cudaError_t last_error = cudaSuccess;

enum class State { ready, waiting, done };

struct Fiber {
  ucontext_t ctx;
  State state;
  unsigned tid;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
};

inline Block* active = nullptr;
inline uint64_t block_order_seed = 0;  // 0: grid order
constexpr size_t kStackBytes = 64 * 1024;

inline void trampoline() {
  (*active->body)();
  active->current->state = State::done;  // returning resumes the scheduler (uc_link)
}

inline void barrier() {
  Fiber* self = active->current;
  self->state = State::waiting;
  swapcontext(&self->ctx, &active->scheduler);
}

inline void set_thread(unsigned tid) {
  threadIdx.x = tid % blockDim.x;
  threadIdx.y = (tid / blockDim.x) % blockDim.y;
  threadIdx.z = tid / (blockDim.x * blockDim.y);
}

// Runs one block to completion; false on barrier divergence.
inline bool run_block(Block& blk) {
  const size_t n = blk.fibers.size();
  for (size_t t = 0; t < n; ++t) {
    Fiber& f = blk.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = blk.stacks.data() + t * kStackBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &blk.scheduler;
    makecontext(&f.ctx, trampoline, 0);
    f.state = State::ready;
    f.tid = static_cast<unsigned>(t);
  }
  for (;;) {
    size_t waiting = 0, done = 0;
    for (Fiber& f : blk.fibers) {
      if (f.state == State::ready) {
        blk.current = &f;
        set_thread(f.tid);
        swapcontext(&blk.scheduler, &f.ctx);
      }
      waiting += f.state == State::waiting;
      done += f.state == State::done;
    }
    if (waiting == 0) return true;
    if (done > 0) return false;
    for (Fiber& f : blk.fibers) f.state = State::ready;
  }
}

// Launch recording (kernels/cuda/emulator.py, LaunchRecorder): while ``recording`` is on,
// launch() appends (kernel, grid, block) and runs nothing, so the grids the host code picks
// can be read for any size without data (the compile report's occupancy table).
struct LaunchRecord {
  const char* kernel;
  unsigned grid[3], block[3];
};
inline bool recording = false;
inline std::vector<LaunchRecord> records;

template <class F>
void launch(const char* name, dim3 grid, dim3 block, F&& kernel_call) {
  const size_t n = size_t(block.x) * block.y * block.z;
  if (recording) records.push_back({name, {grid.x, grid.y, grid.z}, {block.x, block.y, block.z}});
  if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (recording) return;
  const std::function<void()> body = kernel_call;
  Block blk;
  blk.fibers.resize(n);
  blk.stacks.resize(n * kStackBytes);
  blk.body = &body;
  active = &blk;
  gridDim = grid;
  blockDim = block;
  std::vector<uint64_t> order(size_t(grid.x) * grid.y * grid.z);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  uint64_t state = block_order_seed;
  for (size_t i = order.size(); state != 0 && i > 1; --i) {  // Fisher-Yates with splitmix64
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    const size_t j = size_t((z ^ (z >> 31)) % i);
    const uint64_t t = order[i - 1];
    order[i - 1] = order[j];
    order[j] = t;
  }
  for (const uint64_t linear : order) {
    const unsigned x = unsigned(linear % grid.x), y = unsigned(linear / grid.x % grid.y),
                   z = unsigned(linear / (uint64_t(grid.x) * grid.y));
    blockIdx = dim3(x, y, z);
    if (!run_block(blk)) {
      fprintf(stderr, "emu: barrier divergence in block (%u,%u,%u)\n", x, y, z);
      last_error = cudaErrorLaunchFailure;
      active = nullptr;
      return;
    }
  }
  active = nullptr;
}

}  // namespace emu

inline void __syncthreads() { emu::barrier(); }
inline void __threadfence() {}
inline float __int_as_float(int i) {
  float f;
  memcpy(&f, &i, 4);
  return f;
}
inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

inline float __half2float(emu::half_t h) {
  _Float16 f;
  memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline emu::half_t __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE round-to-nearest-even
  emu::half_t h;
  memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(emu::bf16_t b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline emu::bf16_t __float2bfloat16_rn(float v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}

// Block order of every later launch: 0 grid order, else a permutation seeded by `seed`.
extern "C" __attribute__((used, visibility("default"))) inline void unidd_emu_set_block_order(uint64_t seed) {
  emu::block_order_seed = seed;
}

// ctypes access to the launch recording.
extern "C" __attribute__((used, visibility("default"))) inline void unidd_emu_record(int on) {
  emu::recording = on != 0;
  emu::records.clear();
}
extern "C" __attribute__((used, visibility("default"))) inline int unidd_emu_num_records(void) { return int(emu::records.size()); }
// Kernel name of record i; its grid and block into dims[0..2] and dims[3..5].
extern "C" __attribute__((used, visibility("default"))) inline const char* unidd_emu_record_at(int i, unsigned* dims) {
  const emu::LaunchRecord& r = emu::records.at(size_t(i));
  for (int k = 0; k < 3; ++k) dims[k] = r.grid[k], dims[3 + k] = r.block[k];
  return r.kernel;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
