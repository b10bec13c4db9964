// A CPU emulator for fastseq's CUDA kernels (csrc/cuda/attention_*.cu compiled as host C++ with
// -DFASTSEQ_CUDA_EMULATION): the threads of a block run as fibers (ucontext) in one OS thread, switching at
// every barrier and warp-level exchange, so that block barriers, __syncthreads_or votes, shuffles, and the
// tensor-core operations mma.sync m16n8k16 and ldmatrix(.trans) behave as the PTX ISA specifies them. It
// exists to test the kernels' index arithmetic (fragments, tiles, bounds, strides, masks, dropout counters)
// on machines without a GPU; it says nothing about speed, and its arithmetic (float32 sums in a fixed order)
// is close to, not identical with, the hardware's.
//
// What it checks on the way: a barrier some threads of the block (or warp) do not reach is reported as a
// deadlock; an ldmatrix row address must be 16-byte aligned and inside the block's shared memory; shared
// memory starts filled with NaN bytes (0xFF), so a product that reads an element no thread wrote gives NaN.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// Stand-ins of the CUDA runtime's stream and error types, for the launch functions' signatures
// (csrc/cuda/attention_kernels.h): on the emulator a launch runs to its end and reports its errors by throwing.
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t : int { cudaSuccess = 0 };

namespace emu {

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};

enum class Wait { kRunning, kWarp, kBlock, kDone };

struct Thread {
  ucontext_t context;
  Wait wait = Wait::kRunning;
  int vote = 0;
};

// What a lane puts on the table for a warp-level operation.
struct LaneSlot {
  uint32_t u[8];
  const void* address;
};

constexpr size_t kStackBytes = 256 * 1024;

struct Block {
  dim3 grid, index;
  int threads = 0;
  std::vector<Thread> thread;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<LaneSlot> lanes;
  std::vector<unsigned char> shared;
  ucontext_t scheduler;
  int current = 0;
  int vote_result = 0;
  std::function<void()> body;
  std::string error;
};

inline Block*& active() {
  static Block* block = nullptr;
  return block;
}

inline int thread_index() { return active()->current; }
inline dim3 block_index() { return active()->index; }
inline dim3 grid_dim() { return active()->grid; }
inline unsigned char* shared_memory() { return active()->shared.data(); }

inline void wait_at(Wait w) {
  Block* b = active();
  Thread& t = b->thread[b->current];
  t.wait = w;
  swapcontext(&t.context, &b->scheduler);
}

inline void syncwarp() { wait_at(Wait::kWarp); }

inline int syncthreads_or(int v) {
  Block* b = active();
  b->thread[b->current].vote = v;
  wait_at(Wait::kBlock);
  return b->vote_result;
}

inline LaneSlot& my_slot() { return active()->lanes[active()->current]; }
inline LaneSlot& slot_of_lane(int lane) { return active()->lanes[(active()->current & ~31) + lane]; }
inline int lane() { return active()->current & 31; }

inline uint32_t shfl_xor_u32(uint32_t v, int mask) {
  my_slot().u[0] = v;
  syncwarp();
  const uint32_t got = slot_of_lane(lane() ^ mask).u[0];
  syncwarp();
  return got;
}

inline float shfl_xor(float v, int mask) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits = shfl_xor_u32(bits, mask);
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float b16_to_float(uint32_t bits, bool bf16) {
  if (bf16) return static_cast<float>(c10::BFloat16(uint16_t(bits), c10::BFloat16::from_bits()));
  return static_cast<float>(c10::Half(uint16_t(bits), c10::Half::from_bits()));
}

inline uint16_t half_of(uint32_t reg, int which) { return uint16_t(which ? reg >> 16 : reg & 0xffffu); }

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: c += A (16 × 16) · B (16 × 8), fragments as in
// csrc/cuda/attention_common.cuh's header.
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  LaneSlot& mine = my_slot();
  for (int i = 0; i < 4; ++i) mine.u[i] = a[i];
  mine.u[4] = b0;
  mine.u[5] = b1;
  syncwarp();
  const auto A = [&](int row, int k) {
    const LaneSlot& s = slot_of_lane(4 * (row % 8) + (k % 8) / 2);
    return b16_to_float(half_of(s.u[row / 8 + 2 * (k / 8)], k % 2), bf16);
  };
  const auto B = [&](int k, int col) {
    const LaneSlot& s = slot_of_lane(4 * col + (k % 8) / 2);
    return b16_to_float(half_of(s.u[4 + k / 8], k % 2), bf16);
  };
  const int g = lane() >> 2, t = lane() & 3;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    d[e] = sum;
  }
  syncwarp();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane i gives the address of row i % 8 of matrix i / 8;
