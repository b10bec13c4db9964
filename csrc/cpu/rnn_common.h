// Shared pieces of the C++ CPU kernels of the recurrent cells (rnn_cells.cpp) and layers (rnn_layers.cpp): the
// pointwise math, dtype handling, the per-step GEMM and the work split.
//
// Pointwise math. Every gate nonlinearity and its slope is computed from the float32 *pre-activation*, as the
// Triton kernels do (kernels/rnn_cell.py): σ(a) and σ'(a) = e/(1 + e)² with e = exp(−|a|), tanh'(a) =
// 4e/(1 + e)² with e = exp(−2|a|), so there is no cancellation of 1 − y² or σ(1 − σ) near saturation; tanh is
// Cephes' odd polynomial for |x| < 0.625 and 1 − 2/(e^{2|x|} + 1) beyond (the Triton kernels' formula, so the
// two backends round alike). exp is Cephes' expf (range reduction by ln 2, a degree-5 polynomial, ~1 ulp),
// written without calls or branches (selects only: with -fno-trapping-math, see setup.py, they stay selects) so
// that the per-unit loops vectorise; it flushes results below 2⁻¹²⁶ to 0 and keeps NaN and ±inf. Measured
// against float64: exp ≤ 1.4 ulp, tanh ≤ 2.3 ulp, σ ≤ 3.3 ulp, σ' and tanh' ≤ 5.3 ulp.
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
#define FASTSEQ_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && !defined(FASTSEQ_NO_ISA_CLONES)
#define FASTSEQ_ROW __attribute__((noinline, target_clones("avx512f", "avx2", "default")))
#else
#define FASTSEQ_ROW __attribute__((noinline))
#endif
#else
#define FASTSEQ_INLINE __forceinline
#define FASTSEQ_ROW __declspec(noinline)
#endif

namespace fastseq {
namespace cpu {

// ---------------------------------------------------------------------------------------------------------
// Pointwise math (float32)
// ---------------------------------------------------------------------------------------------------------

FASTSEQ_INLINE float bits_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// e^x. Cephes' expf: x = n·ln2 + r with |r| ≤ ln2/2, e^r ≈ 1 + r + r²·p(r), times 2^n built in the exponent
// bits. Below ln(2⁻¹²⁶) the result is 0; above ln(FLT_MAX) it is +inf; NaN stays NaN.
FASTSEQ_INLINE float exp_f32(float x) {
  const float hi = 88.72283935546875f;
  const float lo = -87.33654785156250f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  xc = x == x ? xc : 0.0f;  // NaN: a harmless argument here, NaN restored below
  float fx = xc * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest integer (|fx| < 2²²)
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);  // in [-126, 128]; 128 gives the bits of +inf
  const float y = p * bits_as_float(static_cast<uint32_t>(n + 127) << 23);
  float out = x < lo ? 0.0f : y;
  out = x > hi ? std::numeric_limits<float>::infinity() : out;
  return x == x ? out : x;
}

// σ(a) and σ'(a) = e/(1 + e)², e = exp(−|a|): no overflow, no cancellation near saturation.
FASTSEQ_INLINE void sigmoid_and_grad(float a, float& s, float& ds) {
  const float e = exp_f32(-std::fabs(a));
  const float d = 1.0f / (1.0f + e);
  const float ed = e * d;  // both sides computed: a select, not a branch, so the loops vectorise
  s = a >= 0.0f ? d : ed;
  ds = ed * d;
}

FASTSEQ_INLINE float sigmoid_f32(float a) {
  const float e = exp_f32(-std::fabs(a));
  const float d = 1.0f / (1.0f + e);
  const float ed = e * d;
  return a >= 0.0f ? d : ed;
}

// tanh'(a) = 4e/(1 + e)², e = exp(−2|a|): exact to rounding even where tanh(a) ≈ ±1.
FASTSEQ_INLINE float tanh_grad_f32(float a) {
  const float e = exp_f32(-2.0f * std::fabs(a));
  const float d = 1.0f / (1.0f + e);
  return 4.0f * e * d * d;
}

// tanh: |x| < 0.625 an odd minimax polynomial (Cephes' tanhf, ~1 ulp); beyond 1 − 2/(e^{2|x|} + 1), which
// neither overflows nor cancels badly. NaN falls through both branches.
FASTSEQ_INLINE float tanh_f32(float x) {
  const float ax = std::fabs(x);
  const float z = ax * ax;
  const float p = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                    1.33314422036e-1f) * z - 3.33332819422e-1f);
  const float small = ax + ax * z * p;
  const float big = 1.0f - 2.0f / (exp_f32(2.0f * ax) + 1.0f);
  const float t = ax < 0.625f ? small : big;
  return x < 0.0f ? -t : t;
}

// torch.relu: NaN propagates (not std::max).
FASTSEQ_INLINE float relu_f32(float a) { return a < 0.0f ? 0.0f : a; }

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
