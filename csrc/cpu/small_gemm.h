// Small-M float32 GEMM for the recurrences and the cells: a few rows (a batch of states or inputs, M ≲ 16)
// against a whole weight matrix, as torch stores it (N × K, row-major: "A·Wᵀ").
//
//   gemm_nt:  C[m, n] (+)= Σ_s Σ_k A_s[m, k] · W_s[n, k]     (one or two operand pairs s summed into one output)
//
// Why our own: for such shapes the product is bound by reading W once (4·N·K bytes), and every row of A must use
// each element of W while it is in a register. ATen's paths (MKL sgemm, oneDNN brgemm) are tuned for large M: on
// an AMD EPYC (Zen 3, torch 2.13) 1×128 · 128×512 took ~10 µs through at::mm, 3× the time its 256 KiB of W take
// to stream from L2, and up to 16 rows this kernel measured 1.4-3.8× faster than at::mm (benchmarks/NOTES_cpu.md).
// W is read as stored, so nothing is packed or transposed per call.
//
// Blocking. W's rows are taken in blocks of 24; inside a block, A's rows in tiles of MR ≤ 4 against NR W rows
// (MR·NR ≤ 12 vector accumulators, MR = 1 → NR = 8, 2 → 6, 3 → 4, 4 → 3), so the 24 rows of W (24·K·4 bytes)
// stay in L1/L2 while every tile of A passes over them. The k loop runs in vectors of V lanes (per ISA: 4
// baseline SSE2, 8 AVX2+FMA, 16 AVX-512), K % V leftover columns in scalar; a W row past N (the last block) reads
// row N − 1 again and its results are dropped, so every tile is full and the loops unroll.
//
// Determinism. Every output is one dot product of the same shape, whatever M, the tile it lands in or the thread
// that runs it: lane l sums k ≡ l (mod V) in increasing k (segment after segment), then the lanes are folded
// pairwise (halves added, V → 1), then the scalar leftover is added, then C's old value (accumulate). So results
// are bitwise independent of the batch size, the row's position in the batch and the number of threads; they
// depend on the ISA only (lane count, FMA contraction).
//
// Run-time ISA choice: the same template is compiled per ISA with __attribute__((target)) (GCC and clang on
// x86-64) and the widest one the CPU has is picked once; tests force each one (Isa). No -march flags: one build
// runs on every x86-64. Other compilers and architectures get the generic vector code at the compiler's
// baseline. This header is plain C++ (no ATen): rnn_common.h adds the threading.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastseq {
namespace cpu {
namespace small_gemm {

// The code paths. `avx2_w16` runs the 16-lane (AVX-512) blocking with AVX2 instructions: it exists so that the
// AVX-512 path's logic (tails, lane folding) is tested on machines without AVX-512.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2, avx2_w16 = 3 };

// One operand pair of a product: rows of A (M × k, row stride lda) against rows of W (N × k, row stride ldw),
// unit column stride for both.
struct NtOperand {
  const float* a;
  int64_t lda;
  const float* w;
  int64_t ldw;
  int64_t k;
};

// Rows of W are taken in blocks of this many; callers splitting N across threads split at multiples of it.
constexpr int64_t kRowBlock = 24;

#if defined(__GNUC__) || defined(__clang__)
#define FASTSEQ_GEMM_INLINE inline __attribute__((always_inline))
#else
#define FASTSEQ_GEMM_INLINE __forceinline
#endif

namespace detail {

#if defined(__GNUC__) || defined(__clang__)

template <int V>
struct Lanes {
  typedef float type __attribute__((vector_size(V * sizeof(float))));
  // What an unaligned load reads through (aligned(4)) without breaking strict aliasing (may_alias).
  typedef float unaligned __attribute__((vector_size(V * sizeof(float)), aligned(4), __may_alias__));
};
template <int V>
using vec = typename Lanes<V>::type;

// The V floats at p, as a vector. An expression, not a memcpy into a local: GCC keeps the tile's accumulators in
// registers only when no local vector has its address taken.
template <int V>
FASTSEQ_GEMM_INLINE const typename Lanes<V>::unaligned& at(const float* p) {
  return *reinterpret_cast<const typename Lanes<V>::unaligned*>(p);
}

// Σ lanes, folding halves: (v[0:V/2] + v[V/2:V]) and so on down to two lanes.
template <int V>
FASTSEQ_GEMM_INLINE float lane_sum(const vec<V>& v) {
  if constexpr (V == 2) {
    return v[0] + v[1];
  } else {
    vec<V / 2> lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return lane_sum<V / 2>(lo + hi);
  }
}

// One tile: MR rows of A (row indices m_idx) against NR rows of W (row indices n_idx), every operand pair summed.
// out[i][r] = the dot product of A row m_idx[i] with W row n_idx[r].
template <int V, int MR, int NR>
FASTSEQ_GEMM_INLINE void nt_tile(const NtOperand* ops, int n_ops, const int64_t* m_idx, const int64_t* n_idx,
                                 float out[MR][NR]) {
  vec<V> acc[MR][NR];
  float tail[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; ++r) {
      acc[i][r] = vec<V>{};
      tail[i][r] = 0.0f;
    }
  }
  for (int s = 0; s < n_ops; ++s) {
    const NtOperand& o = ops[s];
    const float* a[MR];
    const float* w[NR];
    for (int i = 0; i < MR; ++i) a[i] = o.a + m_idx[i] * o.lda;
    for (int r = 0; r < NR; ++r) w[r] = o.w + n_idx[r] * o.ldw;
    const int64_t k_vec = o.k - o.k % V;
    for (int64_t k = 0; k < k_vec; k += V) {
      for (int i = 0; i < MR; ++i) {
        const vec<V> av = at<V>(a[i] + k);
        for (int r = 0; r < NR; ++r) acc[i][r] += av * at<V>(w[r] + k);
      }
    }
    // std::fma, not a·w + t: whether the compiler contracts a product and a sum into an FMA may differ from one
    // tile shape to another (it vectorises some of these loops), and every tile must round alike.
    for (int64_t k = k_vec; k < o.k; ++k) {
      for (int r = 0; r < NR; ++r) {
        for (int i = 0; i < MR; ++i) tail[i][r] = std::fma(a[i][k], w[r][k], tail[i][r]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; ++r) out[i][r] = lane_sum<V>(acc[i][r]) + tail[i][r];
  }
}

#else  // no vector extensions: the same order of operations, one lane at a time

template <int V, int MR, int NR>
FASTSEQ_GEMM_INLINE void nt_tile(const NtOperand* ops, int n_ops, const int64_t* m_idx, const int64_t* n_idx,
                                 float out[MR][NR]) {
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; ++r) {
      float lanes[V] = {};
      float tail = 0.0f;
      for (int s = 0; s < n_ops; ++s) {
        const NtOperand& o = ops[s];
        const float* a = o.a + m_idx[i] * o.lda;
        const float* w = o.w + n_idx[r] * o.ldw;
        const int64_t k_vec = o.k - o.k % V;
        for (int64_t k = 0; k < k_vec; ++k) lanes[k % V] += a[k] * w[k];
        for (int64_t k = k_vec; k < o.k; ++k) tail = std::fma(a[k], w[k], tail);
      }
      for (int width = V / 2; width >= 1; width /= 2) {
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      }
      out[i][r] = lanes[0] + tail;
    }
  }
}

#endif

// The tiles of A's rows [0, M) against W rows [n0, n1) (n1 − n0 ≤ kRowBlock; rows past n_last read n_last).
template <int V, int MR, int NR>
FASTSEQ_GEMM_INLINE void nt_row_tiles(const NtOperand* ops, int n_ops, int64_t m0, int64_t n0, int64_t n1,
                                      int64_t n_last, float* C, int64_t ldc, bool accumulate) {
  int64_t m_idx[MR];
  for (int i = 0; i < MR; ++i) m_idx[i] = m0 + i;
  for (int64_t nb = n0; nb < n1; nb += NR) {
    int64_t n_idx[NR];
    for (int r = 0; r < NR; ++r) n_idx[r] = std::min(nb + r, n_last);
    float out[MR][NR];
    nt_tile<V, MR, NR>(ops, n_ops, m_idx, n_idx, out);
    const int valid = static_cast<int>(std::min<int64_t>(NR, n1 - nb));
    for (int i = 0; i < MR; ++i) {
      float* c = C + (m0 + i) * ldc + nb;
      for (int r = 0; r < valid; ++r) c[r] = accumulate ? c[r] + out[i][r] : out[i][r];
    }
  }
}

// C[:, n_begin:n_end] of Σ_s A_s · W_sᵀ for all M rows, one ISA (V lanes).
template <int V>
FASTSEQ_GEMM_INLINE void gemm_nt_lanes(int64_t M, int64_t n_begin, int64_t n_end, const NtOperand* ops, int n_ops,
                                       float* C, int64_t ldc, bool accumulate) {
  const int64_t n_last = n_end - 1;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kRowBlock) {
    const int64_t n1 = std::min(n0 + kRowBlock, n_end);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) nt_row_tiles<V, 4, 3>(ops, n_ops, m, n0, n1, n_last, C, ldc, accumulate);
    switch (M - m) {
      case 3: nt_row_tiles<V, 3, 4>(ops, n_ops, m, n0, n1, n_last, C, ldc, accumulate); break;
      case 2: nt_row_tiles<V, 2, 6>(ops, n_ops, m, n0, n1, n_last, C, ldc, accumulate); break;
      case 1: nt_row_tiles<V, 1, 8>(ops, n_ops, m, n0, n1, n_last, C, ldc, accumulate); break;
      default: break;
    }
  }
}

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(_M_X64))
#define FASTSEQ_GEMM_X86 1
__attribute__((target("avx2,fma"))) inline void gemm_nt_avx2(int64_t M, int64_t n0, int64_t n1, const NtOperand* ops,
                                                             int n_ops, float* C, int64_t ldc, bool acc) {
  gemm_nt_lanes<8>(M, n0, n1, ops, n_ops, C, ldc, acc);
}
__attribute__((target("avx2,fma"))) inline void gemm_nt_avx2_w16(int64_t M, int64_t n0, int64_t n1,
                                                                 const NtOperand* ops, int n_ops, float* C,
                                                                 int64_t ldc, bool acc) {
  gemm_nt_lanes<16>(M, n0, n1, ops, n_ops, C, ldc, acc);
}
__attribute__((target("avx512f,fma"))) inline void gemm_nt_avx512(int64_t M, int64_t n0, int64_t n1,
                                                                  const NtOperand* ops, int n_ops, float* C,
                                                                  int64_t ldc, bool acc) {
  gemm_nt_lanes<16>(M, n0, n1, ops, n_ops, C, ldc, acc);
}
#endif