// register m of lane i gets (row i / 4, cols 2(i % 4), 2(i % 4) + 1) of matrix m, or with .trans
// (rows 2(i % 4), 2(i % 4) + 1, col i / 4).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_address, bool trans) {
  Block* b = active();
  const auto* p = static_cast<const unsigned char*>(row_address);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw std::runtime_error("emulator: ldmatrix row address not 16-byte aligned");
  if (p < b->shared.data() || p + 16 > b->shared.data() + b->shared.size())
    throw std::runtime_error("emulator: ldmatrix row address outside the block's shared memory");
  my_slot().address = row_address;
  syncwarp();
  const auto element = [&](int matrix, int row, int col) {
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(slot_of_lane(8 * matrix + row).address) + 2 * col, 2);
    return uint32_t(v);
  };
  const int i = lane();
  for (int m = 0; m < 4; ++m) {
    if (!trans) {
      r[m] = element(m, i / 4, 2 * (i % 4)) | (element(m, i / 4, 2 * (i % 4) + 1) << 16);
    } else {
      r[m] = element(m, 2 * (i % 4), i / 4) | (element(m, 2 * (i % 4) + 1, i / 4) << 16);
    }
  }
  syncwarp();
}

inline void fiber_entry() {
  Block* b = active();
  try {
    b->body();
  } catch (const std::exception& e) {
    if (b->error.empty()) b->error = e.what();
  }
  b->thread[b->current].wait = Wait::kDone;
  swapcontext(&b->thread[b->current].context, &b->scheduler);
}

// Runs every thread of the block to its end; throws on a deadlock or an error inside the kernel.
inline void run_block(Block& b) {
  for (int i = 0; i < b.threads; ++i) {
    Thread& t = b.thread[i];
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = b.stacks[i].get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = nullptr;
    makecontext(&t.context, fiber_entry, 0);
    t.wait = Wait::kRunning;
  }
  for (;;) {
    for (int i = 0; i < b.threads; ++i) {
      if (b.thread[i].wait != Wait::kRunning) continue;
      b.current = i;
      swapcontext(&b.scheduler, &b.thread[i].context);
    }
    if (!b.error.empty()) throw std::runtime_error(b.error);
    int done = 0, at_block = 0;
    for (const Thread& t : b.thread) done += t.wait == Wait::kDone, at_block += t.wait == Wait::kBlock;
    if (done == b.threads) return;
    bool released = false;
    for (int w = 0; w < b.threads / 32; ++w) {
      bool all = true;
      for (int l = 0; l < 32; ++l) all = all && b.thread[32 * w + l].wait == Wait::kWarp;
      if (!all) continue;
      for (int l = 0; l < 32; ++l) b.thread[32 * w + l].wait = Wait::kRunning;
      released = true;
    }
    if (!released && at_block == b.threads) {
      int vote = 0;
      for (const Thread& t : b.thread) vote |= t.vote;
      b.vote_result = vote;
      for (Thread& t : b.thread) t.wait = Wait::kRunning;
      released = true;
    }
    if (!released)
      throw std::runtime_error("emulator: deadlock: the threads of a block wait at different barriers (" +
                               std::to_string(done) + " done, " + std::to_string(at_block) + " at a block barrier, " +
                               std::to_string(b.threads - done - at_block) + " at a warp exchange)");
  }
}

// kernel<<<grid, threads, shared_bytes>>>(…), the call given as a closure; blocks run one after another.
template <typename F>
void launch(dim3 grid, int threads, size_t shared_bytes, F&& kernel) {
  if (threads % 32 != 0) throw std::runtime_error("emulator: block size must be a multiple of 32");
  if (size_t(grid.x) * grid.y * grid.z == 0) return;
  Block b;
  b.grid = grid;
  b.threads = threads;
  b.thread.resize(threads);
  b.lanes.resize(threads);
  for (int i = 0; i < threads; ++i) b.stacks.emplace_back(new char[kStackBytes]);
  b.body = [&] { kernel(); };
  Block* outer = active();
  active() = &b;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.index = dim3(x, y, z);
          b.shared.assign(shared_bytes, 0xFF);
          run_block(b);
        }
  } catch (...) {
    active() = outer;
    throw;
  }
  active() = outer;
}

}  // namespace emu
