// Shared pieces of the CUDA attention kernels (attention_fwd.cu, attention_bwd.cu): the tile configurations, the
// warp-level products on tensor cores (mma.sync m16n8k16, ldmatrix) and their float32 twins on CUDA cores, the
// tile loaders, the score bias (masks, causality, bounds), the dropout RNG and the launch macro. The arguments
// (AttnArgs) and the launch functions' declarations are in attention_kernels.h, which includes no ATen header.
//
// Math and conventions are those of kernels/attention.py (the Triton backend), which the operators in
// fastseq/ops/attention.py call through the same launcher contract: scores s = scale · q kᵀ + bias in base 2
// (s₂ = s · log₂e, so exp is exp2), online softmax along key tiles, the log-sum-exp lse₂ = m + log₂ l saved
// per query row (+inf where no key takes part), dropout keep = uniform(Philox) ≥ p with exactly the Triton
// kernels' counters, so both backends draw the same mask for a seed.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"): a warp's lane is 4·g + t (g = lane / 4 ∈ [0, 8),
// t = lane % 4). A 16 × 8 float32 accumulator tile lives as c[0], c[1] = (row g, cols 2t, 2t + 1) and
// c[2], c[3] = (row g + 8, same cols). The A operand (16 × 16, two b16 per register) is a[0] = (g, 2t..2t+1),
// a[1] = (g + 8, 2t..), a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..); the B operand (16 × 8, k × n) is
// b[0] = (k 2t..2t+1, n g), b[1] = (k 2t + 8.., n g); the lower-indexed element sits in the low 16 bits.
// A warp owns 16 rows of every score tile; a tile of 8·NT columns is `float acc[NT][4]`.
//
// Under FASTSEQ_CUDA_EMULATION the same source compiles as host C++ and runs on the CPU under the fiber
// emulator of tests/cuda_emulation (warp exchanges, barriers, mma and ldmatrix done by the book): that is how
// the index arithmetic of these kernels is tested on machines without a GPU.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention_kernels.h"

#ifdef FASTSEQ_CUDA_EMULATION
#include "cuda_emulator.h"
#define FASTSEQ_HOST_DEVICE inline
#define FASTSEQ_DEVICE inline
#define FASTSEQ_KERNEL(...) inline void
#else
#include <cuda_runtime.h>
#define FASTSEQ_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTSEQ_DEVICE __device__ __forceinline__
#define FASTSEQ_KERNEL(...) __global__ void __launch_bounds__(__VA_ARGS__)
#endif

namespace fastseq {
namespace attn {

constexpr float kNegInf = -INFINITY;

// ---------------------------------------------------------------------------------------------------------
// Thread indices, barriers and warp exchanges (the emulator provides its own)
// ---------------------------------------------------------------------------------------------------------

#ifdef FASTSEQ_CUDA_EMULATION
using emu::float2;
using emu::float4;
using emu::uint4;
FASTSEQ_DEVICE int thread_id() { return emu::thread_index(); }
FASTSEQ_DEVICE int block_x() { return emu::block_index().x; }
FASTSEQ_DEVICE int block_y() { return emu::block_index().y; }
FASTSEQ_DEVICE int grid_y() { return emu::grid_dim().y; }
FASTSEQ_DEVICE void sync_block() { emu::syncthreads_or(0); }
FASTSEQ_DEVICE bool sync_block_or(bool v) { return emu::syncthreads_or(v ? 1 : 0) != 0; }
FASTSEQ_DEVICE void sync_warp() { emu::syncwarp(); }
FASTSEQ_DEVICE float shfl_xor(float v, int mask) { return emu::shfl_xor(v, mask); }
FASTSEQ_DEVICE uint32_t shfl_xor(uint32_t v, int mask) { return emu::shfl_xor_u32(v, mask); }
FASTSEQ_DEVICE uint32_t mul_hi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * b) >> 32); }
template <typename T>
FASTSEQ_DEVICE T* shared_memory() { return reinterpret_cast<T*>(emu::shared_memory()); }
#else
FASTSEQ_DEVICE int thread_id() { return threadIdx.x; }
FASTSEQ_DEVICE int block_x() { return blockIdx.x; }
FASTSEQ_DEVICE int block_y() { return blockIdx.y; }
FASTSEQ_DEVICE int grid_y() { return gridDim.y; }
FASTSEQ_DEVICE void sync_block() { __syncthreads(); }
FASTSEQ_DEVICE bool sync_block_or(bool v) { return __syncthreads_or(v ? 1 : 0) != 0; }
FASTSEQ_DEVICE void sync_warp() { __syncwarp(); }
FASTSEQ_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
FASTSEQ_DEVICE uint32_t shfl_xor(uint32_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
FASTSEQ_DEVICE uint32_t mul_hi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
template <typename T>
FASTSEQ_DEVICE T* shared_memory() {
  extern __shared__ __align__(16) unsigned char fastseq_attn_smem[];
  return reinterpret_cast<T*>(fastseq_attn_smem);
}
#endif

FASTSEQ_DEVICE int lane_id() { return thread_id() & 31; }

FASTSEQ_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
FASTSEQ_HOST_DEVICE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
FASTSEQ_HOST_DEVICE int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }
FASTSEQ_DEVICE int warp_id() { return thread_id() >> 5; }

