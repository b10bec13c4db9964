// Shared pieces of the C++ CPU kernels of the recurrent cells (rnn_cells.cpp) and layers (rnn_layers.cpp): the
// pointwise math, dtype handling, the per-step GEMM and the work split.
//
// Pointwise math: csrc/rnn_pointwise.h (σ, tanh and their slopes from the pre-activations, Cephes' expf), shared
// with the CUDA kernels so that both backends round alike.
//
// dtypes. Inputs of float32, float16 or bfloat16 are converted to float32 (whole tensors, once per call, by ATen);
// all math, every state and every workspace is float32, and the kernels' loops see float32 only (which is what
// lets them vectorise); float16/bfloat16 outputs are rounded to nearest (ties to even) once, at the end, by
// ATen's copy_.

#pragma once

#include "small_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include "../rnn_pointwise.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

// The pointwise math must inline into the per-unit loops (FASTSEQ_INLINE), or they do not vectorise.
// The per-unit loops of one row are functions of their own (FASTSEQ_ROW) taking __restrict pointers: inlined into
// the parallel lambdas GCC loses track of the pointers' independence and leaves some loops scalar. The extension
// is compiled for the baseline ISA (x86-64: SSE2), where these loops run at ~18 ns per LSTM unit; with GCC on
// x86-64 Linux each row function is also compiled for AVX2 (~5 ns) and AVX-512 (~2 ns), and the dynamic loader
// picks the copy the CPU runs (target_clones, an ifunc): one build, fast on every machine, safe on old ones.
#if defined(__GNUC__) || defined(__clang__)
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && !defined(FASTSEQ_NO_ISA_CLONES)
#define FASTSEQ_ROW __attribute__((noinline, target_clones("avx512f", "avx2", "default")))
#else
#define FASTSEQ_ROW __attribute__((noinline))
#endif
#else
#define FASTSEQ_ROW __declspec(noinline)
#endif

namespace fastseq {
namespace cpu {

// ---------------------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------------------

inline void check_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              name, ": the C++ kernels take float32, float16 or bfloat16 tensors, got ", dt);
  TORCH_CHECK(t.device().is_cpu(), name, ": the C++ kernels take CPU tensors, got a tensor on ", t.device());
}

// float32 copy (or the tensor itself when already float32), any strides: a GEMM operand.
inline at::Tensor as_f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// float32 and contiguous (copies only what is not): what the pointwise loops read.
inline at::Tensor f32_contiguous(const at::Tensor& t) {
  return as_f32(t).contiguous();
}

// The tensor itself when its last dimension has unit stride (what the kernels index rows of), else a contiguous
// copy.
inline at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// The row functions take every output column as a pointer of its own: columns of one array at offsets of H are,
// to the vectoriser, stores that may overlap (H is not known at compile time), and past a few of them it falls
// back to scalar code (10× slower). Cols(row, H, n).c[k] = row + k·H for k < n (nullptr rows give nullptrs).
struct Cols {
  float* c[8];
  Cols(float* row, int64_t H, int n) {
    for (int k = 0; k < 8; ++k) c[k] = row != nullptr && k < n ? row + k * H : nullptr;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Work split
// ---------------------------------------------------------------------------------------------------------

// at::parallel_for over rows [0, n) of a pointwise update touching `per_row` elements per row: one thread
// below about 16K elements (a parallel region costs more than that much work), else chunks of rows.
template <typename F>
inline void for_rows(int64_t n, int64_t per_row, const F& f) {
  if (n <= 0) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b);
  });
}

