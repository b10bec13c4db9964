// What the CUDA attention kernels (attention_fwd.cu, attention_bwd.cu) share with the operators that launch them
// (attention_cuda_ops.cpp): the launch arguments (a plain struct of pointers, sizes and strides), the tiles and
// shared memory of each kernel, and the launch functions, one per element type and head class. No ATen here: a .cu
// file that includes only this, attention_common.cuh and CUDA headers compiles in a fraction of the time a .cu file
// including torch's tensor headers takes (nvcc parses every header once per architecture), while the operators
// (attention_cuda_ops.cpp, compiled once by the host compiler) hold the tensor code, as rnn_kernels.h does for the
// recurrent kernels.
//
// Element types: T is float, c10::Half or c10::BFloat16 (attention_common.cuh); D is the head class, E and Ev
// padded to 64, 128 or 256. The launch functions are instantiated for every (T, D) in their .cu file. Under
// FASTSEQ_CUDA_EMULATION (tests/cuda_emulation) they run on the CPU emulator, whose header stands in for the
// CUDA runtime's stream and error types.

#pragma once

#include <cstddef>
#include <cstdint>

#ifdef FASTSEQ_CUDA_EMULATION
#include "cuda_emulator.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace fastseq {
namespace attn {

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------------------------------------

enum MaskKind : int { kMaskNone = 0, kMaskBool = 1, kMaskFloat32 = 2, kMaskInputDtype = 3 };

// A 4-D operand (batch, head, row, column) as stored: a broadcast dimension has stride 0. `vec`: rows can be
// read as 16-byte vectors (unit column stride, every other stride and the base aligned to 16 bytes, the row
// length a multiple of the vector).
struct Operand {
  const void* ptr = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
  bool vec = false;
};

struct AttnArgs {
  Operand q, k, v, mask, dout, out;  // `out`: the forward's output, read by backward's D = rowsum(dO ⊙ O)
  void* o = nullptr;                 // forward output (B, H, L, Ev), contiguous
  float* lse = nullptr;              // (B, H, L), base 2
  float* delta = nullptr;            // backward: D (B, H, L)
  float* part = nullptr;             // decode: (B·H, splits, L, Ev) unnormalised partial outputs
  float* part_ml = nullptr;          // decode: (B·H, splits, 2, L) partial (m, l)
  float* dmask = nullptr;            // backward: dS (B, H, L, S) float32 when the float mask needs a gradient
  void* dq = nullptr;                // (B, H, L, E), contiguous
  void* dk = nullptr;                // (B, Hk, S, E), contiguous
  void* dv = nullptr;                // (B, Hv, S, Ev), contiguous
  const int64_t* seed = nullptr;     // (seed, stream) int64, device memory; null without dropout
  int B = 0, H = 0, L = 0, S = 0, E = 0, Ev = 0;
  int group_k = 1, group_v = 1;      // query heads per key head and per value head
  int kv_heads = 1;                  // dK/dV pass: the key or value heads it owns (Hk or Hv)
  int mask_kind = kMaskNone;
  bool causal = false;
  bool dropout = false;
  bool want_dmask = false;
  int64_t diag = 0;                  // causal: key j takes part for query i when j <= i + diag
  float scale = 1.f, scale_log2 = kLog2e, p_drop = 0.f, drop_scale = 1.f;
  int tiles_per_split = 0, num_splits = 1;
};

// ---------------------------------------------------------------------------------------------------------
// Tiles and shared memory: what the operators size grids by and check against the device's limits
// ---------------------------------------------------------------------------------------------------------

// One kernel: query rows (block_m) and keys (block_n) of a block, its threads, its dynamic shared memory.
struct KernelShape {
  int block_m = 0, block_n = 0, threads = 0;
  size_t smem_bytes = 0;
};

// attn_fwd_kernel<T, D> (attention_fwd.cu).
template <typename T, int D>
KernelShape fwd_shape();

// attn_bwd_dkdv_kernel<T, D, *> (every mode has the same tiles) and attn_bwd_dq_kernel<T, D> (attention_bwd.cu).
struct BwdShape {
  KernelShape dkdv, dq;
};
template <typename T, int D>
BwdShape bwd_shape();

// ---------------------------------------------------------------------------------------------------------
// Launches on `stream`, on the current device. The operators have checked the arguments, the grid sizes and the
// device (sm_80 or newer, shared memory per block); a launch function sets a kernel's dynamic shared memory limit
// where it needs more than 48 KiB and returns the first CUDA error (cudaSuccess when every launch was made).
// ---------------------------------------------------------------------------------------------------------

// sdpa_fwd: attn_fwd_kernel over (row blocks · B·H, a.num_splits) blocks; with a.num_splits > 1, the split-key
// partials in a.part and a.part_ml, merged into a.o and a.lse by attn_fwd_combine_kernel.
template <typename T, int D>
cudaError_t launch_fwd(const AttnArgs& a, cudaStream_t stream);

// sdpa_bwd: D = rowsum(dO ⊙ O) into a.delta, dK and dV (one launch, or one each where Hk ≠ Hv or D = 256), dQ.
template <typename T, int D>
cudaError_t launch_bwd(const AttnArgs& a, int Hk, int Hv, cudaStream_t stream);

// sdpa_dropout_mask: the keep-mask, uint8 (B·H, L, S), one thread per (batch·head, row, group of 4 keys).
constexpr int kKeepThreads = 256;
cudaError_t launch_dropout_keep(const int64_t* seed, uint8_t* out, int64_t BH, int64_t L, int64_t S, float p_drop,
                                cudaStream_t stream);

}  // namespace attn
}  // namespace fastseq