// ---------------------------------------------------------------------------------------------------------
// Element types: c10::Half / c10::BFloat16 on tensor cores, float on CUDA cores
// ---------------------------------------------------------------------------------------------------------

template <typename T>
constexpr bool kTensorCores = !std::is_same<T, float>::value;

template <typename T>
using Bits = typename std::conditional<sizeof(T) == 2, uint16_t, uint32_t>::type;

template <typename T>
FASTSEQ_HOST_DEVICE float to_float(T x) { return static_cast<float>(x); }

// Two floats rounded to nearest-even into the b16 pair an mma operand register holds (low half: `lo`).
template <typename T>
FASTSEQ_DEVICE uint32_t pack2(float lo, float hi) {
  const T a(lo), b(hi);
  return uint32_t(a.x) | (uint32_t(b.x) << 16);
}

// Row stride (elements) of a shared tile of D columns: padded by 16 bytes, so that the 8 rows an ldmatrix (or
// a float4 load of 8 rows) reads fall in distinct banks, and every row starts 16-byte aligned.
template <typename T, int D>
constexpr int tile_ld() { return D + 16 / int(sizeof(T)); }

// ---------------------------------------------------------------------------------------------------------
// Tile configurations: (warps, BLOCK_M query rows, BLOCK_N keys) per kernel, element type and head class D
// (E and Ev padded to 64, 128 or 256). Every warp owns 16 rows of its kernel's accumulators, so the row
// block of the forward and dQ kernels, and the key block of the dK/dV kernel, is 16 · warps. Sized so that
// the accumulators stay in registers (≤ 255 per thread) and shared memory stays ≤ 99 KiB, the per-block
// limit of every sm_8x/sm_9x part (sm_86/sm_89 have the least), see shared_bytes below.
// ---------------------------------------------------------------------------------------------------------

// The least shared memory per block any sm_8x/sm_9x part offers (sm_86, sm_89: 99 KiB).
constexpr size_t kMaxSharedBytes = 99 * 1024;

template <typename T, int D>
struct FwdConfig {
  static constexpr bool kHalf = kTensorCores<T>;
  static constexpr int kWarps = kHalf ? 4 : (D <= 128 ? 4 : 2);
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kHalf ? (D <= 128 ? 64 : 32) : (D <= 64 ? 64 : D <= 128 ? 32 : 16);
};

