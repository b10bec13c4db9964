// Device code shared by the CUDA kernels of the recurrent cells (rnn_cells.cu) and layers (rnn_persistent.cu,
// rnn_steps.cu): dtypes, tile loads, the gate math per element, and the block product. Only .cu files include it
// (rnn_kernels.h has what the host code shares with them).
//
// The block product. Every kernel here multiplies a few rows of activations by a slice of a weight matrix:
// out[r][c] = Σ_k A[r][k]·Wt[c][k] for r < 16 rows (a "row pass"), c < C columns of the block's slice, k < K. Both
// operands sit in shared memory with k contiguous (A in chunks of KC columns, streamed; Wt either streamed in the
// same chunks or resident for a whole sequence). Accumulation is float32 in registers across the chunks; at the
// end each warp writes its partial sums to shared memory and the pointwise phase adds them up.
//
// - float16 / bfloat16: tensor cores through WMMA (16×16×16 fragments: mma.sync HMMA on sm_80 and sm_90). The
//   C columns are ⌈C/16⌉ column tiles; with fewer tiles than the 8 warps, the warps also split the k steps of a
//   chunk (KS = 8 / tiles slices), which is what keeps a skinny product (one row tile, two column tiles) from
//   leaving six warps idle.
// - float32: CUDA-core FMAs in IEEE float32 (no TF32: torch's float32 products are not TF32 by default, and the
//   error must stay within twice torch's). Lane l of a warp owns column 16·group + l % 16 and all 16 rows; a
//   float4 of its Wt row is reused for every row, while the float4 of A's row is a broadcast to a half-warp. The
//   warps split ⌈C/16⌉ column groups and 8 / groups slices of k, each halved between the two half-warps. Rows past
//   the pass's last one are skipped by a warp-uniform branch, so a batch of one costs one row, not sixteen.
//
// Every kernel runs 256 threads (8 warps). Shared-memory strides are padded so that the WMMA loads stay 32-byte
// aligned (half: multiples of 8 elements) and the float4 loads of 8 consecutive Wt rows hit distinct banks
// (float32: stride ≡ 4 mod 32 words). A product has at most kMaxCols = 128 columns (8 column tiles of 16).

#pragma once

#include <c10/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../rnn_pointwise.h"
#include "rnn_kernels.h"

namespace fastseq {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------
// dtypes: float32, and float16 / bfloat16 as CUDA's __half / __nv_bfloat16
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// float32 → T, rounding to nearest (ties to even); NaN and ±inf keep their class.
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A load that bypasses L1 (ld.global.cg): for buffers other blocks of the same launch write between grid-wide
// barriers, never served from a stale L1 line nor from the non-coherent read-only path.
template <typename T>
__device__ __forceinline__ T load_shared_global(const T* p) {
  return __ldcg(p);
}

// Calls f(std::integral_constant<Kind, K>{}) for the runtime `kind`: the Kind argument of a kernel template.
template <typename F>
void with_kind(Kind kind, const F& f) {
  switch (kind) {
    case Kind::lstm: f(std::integral_constant<Kind, Kind::lstm>{}); break;
    case Kind::gru: f(std::integral_constant<Kind, Kind::gru>{}); break;
    default: f(std::integral_constant<Kind, Kind::rnn>{});
  }
}

// M(T) for each dtype the kernels take: their explicit instantiations.
#define FASTSEQ_FOR_EACH_DTYPE(M) M(float) M(__half) M(__nv_bfloat16)

// A kernel launch's own error (bad configuration), reported with the kernel's name.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "fastseq CUDA kernel ", kernel, " failed to launch: ", cudaGetErrorString(err));
}

// ---------------------------------------------------------------------------------------------------------
// Gate math per element (float32; csrc/rnn_pointwise.h), the formulas of the CPU and Triton kernels
// ---------------------------------------------------------------------------------------------------------

// LSTM: c' = σ(a_f)·c + σ(a_i)·tanh(a_g), m = σ(a_o)·tanh(c').
__device__ __forceinline__ void lstm_update(float a_i, float a_f, float a_g, float a_o, float c, float& c_new,
                                            float& m) {
  c_new = sigmoid_f32(a_f) * c + sigmoid_f32(a_i) * tanh_f32(a_g);
  m = sigmoid_f32(a_o) * tanh_f32(c_new);
}

// GRU: a_n = gx_n + σ(a_r)·hn, h' = n + σ(a_z)·(h − n) (torch's rounding structure).
__device__ __forceinline__ float gru_update(float a_r, float a_z, float gx_n, float hn, float h, float& a_n) {
  a_n = gx_n + sigmoid_f32(a_r) * hn;
  const float n = tanh_f32(a_n);
  return n + sigmoid_f32(a_z) * (h - n);
}

__device__ __forceinline__ float rnn_activation(float a, bool relu) { return relu ? relu_f32(a) : tanh_f32(a); }