// Per-step products of the layers: C (M×N, row stride ldc) = A (M×K, row stride lda) · B (K×N, row-major, ldb),
// or C += A·B, float32. Through ATen's batch-reduce GEMM (at::native::cpublas::brgemm: oneDNN's JIT micro-kernels,
// cached per shape; ATen falls back to its BLAS gemm where oneDNN's ukernels are unavailable): for the skinny
// products of a recurrence (a few rows against a whole weight matrix, every step) it ran twice as fast as at::mm's
// BLAS path where measured (8×256 · 256×1024: 24 µs against 48 µs, one thread, AMD EPYC, torch 2.13 with MKL).
// Past ~256K multiply-adds the columns of C are split across torch's intra-op threads, each thread's slice of B
// then staying in its own core's cache from step to step.
inline void gemm_block(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                       float* C, int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
#else  // a torch without ATen's float32 brgemm: its BLAS path on views of the same memory
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, f32);
  const at::Tensor b = at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, f32);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, f32);
  if (accumulate) {
    at::cpu::addmm_(c, a, b);
  } else {
    at::cpu::mm_out(c, a, b);
  }
#endif
}

inline void step_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    }
    return;
  }
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), N / 64);
  if (chunks < 2 || M * N * K < (int64_t{1} << 18) || at::in_parallel_region()) {
    gemm_block(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t n0 = c == 0 ? 0 : (N * c / chunks) & ~int64_t{15};
      const int64_t n1 = c + 1 == chunks ? N : (N * (c + 1) / chunks) & ~int64_t{15};
      gemm_block(M, n1 - n0, K, A, lda, B + n0, ldb, C + n0, ldc, accumulate);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Small-M products against weights as torch stores them (small_gemm.h)
// ---------------------------------------------------------------------------------------------------------

// Up to this many rows the small-M kernel computes A·Wᵀ instead of ATen's GEMM (it reads W once for all rows; past
// a few dozen rows ATen's blocked GEMMs, which re-use A from registers too, catch up: benchmarks/NOTES_cpu.md).
constexpr int64_t kSmallGemmMaxRows = 16;

// Below this many multiply-adds (~30 µs of one core) a product runs on one thread: a parallel region costs a few
// µs on an idle machine, and much more where the other thread is busy.
constexpr int64_t kParallelGemmMinWork = int64_t{1} << 20;

using small_gemm::NtOperand;

// An operand of the small-M kernel from a 2-D float32 tensor with unit column stride.
inline NtOperand nt_operand(const at::Tensor& a, const at::Tensor& w) {
  return {a.data_ptr<float>(), a.stride(0), w.data_ptr<float>(), w.stride(0), a.size(1)};
}

// C (M × N, row stride ldc) (+)= Σ_s A_s·W_sᵀ on the widest ISA the CPU has. Past kParallelGemmMinWork the rows
// of W (columns of C) are split across torch's intra-op threads at multiples of the kernel's row block; each
// output is computed the same way whatever the split (small_gemm.h), so results do not depend on the threads.
inline void gemm_nt(int64_t M, int64_t N, const NtOperand* ops, int n_ops, float* C, int64_t ldc, bool accumulate) {
  const small_gemm::Isa isa = small_gemm::best_isa();
  int64_t k_total = 0;
  for (int s = 0; s < n_ops; ++s) k_total += ops[s].k;
  const int64_t blocks = (N + small_gemm::kRowBlock - 1) / small_gemm::kRowBlock;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), blocks);
  if (chunks < 2 || M * N * k_total < kParallelGemmMinWork || at::in_parallel_region()) {
    small_gemm::gemm_nt(isa, M, 0, N, ops, n_ops, C, ldc, accumulate);
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t n0 = blocks * c / chunks * small_gemm::kRowBlock;
      const int64_t n1 = std::min(N, blocks * (c + 1) / chunks * small_gemm::kRowBlock);
      small_gemm::gemm_nt(isa, M, n0, n1, ops, n_ops, C, ldc, accumulate);
    }
  });
}

// Calls f(std::bool_constant<a>, std::bool_constant<b>): two runtime flags as template arguments.
template <typename F>
inline void with_flags(bool a, bool b, const F& f) {
  if (a) {
    if (b) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (b) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

inline bool is_relu(const std::string& nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", "Unknown nonlinearity: ", nonlinearity,
              ". Expected 'tanh' or 'relu'");
  return nonlinearity == "relu";
}

}  // namespace cpu
}  // namespace fastseq