template <typename T, int D>
struct DqConfig {
  static constexpr bool kHalf = kTensorCores<T>;
  static constexpr int kWarps = D <= 128 ? (kHalf || D <= 64 ? 4 : 2) : (kHalf ? 2 : 1);
  static constexpr int kBlockM = 16 * kWarps;
  static constexpr int kBlockN = kHalf ? (D <= 128 ? 64 : 32) : (D <= 64 ? 64 : D <= 128 ? 32 : 16);
};

template <typename T, int D>
struct DkdvConfig {
  static constexpr bool kHalf = kTensorCores<T>;
  static constexpr int kWarps = D <= 64 ? 4 : D <= 128 ? (kHalf ? 4 : 2) : (kHalf ? 2 : 1);
  static constexpr int kBlockN = 16 * kWarps;  // keys: 16 per warp
  static constexpr int kBlockM = D <= 64 ? 64 : D <= 128 ? 32 : (kHalf ? 32 : 16);  // query tile
};

// ---------------------------------------------------------------------------------------------------------
// Warp-level products. gemm_nt: acc (16 × 8·NT) += A (16 × K, rows of a shared tile) · B (8·NT × K, rows of
// a shared tile)ᵀ. gemm_rn: acc (16 × 8·NT) += P (16 × K, this warp's accumulator fragments, K = 8·KT) ·
// B (K × 8·NT, rows of a shared tile). `k_len` / `n_len`: the columns that hold data (the rest of the padded
// head is zero); whole 16-wide steps past them are skipped.
// ---------------------------------------------------------------------------------------------------------

FASTSEQ_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row_address) {
#ifdef FASTSEQ_CUDA_EMULATION
  emu::ldmatrix_x4(r, row_address, false);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
#endif
}

FASTSEQ_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_address) {
#ifdef FASTSEQ_CUDA_EMULATION
  emu::ldmatrix_x4(r, row_address, true);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
#endif
}

// c += A · B for one 16 × 8 × 16 step on the tensor cores (float32 accumulation).
template <typename T>
FASTSEQ_DEVICE void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef FASTSEQ_CUDA_EMULATION
  emu::mma_16816(c, a, b0, b1, std::is_same<T, c10::BFloat16>::value);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // the launchers refuse devices below sm_80
#endif
}

template <int NT>
FASTSEQ_DEVICE void zero(float (&acc)[NT][4]) {
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Tensor cores: A fragments by ldmatrix (matrices: rows 0-7 / 8-15 × cols 0-7 / 8-15), B fragments of two
// n-tiles per ldmatrix (rows 0-7 and 8-15 of the B tile, each with its k halves).
template <typename T, int NT, int K>
FASTSEQ_DEVICE void gemm_nt_mma(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb, int k_len) {
  static_assert(NT % 2 == 0 && K % 16 == 0, "tiles of 16");
  const int lane = lane_id();
  const int a_row = (lane & 7) + 8 * ((lane >> 3) & 1), a_col = 8 * (lane >> 4);
  const int b_row = (lane & 7) + 8 * (lane >> 4), b_col = 8 * ((lane >> 3) & 1);
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    if (16 * kk < k_len) {
      uint32_t af[4];
      ldmatrix_x4(af, a + a_row * lda + 16 * kk + a_col);
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        uint32_t bf[4];
        ldmatrix_x4(bf, b + (16 * jj + b_row) * ldb + 16 * kk + b_col);
        mma_16816<T>(acc[2 * jj], af, bf[0], bf[1]);
        mma_16816<T>(acc[2 * jj + 1], af, bf[2], bf[3]);
      }
    }
  }
}