inline void gemm_nt_baseline(int64_t M, int64_t n0, int64_t n1, const NtOperand* ops, int n_ops, float* C,
                             int64_t ldc, bool acc) {
  gemm_nt_lanes<4>(M, n0, n1, ops, n_ops, C, ldc, acc);
}

}  // namespace detail

// Whether this CPU (and this build) runs a code path.
inline bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::baseline:
      return true;
#ifdef FASTSEQ_GEMM_X86
    case Isa::avx2:
    case Isa::avx2_w16:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
#endif
    default:
      return false;
  }
}

// The widest path this CPU runs, decided once.
inline Isa best_isa() {
  static const Isa best = isa_supported(Isa::avx512) ? Isa::avx512
                          : isa_supported(Isa::avx2) ? Isa::avx2
                                                     : Isa::baseline;
  return best;
}

// C[m, n] (+)= Σ_s Σ_k ops[s].a[m, k] · ops[s].w[n, k] for m < M and n in [n_begin, n_end), on path `isa`
// (which must be supported). C: row stride ldc, unit column stride, not overlapping the operands.
inline void gemm_nt(Isa isa, int64_t M, int64_t n_begin, int64_t n_end, const NtOperand* ops, int n_ops, float* C,
                    int64_t ldc, bool accumulate) {
  if (M <= 0 || n_end <= n_begin) return;
  switch (isa) {
#ifdef FASTSEQ_GEMM_X86
    case Isa::avx512:
      return detail::gemm_nt_avx512(M, n_begin, n_end, ops, n_ops, C, ldc, accumulate);
    case Isa::avx2:
      return detail::gemm_nt_avx2(M, n_begin, n_end, ops, n_ops, C, ldc, accumulate);
    case Isa::avx2_w16:
      return detail::gemm_nt_avx2_w16(M, n_begin, n_end, ops, n_ops, C, ldc, accumulate);
#endif
    default:
      return detail::gemm_nt_baseline(M, n_begin, n_end, ops, n_ops, C, ldc, accumulate);
  }
}

}  // namespace small_gemm
}  // namespace cpu
}  // namespace fastseq