// LSTM gate gradients from the pre-activations and c', c: dm = dL/dm, dc = the carried dL/dc'. Returns dL/dc.
__device__ __forceinline__ float lstm_gate_grads(float a_i, float a_f, float a_g, float a_o, float c_new,
                                                 float c_prev, float dm, float dc, float da[4]) {
  float i, di, f, df, o, d_o;
  sigmoid_and_grad(a_i, i, di);
  sigmoid_and_grad(a_f, f, df);
  sigmoid_and_grad(a_o, o, d_o);
  const float dct = dc + dm * o * tanh_grad_f32(c_new);  // total dL/dc'
  da[0] = dct * tanh_f32(a_g) * di;
  da[1] = dct * c_prev * df;
  da[2] = dct * i * tanh_grad_f32(a_g);
  da[3] = dm * tanh_f32(c_new) * d_o;
  return dct * f;
}

// GRU gate gradients: da[0..2] the input side (r, z, n), da_hn the hidden side's n (da_n·r); returns z (the direct
// path h' = … + z·h).
__device__ __forceinline__ float gru_gate_grads(float a_r, float a_z, float a_n, float hn, float h_prev, float dh,
                                                float da[3], float& da_hn) {
  float r, dr, z, dz;
  sigmoid_and_grad(a_r, r, dr);
  sigmoid_and_grad(a_z, z, dz);
  const float dan = dh * sigmoid_f32(-a_z) * tanh_grad_f32(a_n);  // 1 − z = σ(−a_z), no cancellation
  da[0] = dan * hn * dr;
  da[1] = dh * (h_prev - tanh_f32(a_n)) * dz;
  da[2] = dan;
  da_hn = dan * r;
  return z;
}

// relu: torch's threshold_backward, no gradient at 0 or NaN.
__device__ __forceinline__ float rnn_gate_grad(float a, float dh, bool relu) {
  return relu ? (a > 0.0f ? dh : 0.0f) : dh * tanh_grad_f32(a);
}

// ---------------------------------------------------------------------------------------------------------
// Tiles in shared memory
// ---------------------------------------------------------------------------------------------------------

// dst[r][k] (leading dimension ld) = src(row0 + r, k0 + k) for r < kRows, k < kc, zero where r ≥ n_rows or
// k0 + k ≥ K. `src(row, col)` reads the source element as float; the block's threads share the work.
template <typename T, typename Src>
__device__ __forceinline__ void fill_rows(T* dst, int ld, int n_rows, int k0, int kc, int K, const Src& src) {
  for (int idx = threadIdx.x; idx < kRows * kc; idx += kThreads) {
    const int r = idx / kc, k = idx % kc;
    const bool inside = r < n_rows && k0 + k < K;
    dst[r * ld + k] = inside ? src(r, k0 + k) : from_f32<T>(0.0f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The block product: accumulators in registers
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct BlockProduct;

// float16 / bfloat16: WMMA fragments.
template <typename T>
struct BlockProduct {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kMaxFrags];
  int n_jobs, tile0, tile_step, ks, KS;

  __device__ void init(int cols_padded) {
    const int warp = threadIdx.x / 32, tiles = cols_padded / 16;
    KS = k_slices<T>(cols_padded);
    if (tiles >= kWarps) {
      ks = 0;
      tile0 = warp;
      tile_step = kWarps;
      n_jobs = (tiles - warp + kWarps - 1) / kWarps;
    } else {
      ks = warp / tiles;
      tile0 = warp % tiles;
      tile_step = tiles;
      n_jobs = ks < KS ? 1 : 0;
    }
#pragma unroll
    for (int i = 0; i < kMaxFrags; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.0f);
  }

  // One chunk: A_s [kRows][lda] (kc columns, a multiple of 16), Wt_s [cols][ldw] starting at this chunk's column.
  __device__ void chunk(const T* A_s, int lda, const T* Wt_s, int ldw, int kc, int /*n_rows*/) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
    for (int kk = ks * 16; kk < kc; kk += KS * 16) {
      wmma::load_matrix_sync(a, A_s + kk, lda);
#pragma unroll
      for (int i = 0; i < kMaxFrags; ++i) {
        if (i < n_jobs) {
          wmma::load_matrix_sync(b, Wt_s + (tile0 + i * tile_step) * 16 * ldw + kk, ldw);
          wmma::mma_sync(acc[i], a, b, acc[i]);
        }
      }
    }
  }

  // partial_s: [KS][kRows][cols_padded]
  __device__ void store(float* partial_s, int cols_padded) const {
#pragma unroll
    for (int i = 0; i < kMaxFrags; ++i) {
      if (i < n_jobs) {
        nvcuda::wmma::store_matrix_sync(partial_s + ks * kRows * cols_padded + (tile0 + i * tile_step) * 16, acc[i],
                                        cols_padded, nvcuda::wmma::mem_row_major);
      }
    }
  }
};

// float32: FMAs. Lane l owns column 16·group + l % 16 and half (l / 16) of the warp's k steps; 16 row accumulators.
template <>
struct BlockProduct<float> {
  float acc[kRows];
  int col, kslot, KSLOTS;
  bool active;

  __device__ void init(int cols_padded) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, groups = cols_padded / 16;
    const int warp_slices = groups >= kWarps ? 1 : kWarps / groups;  // groups ≤ kWarps (kMaxCols)
    const int ksw = warp / groups;
    KSLOTS = k_slices<float>(cols_padded);
    kslot = ksw * 2 + lane / 16;
    col = (warp % groups) * 16 + lane % 16;
    active = ksw < warp_slices;
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
  }

  // kc: a multiple of 4; rows ≥ n_rows are zero and skipped.
  __device__ void chunk(const float* A_s, int lda, const float* Wt_s, int ldw, int kc, int n_rows) {
    if (!active) return;
    for (int k = kslot * 4; k < kc; k += KSLOTS * 4) {
      const float4 w = *reinterpret_cast<const float4*>(Wt_s + col * ldw + k);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < n_rows) {  // warp-uniform
          const float4 a = *reinterpret_cast<const float4*>(A_s + r * lda + k);
          acc[r] = fmaf(a.x, w.x, acc[r]);
          acc[r] = fmaf(a.y, w.y, acc[r]);
          acc[r] = fmaf(a.z, w.z, acc[r]);
          acc[r] = fmaf(a.w, w.w, acc[r]);
        }
      }
    }
  }

  __device__ void store(float* partial_s, int cols_padded) const {
    if (!active) return;
#pragma unroll
    for (int r = 0; r < kRows; ++r) partial_s[(kslot * kRows + r) * cols_padded + col] = acc[r];
  }
};