// Tensor cores: the accumulator fragments of two adjacent n-tiles are the A fragment of one k-step (rounded to
// the input dtype), and the B fragments come from a row-major (k × n) tile by ldmatrix.trans.
template <typename T, int NT, int KT>
FASTSEQ_DEVICE void gemm_rn_mma(float (&acc)[NT][4], const float (&p)[KT][4], const T* b, int ldb, int n_len) {
  static_assert(NT % 2 == 0 && KT % 2 == 0, "tiles of 16");
  const int lane = lane_id();
  const int b_row = (lane & 7) + 8 * ((lane >> 3) & 1), b_col = 8 * (lane >> 4);
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    const uint32_t af[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                            pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int jj = 0; jj < NT / 2; ++jj) {
      if (16 * jj < n_len) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, b + (16 * kk + b_row) * ldb + 16 * jj + b_col);
        mma_16816<T>(acc[2 * jj], af, bf[0], bf[1]);
        mma_16816<T>(acc[2 * jj + 1], af, bf[2], bf[3]);
      }
    }
  }
}

// x · y over 4 values in a fixed order (product, then three fused multiply-adds). The float32 products and
// backward's D = rowsum(dO ⊙ O) (attention_bwd.cu) sum in exactly this order, 4 columns at a time, so that
// dP − D is exactly 0 where a row's output is exactly one value row (a one-hot softmax: large logits), as in
// the reference, instead of a rounding difference amplified by the scale.
FASTSEQ_DEVICE float dot4(float4 x, float4 y) {
  return fmaf(x.w, y.w, fmaf(x.z, y.z, fmaf(x.y, y.y, x.x * y.x)));
}

// CUDA cores, exact float32: each thread computes its own fragment elements, 4 values of k at a time.
template <int NT>
FASTSEQ_DEVICE void gemm_nt_fma(float (&acc)[NT][4], const float* a, int lda, const float* b, int ldb,
                                int k_len) {
  const int g = lane_id() >> 2, t = lane_id() & 3;
  const float* a_lo = a + g * lda;
  const float* a_hi = a + (g + 8) * lda;
  for (int k = 0; k < k_len; k += 4) {
    const float4 x0 = *reinterpret_cast<const float4*>(a_lo + k);
    const float4 x1 = *reinterpret_cast<const float4*>(a_hi + k);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float4 y0 = *reinterpret_cast<const float4*>(b + (8 * j + 2 * t) * ldb + k);
      const float4 y1 = *reinterpret_cast<const float4*>(b + (8 * j + 2 * t + 1) * ldb + k);
      acc[j][0] += dot4(x0, y0);
      acc[j][1] += dot4(x0, y1);
      acc[j][2] += dot4(x1, y0);
      acc[j][3] += dot4(x1, y1);
    }
  }
}

// CUDA cores: P goes through this warp's 16 × (K + 4) float staging rows so every thread can read whole rows.
template <int NT, int KT>
FASTSEQ_DEVICE void gemm_rn_fma(float (&acc)[NT][4], const float (&p)[KT][4], float* stage, const float* b,
                                int ldb, int n_len) {
  constexpr int kLd = 8 * KT + 4;
  const int g = lane_id() >> 2, t = lane_id() & 3;
  sync_warp();  // the previous product's reads of the staging rows are done
#pragma unroll
  for (int kt = 0; kt < KT; ++kt) {
    stage[g * kLd + 8 * kt + 2 * t] = p[kt][0];
    stage[g * kLd + 8 * kt + 2 * t + 1] = p[kt][1];
    stage[(g + 8) * kLd + 8 * kt + 2 * t] = p[kt][2];
    stage[(g + 8) * kLd + 8 * kt + 2 * t + 1] = p[kt][3];
  }
  sync_warp();
  for (int k = 0; k < 8 * KT; k += 4) {
    const float4 x0 = *reinterpret_cast<const float4*>(stage + g * kLd + k);
    const float4 x1 = *reinterpret_cast<const float4*>(stage + (g + 8) * kLd + k);
    const float lo[4] = {x0.x, x0.y, x0.z, x0.w};
    const float hi[4] = {x1.x, x1.y, x1.z, x1.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float* row = b + (k + i) * ldb + 2 * t;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        if (8 * j < n_len) {
          const float2 y = *reinterpret_cast<const float2*>(row + 8 * j);
          acc[j][0] += lo[i] * y.x;
          acc[j][1] += lo[i] * y.y;
          acc[j][2] += hi[i] * y.x;
          acc[j][3] += hi[i] * y.y;
        }
      }
    }
  }
}

// The two products, for either element type. `stage`: the warp's float32 staging rows (CUDA-core path only).
template <typename T, int NT, int K>
FASTSEQ_DEVICE void gemm_nt(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb, int k_len) {
  if constexpr (kTensorCores<T>) {
    gemm_nt_mma<T, NT, K>(acc, a, lda, b, ldb, k_len);
  } else {
    gemm_nt_fma<NT>(acc, a, lda, b, ldb, k_len);
  }
}

template <typename T, int NT, int KT>
FASTSEQ_DEVICE void gemm_rn(float (&acc)[NT][4], const float (&p)[KT][4], const T* b, int ldb, int n_len,
                            float* stage) {
  if constexpr (kTensorCores<T>) {
    gemm_rn_mma<T, NT, KT>(acc, p, b, ldb, n_len);
  } else {
    gemm_rn_fma<NT, KT>(acc, p, stage, b, ldb, n_len);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Global ↔ shared tiles
// ---------------------------------------------------------------------------------------------------------

// rows [row0, row0 + ROWS) × cols [0, round16(n_cols)) of `src` (row stride rs, column stride cs) into the
// shared tile `dst` (row stride ld), as raw bits; rows past n_rows and columns past n_cols are zero, so the
// padded products read zeros. `vec`: 16-byte loads (see Operand::vec).
template <typename T, int ROWS, int THREADS>
FASTSEQ_DEVICE void load_tile(T* dst, int ld, const T* src, int64_t row0, int64_t n_rows, int64_t rs, int64_t cs,
                              int n_cols, bool vec) {
  using B = Bits<T>;
  constexpr int kVec = 16 / int(sizeof(T));
  const int chunks_per_row = (n_cols + 15) / 16 * (16 / kVec);
  const int chunks = ROWS * chunks_per_row;
  for (int c = thread_id(); c < chunks; c += THREADS) {
    const int r = c / chunks_per_row;
    const int col = (c - r * chunks_per_row) * kVec;
    B* d = reinterpret_cast<B*>(dst + r * ld + col);
    const int64_t row = row0 + r;
    if (row < n_rows && col < n_cols) {
      const T* s = src + row * rs;
      if (vec) {
        *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s + col);
      } else {
        const B* sb = reinterpret_cast<const B*>(s);
#pragma unroll
        for (int i = 0; i < kVec; ++i) d[i] = col + i < n_cols ? sb[(col + i) * cs] : B(0);
      }
    } else {
      *reinterpret_cast<uint4*>(d) = uint4{0u, 0u, 0u, 0u};
    }
  }
}

// `n` float32 values of a (B·H, L) row vector from `row0` into shared memory, `fill` past `n_rows`.
template <int N, int THREADS>
FASTSEQ_DEVICE void load_row_values(float* dst, const float* src, int64_t row0, int64_t n_rows, float fill) {
  for (int i = thread_id(); i < N; i += THREADS) dst[i] = row0 + i < n_rows ? src[row0 + i] : fill;
}

// Stores a warp's accumulator tile (16 rows from row_lo, 8·NT columns) times `mul` (per row half) as T,
// rounded to nearest-even, inside (n_rows, n_cols).
template <typename T, int NT>
FASTSEQ_DEVICE void store_fragments(T* base, int64_t rs, int64_t cs, int64_t row_lo, int64_t n_rows, int n_cols,
                                    const float (&acc)[NT][4], float mul_lo, float mul_hi) {
  const int g = lane_id() >> 2, t = lane_id() & 3;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = row_lo + g + (e >= 2 ? 8 : 0);
      const int col = 8 * j + 2 * t + (e & 1);
      if (row < n_rows && col < n_cols) base[row * rs + col * cs] = T(acc[j][e] * (e >= 2 ? mul_hi : mul_lo));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Scores: bias, online softmax helpers
// ---------------------------------------------------------------------------------------------------------

// The additive base-2 bias of score (i, j): −∞ where the pair does not take part (out of range, causality, a
// False bool-mask entry), log₂e · mask for a float mask, 0 elsewhere. `mask_bh`: the mask at this (batch,
// head). T: the input dtype (a float mask may be float32 or T).
template <typename T>
FASTSEQ_DEVICE float score_bias(const AttnArgs& a, const char* mask_bh, int64_t i, int64_t j) {
  if (i >= a.L || j >= a.S) return kNegInf;
  if (a.causal && j > i + a.diag) return kNegInf;
  if (a.mask_kind == kMaskNone) return 0.f;
  const int64_t off = i * a.mask.stride[2] + j * a.mask.stride[3];
  if (a.mask_kind == kMaskBool) return reinterpret_cast<const uint8_t*>(mask_bh)[off] ? 0.f : kNegInf;
  if (a.mask_kind == kMaskFloat32) return reinterpret_cast<const float*>(mask_bh)[off] * kLog2e;
  return to_float(reinterpret_cast<const T*>(mask_bh)[off]) * kLog2e;
}

// The mask base pointer at (batch b, query head h), as bytes.
FASTSEQ_DEVICE const char* mask_at(const AttnArgs& a, int64_t b, int64_t h) {
  const int64_t elem = a.mask_kind == kMaskBool ? 1 : a.mask_kind == kMaskFloat32 ? 4 : 2;
  return reinterpret_cast<const char*>(a.mask.ptr) + (b * a.mask.stride[0] + h * a.mask.stride[1]) * elem;
}

// A maximum that keeps NaN (so a NaN score makes its row NaN, as torch's math backend does, instead of being
// dropped by fmaxf and leaving the row looking empty).
FASTSEQ_DEVICE float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

FASTSEQ_DEVICE float quad_max(float v) {
  v = nan_max(v, shfl_xor(v, 1));
  return nan_max(v, shfl_xor(v, 2));
}

FASTSEQ_DEVICE float quad_sum(float v) {
  v += shfl_xor(v, 1);
  return v + shfl_xor(v, 2);
}

FASTSEQ_DEVICE float fast_exp2(float x) { return exp2f(x); }

// ---------------------------------------------------------------------------------------------------------
// Blocks: which rows and heads a block owns, base pointers, the mask vote over a tile
// ---------------------------------------------------------------------------------------------------------

// `op`'s (batch b, head h) as T, where a row-major (row, column) matrix starts.
template <typename T>
FASTSEQ_DEVICE const T* head_at(const Operand& op, int64_t b, int64_t h) {
  return static_cast<const T*>(op.ptr) + b * op.stride[0] + h * op.stride[1];
}

// The block of BM query rows of one (batch, head) that the forward and dQ kernels own: blockIdx.x enumerates
// the row blocks of a head together, the heaviest (causal: last) first; warp w owns rows row0 + g, + 8.
struct RowBlock {
  int bh;
  int64_t b, h, m0, row0, row_lo, row_hi;
  bool warp_active;  // some of the warp's 16 rows are < L
};

template <int BM>
FASTSEQ_DEVICE RowBlock row_block(const AttnArgs& a) {
  RowBlock r;
  const int m_blocks = int(ceil_div(a.L, BM));
  r.bh = block_x() / m_blocks;
  const int m_block = m_blocks - 1 - (block_x() - r.bh * m_blocks);
  r.b = r.bh / a.H;
  r.h = r.bh % a.H;
  r.m0 = int64_t(m_block) * BM;
  r.row0 = r.m0 + 16 * warp_id();
  r.row_lo = r.row0 + (lane_id() >> 2);
  r.row_hi = r.row_lo + 8;
  r.warp_active = r.row0 < a.L;
  return r;
}

// One past the last key any row m0 … m0 + BM − 1 may see (keys j ≤ i + diag under causality).
FASTSEQ_DEVICE int64_t causal_key_end(const AttnArgs& a, int64_t m0, int BM) {
  return a.causal ? max_i64(min_i64(a.S, m0 + BM + a.diag), 0) : a.S;
}

// Whether any pair of this thread's fragment elements of a score tile takes part. Rows-as-queries (forward,
// dQ): element e of n-tile j is (query row_lo + 8·(e / 2), key n0 + 8j + 2t + e % 2). Transposed (dK/dV):
// (key row_lo + 8·(e / 2), query n0 + 8j + 2t + e % 2). The block ORs the answers (sync_block_or) to skip a
// tile no pair of which takes part.
template <typename T, int NT, bool kTransposed>
FASTSEQ_DEVICE bool any_live(const AttnArgs& a, const char* mask_bh, int64_t row_lo, int64_t n0) {
  const int t = lane_id() & 3;
  bool live = false;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t r = row_lo + (e >= 2 ? 8 : 0), c = n0 + 8 * j + 2 * t + (e & 1);
      live |= (kTransposed ? score_bias<T>(a, mask_bh, c, r) : score_bias<T>(a, mask_bh, r, c)) != kNegInf;
    }
  return live;
}

// ---------------------------------------------------------------------------------------------------------
// Dropout: Philox-4x32-10 exactly as Triton's tl.philox (kernels/attention.py, _keep): key (seed low, seed
// high), counter (key // 4, query row, batch·head, stream); its four outputs are keys 4·(key // 4) + 0…3; a
// key is kept when uniform(output) ≥ p, with Triton's uint_to_uniform_float.
// ---------------------------------------------------------------------------------------------------------

struct Philox4 {
  uint32_t x[4];
};

FASTSEQ_DEVICE Philox4 philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = uint32_t(seed & 0xffffffffu), k1 = uint32_t(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = mul_hi(0xCD9E8D57u, old2) ^ c1 ^ k0;
    c2 = mul_hi(0xD2511F53u, old0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old2;
    c3 = 0xD2511F53u * old0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// uniform in [0, 1) from 32 random bits, as Triton: as int32, negatives folded (−x − 1), times (2²³−1)/2⁵⁴.
FASTSEQ_DEVICE bool kept(uint32_t bits, float p_drop) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f >= p_drop;
}

struct DropoutKey {
  uint64_t seed = 0;
  uint32_t stream = 0;
};

FASTSEQ_DEVICE DropoutKey dropout_key(const AttnArgs& a) {
  if (!a.dropout) return DropoutKey{};
  return DropoutKey{static_cast<uint64_t>(a.seed[0]), static_cast<uint32_t>(a.seed[1])};
}

FASTSEQ_DEVICE Philox4 philox_group(const DropoutKey& key, int64_t group, int64_t row, int bh) {
  return philox(key.seed, uint32_t(group), uint32_t(row), uint32_t(bh), key.stream);
}

// Row-major fragments (rows = queries, cols = keys; forward and dQ): which of this thread's 4·NT elements of
// the tile at key n0 are kept. Lanes t and t ^ 1 need the same key group (keys 8j + 4·(t / 2) …) for rows g and
// g + 8: each draws one of the two rows and the other comes by one shuffle.
template <int NT>
FASTSEQ_DEVICE void keep_rows(bool (&keep)[NT][4], const DropoutKey& key, float p_drop, int bh, int64_t row_lo,
                              int64_t n0) {
  const int t = lane_id() & 3;
  const bool odd = t & 1;
  const int64_t row = row_lo + (odd ? 8 : 0);  // this lane draws row g (even t) or g + 8 (odd t)
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const Philox4 r = philox_group(key, (n0 + 8 * j) / 4 + t / 2, row, bh);
    // keys 2·(t % 2) + {0, 1} of the group are this lane's, in both rows
    const uint32_t own0 = odd ? r.x[2] : r.x[0], own1 = odd ? r.x[3] : r.x[1];
    const uint32_t other0 = shfl_xor(odd ? r.x[0] : r.x[2], 1), other1 = shfl_xor(odd ? r.x[1] : r.x[3], 1);
    const bool a0 = kept(own0, p_drop), a1 = kept(own1, p_drop);
    const bool b0 = kept(other0, p_drop), b1 = kept(other1, p_drop);
    keep[j][0] = odd ? b0 : a0;  // row g
    keep[j][1] = odd ? b1 : a1;
    keep[j][2] = odd ? a0 : b0;  // row g + 8
    keep[j][3] = odd ? a1 : b1;
  }
}

FASTSEQ_DEVICE uint32_t select4(const Philox4& r, int i) {
  return i == 0 ? r.x[0] : i == 1 ? r.x[1] : i == 2 ? r.x[2] : r.x[3];
}

// Transposed fragments (rows = keys from key_lo, cols = queries; the dK/dV kernel): element e of n-tile j is
// (key g + 8·(e / 2), query 8j + 2t + e % 2). The four lanes g = 4u' + u (u = 0…3) share the key groups of
// keys g and g + 8: lane u draws combination u = (query offset e % 2, key half e / 2) and a 4 × 4 exchange
// (xor 4, 8, 12 lanes) hands every lane its own key of each combination.
template <int NT>
FASTSEQ_DEVICE void keep_cols(bool (&keep)[NT][4], const DropoutKey& key, float p_drop, int bh, int64_t key_lo,
                              int64_t m0) {
  const int g = lane_id() >> 2, t = lane_id() & 3;
  const int u = g & 3;
  const int64_t group = (key_lo + g - u) / 4 + 2 * (u >> 1);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const Philox4 r = philox_group(key, group, m0 + 8 * j + 2 * t + (u & 1), bh);
#pragma unroll
    for (int d = 0; d < 4; ++d) {
      // the partner lane (u ^ d) drew combination u ^ d and needs my combination's value for its key, u ^ d;
      // d = 0 is my own draw
      const uint32_t mine = select4(r, u ^ d);
      const bool k = kept(d == 0 ? mine : shfl_xor(mine, 4 * d), p_drop);
      // element u ^ d, by selects (a register array indexed at run time would go to local memory)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (e == (u ^ d)) keep[j][e] = k;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Launches (the launch functions at the end of attention_fwd.cu and attention_bwd.cu)
// ---------------------------------------------------------------------------------------------------------

#ifdef FASTSEQ_CUDA_EMULATION
using emu::dim3;
// A kernel pointer (no template commas inside the macro), its grid, threads, dynamic shared bytes, stream,
// arguments; on the emulator the stream is ignored and the kernel runs to its end (its errors throw).
#define FASTSEQ_LAUNCH(kernel, grid, threads, smem, stream, ...) \
  ::emu::launch((grid), (threads), (smem), [&] { kernel(__VA_ARGS__); })
#else
// ... in the enclosing launch function, which returns the launch's error if there is one.
#define FASTSEQ_LAUNCH(kernel, grid, threads, smem, stream, ...)                        \
  do {                                                                                  \
    kernel<<<(grid), (threads), (smem), (stream)>>>(__VA_ARGS__);                       \
    const cudaError_t fastseq_launch_error = cudaGetLastError();                        \
    if (fastseq_launch_error != cudaSuccess) return fastseq_launch_error;               \
  } while (0)
#endif

// Lets `kernel` take `bytes` of dynamic shared memory (above 48 KiB a kernel must opt in); the operators have
// checked the device's limit.
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
#ifdef FASTSEQ_CUDA_EMULATION
  (void)kernel;
  (void)bytes;
#else
  if (bytes > 48 * 1024) return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
#endif
  return cudaSuccess;
}

}  // namespace attn
}  // namespace fastseq