// Σ over the k-slices of product column c, row r (after store and a __syncthreads).
template <typename T>
__device__ __forceinline__ float product_sum(const float* partial_s, int cols_padded, int r, int c) {
  const int KS = k_slices<T>(cols_padded);
  float s = 0.0f;
  for (int ks = 0; ks < KS; ++ks) s += partial_s[(ks * kRows + r) * cols_padded + c];
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Layers: one unit of one row of a step (the persistent kernels and the per-step path alike)
// ---------------------------------------------------------------------------------------------------------

// One unit j of one row of a layer step, forward (both paths): a_g = x[g] + p[g] with x the gates_x side (with b_hh;
// GRU's n: gates_x alone) and p the product side (GRU's n: b_hn + W_hn·h), then the cell math; the workspace columns
// of the unit are written when w (the row's workspace) is given. c: LSTM's cell state, updated. Returns h' (LSTM: m).
template <Kind K>
__device__ __forceinline__ float layer_unit_fwd(const float x[4], const float p[4], float& c, float h_prev, bool relu,
                                                float* w, int H, int j, bool proj) {
  if constexpr (K == Kind::lstm) {
    float a[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) a[g] = x[g] + p[g];
    float c_new, m;
    lstm_update(a[0], a[1], a[2], a[3], c, c_new, m);
    if (w != nullptr) {
#pragma unroll
      for (int g = 0; g < 4; ++g) w[g * H + j] = a[g];
      w[4 * H + j] = c_new;
      w[5 * H + j] = c;
      if (proj) w[6 * H + j] = m;
    }
    c = c_new;
    return m;
  } else if constexpr (K == Kind::gru) {
    const float a_r = x[0] + p[0], a_z = x[1] + p[1], hn = p[2];
    float a_n;
    const float h_new = gru_update(a_r, a_z, x[2], hn, h_prev, a_n);
    if (w != nullptr) {
      w[j] = a_r;
      w[H + j] = a_z;
      w[2 * H + j] = a_n;
      w[3 * H + j] = hn;
    }
    return h_new;
  } else {
    const float a = x[0] + p[0];
    if (w != nullptr) w[j] = a;
    return rnn_activation(a, relu);
  }
}

// One unit j of one row of a layer step, backward (both paths), from the row's workspace w: da (input side) and dah
// (hidden side; they differ in GRU's n) given dm = dL/dm (LSTM) or dL/dh of the step. dc: LSTM's carried dL/dc',
// replaced by dL/dc. Returns GRU's direct part dm·z of dL/dh (h' = … + z·h), else 0.
template <Kind K>
__device__ __forceinline__ float layer_unit_bwd(const float* w, int H, int j, float dm, float& dc, bool relu,
                                                float da[4], float dah[4]) {
  w += j;
  if constexpr (K == Kind::lstm) {
    dc = lstm_gate_grads(w[0], w[H], w[2 * H], w[3 * H], w[4 * H], w[5 * H], dm, dc, da);
#pragma unroll
    for (int g = 0; g < 4; ++g) dah[g] = da[g];
    return 0.0f;
  } else if constexpr (K == Kind::gru) {
    float da_hn;
    const float z = gru_gate_grads(w[0], w[H], w[2 * H], w[3 * H], w[4 * H], dm, da, da_hn);
    dah[0] = da[0];
    dah[1] = da[1];
    dah[2] = da_hn;
    return dm * z;
  } else {
    da[0] = dah[0] = rnn_gate_grad(w[0], dm, relu);
    return 0.0f;
  }
}

}  // namespace cuda
}  // namespace fastseq
