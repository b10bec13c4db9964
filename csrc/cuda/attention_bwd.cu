// Attention backward in CUDA (torch.ops.fastseq_cpp.sdpa_bwd): three launches, no atomics, deterministic, as
// kernels/attention.py's backward: the kernels and their launch function (attention_kernels.h). The device
// pieces are in attention_common.cuh, the operator (checks, outputs, workspace) in attention_cuda_ops.cpp.
//
// Math (per (batch, head), base 2 as the forward): P = exp2(s₂ − lse₂) recomputed from the saved lse₂ (0 on
// rows where no key took part: lse₂ = +∞), P̃ = P ⊙ keep / (1 − p), D = rowsum(dO ⊙ O) (= Σⱼ P̃ⱼ dP̃ⱼ, since O
// already holds the dropped, rescaled probabilities), dP = dO vᵀ (dropped and rescaled like P),
// dS = P ⊙ (dP − D), dV = P̃ᵀ dO, dK = scale · dSᵀ q, dQ = scale · dS k. dS is also the gradient of a float mask.
//
// 1. attn_bwd_delta_kernel: D, one thread per query row (in the summation order of the float32 products).
// 2. attn_bwd_dkdv_kernel: one block per (key block of BLOCK_N = 16·warps keys, batch·key/value head). Each
//    warp owns 16 keys and keeps their dK and/or dV (16 × D float32) in registers while the block walks every
//    query head of the GQA group and every query tile that can see the block: k and v tiles of the group's
//    heads and the q, dO, lse and D tiles of each query tile go to shared memory; the warp computes the
//    transposed scores sᵀ = k qᵀ (keys as rows), so that P̃ᵀ and dSᵀ are already the A operands of
//    dV += P̃ᵀ dO and dK += dSᵀ q (operands by ldmatrix, dO and q transposed by ldmatrix.trans), and
//    dPᵀ = v dOᵀ. With a float mask that needs a gradient it stores dS into the float32 (B, H, L, S) buffer,
//    each element once. With Hk ≠ Hv, or a head class of 256 (whose two accumulators would not fit in
//    registers), dK and dV are two launches, each over its own heads.
// 3. attn_bwd_dq_kernel: one block per (query block, batch·head), warps own 16 rows (as the forward): q and dO
//    tiles stay in shared memory, k and v tiles stream through it; s = q kᵀ, dP = dO vᵀ, dS in registers,
//    dQ += dS k with dS as the A operand and k by ldmatrix.trans.
//
// Recomputing s and dP in both (2) and (3) costs one more q kᵀ and dO vᵀ per tile than one pass with dQ
// accumulated by atomics, but every gradient is a plain store: deterministic, and GQA needs no cross-block
// reduction because one block owns a key/value head's whole group. Tiles a mask removes entirely (a block
// vote on the mask tile) and tiles past the causal limit are skipped, in both (2) and (3).

#include "attention_common.cuh"

namespace fastseq {
namespace attn {

// ---------------------------------------------------------------------------------------------------------
// D = rowsum(dO ⊙ O)
// ---------------------------------------------------------------------------------------------------------

constexpr int kDeltaThreads = 128;

// One thread per query row, 4 columns at a time in dot4's order: the order of the float32 products dP = dO vᵀ
// (see dot4 in attention_common.cuh); the row's columns past Ev count as zeros, as the padded tiles do.
template <typename T>
FASTSEQ_KERNEL(kDeltaThreads) attn_bwd_delta_kernel(const AttnArgs a) {
  const int64_t row = int64_t(block_x()) * kDeltaThreads + thread_id();
  if (row >= int64_t(a.B) * a.H * a.L) return;
  const int64_t bh = row / a.L, i = row % a.L, b = bh / a.H, h = bh % a.H;
  const T* o = static_cast<const T*>(a.out.ptr) + b * a.out.stride[0] + h * a.out.stride[1] + i * a.out.stride[2];
  const T* d_o =
      static_cast<const T*>(a.dout.ptr) + b * a.dout.stride[0] + h * a.dout.stride[1] + i * a.dout.stride[2];
  const int64_t so = a.out.stride[3], sd = a.dout.stride[3];
  const auto at = [&](const T* p, int64_t stride, int c) { return c < a.Ev ? to_float(p[c * stride]) : 0.f; };
  float sum = 0.f;
  for (int c = 0; c < a.Ev; c += 4) {
    const float4 x{at(d_o, sd, c), at(d_o, sd, c + 1), at(d_o, sd, c + 2), at(d_o, sd, c + 3)};
    const float4 y{at(o, so, c), at(o, so, c + 1), at(o, so, c + 2), at(o, so, c + 3)};
    sum += dot4(x, y);
  }
  a.delta[row] = sum;
}

// ---------------------------------------------------------------------------------------------------------
// dK and dV
// ---------------------------------------------------------------------------------------------------------

enum DkdvMode : int { kDk = 1, kDv = 2, kDkDv = 3 };

template <typename T, int D>
struct DkdvLayout {
  using C = DkdvConfig<T, D>;
  static constexpr int kLd = tile_ld<T, D>();
  static constexpr int kK = 0;  // offsets in elements of T
  static constexpr int kV = kK + C::kBlockN * kLd;
  static constexpr int kQ = kV + C::kBlockN * kLd;
  static constexpr int kDo = kQ + C::kBlockM * kLd;
  static constexpr int kEnd = kDo + C::kBlockM * kLd;
  static constexpr int kStageLd = C::kBlockM + 4;
  // then float32: lse (BLOCK_M), D (BLOCK_M), and on CUDA cores the staging rows (BLOCK_N × (BLOCK_M + 4))
  static constexpr size_t kBytes = size_t(kEnd) * sizeof(T) + 2 * C::kBlockM * sizeof(float) +
                                   (kTensorCores<T> ? 0 : size_t(C::kBlockN) * kStageLd * sizeof(float));
  static_assert(kBytes <= kMaxSharedBytes, "a block must fit the smallest per-block shared memory (sm_86/89)");
};

template <typename T, int D, int MODE>
FASTSEQ_KERNEL(32 * DkdvConfig<T, D>::kWarps, 1) attn_bwd_dkdv_kernel(const AttnArgs a) {
  using C = DkdvConfig<T, D>;
  using Layout = DkdvLayout<T, D>;
  constexpr bool kWantDk = MODE & kDk, kWantDv = MODE & kDv;
  constexpr int kThreads = 32 * C::kWarps, BM = C::kBlockM, BN = C::kBlockN, NT = BM / 8, DT = D / 8;
  constexpr int kLd = Layout::kLd;
  T* smem = shared_memory<T>();
  T* k_s = smem + Layout::kK;
  T* v_s = smem + Layout::kV;
  T* q_s = smem + Layout::kQ;
  T* do_s = smem + Layout::kDo;
  float* lse_s = reinterpret_cast<float*>(smem + Layout::kEnd);
  float* delta_s = lse_s + BM;
  const int w = warp_id(), g = lane_id() >> 2, t = lane_id() & 3;
  float* stage = delta_s + BM + w * 16 * Layout::kStageLd;

  const int n_blocks = int(ceil_div(a.S, BN));
  const int bkv = block_x() / n_blocks;
  const int64_t n0 = int64_t(block_x() - bkv * n_blocks) * BN;
  const int64_t b = bkv / a.kv_heads, hkv = bkv % a.kv_heads;
  const int group = a.H / a.kv_heads;  // query heads hkv·group … of this key (or value) head
  const int64_t key0 = n0 + 16 * w;    // this warp's keys: key0 + g and key0 + g + 8
  const int64_t key_lo = key0 + g;
  const bool warp_active = key0 < a.S;
  const DropoutKey key = dropout_key(a);
  const bool write_dmask = kWantDk && a.want_dmask;
  // queries i see key j when j <= i + diag: the first query tile that sees this block
  const int64_t m_start = a.causal ? max_i64(n0 - a.diag, 0) / BM * BM : 0;

  float dk[kWantDk ? DT : 1][4], dv[kWantDv ? DT : 1][4];
  zero(dk);
  zero(dv);
  for (int gi = 0; gi < group; ++gi) {
    const int64_t h = hkv * group + gi;
    const int bh = int(b * a.H + h);
    const T* q = head_at<T>(a.q, b, h);
    const T* d_o = head_at<T>(a.dout, b, h);
    const T* k = head_at<T>(a.k, b, h / a.group_k);
    const T* v = head_at<T>(a.v, b, h / a.group_v);
    const char* mask_bh = a.mask_kind != kMaskNone ? mask_at(a, b, h) : nullptr;
    const float* lse = a.lse + int64_t(bh) * a.L;
    const float* delta = a.delta + int64_t(bh) * a.L;

    sync_block();  // the previous head's reads of the k and v tiles are done
    load_tile<T, BN, kThreads>(k_s, kLd, k, n0, a.S, a.k.stride[2], a.k.stride[3], a.E, a.k.vec);
    load_tile<T, BN, kThreads>(v_s, kLd, v, n0, a.S, a.v.stride[2], a.v.stride[3], a.Ev, a.v.vec);
    for (int64_t m0 = m_start; m0 < a.L; m0 += BM) {
      if (a.mask_kind != kMaskNone) {
        if (!sync_block_or(any_live<T, NT, true>(a, mask_bh, key_lo, m0))) continue;
      } else {
        sync_block();
      }
      load_tile<T, BM, kThreads>(q_s, kLd, q, m0, a.L, a.q.stride[2], a.q.stride[3], a.E, a.q.vec);
      load_tile<T, BM, kThreads>(do_s, kLd, d_o, m0, a.L, a.dout.stride[2], a.dout.stride[3], a.Ev, a.dout.vec);
      load_row_values<BM, kThreads>(lse_s, lse, m0, a.L, INFINITY);
      load_row_values<BM, kThreads>(delta_s, delta, m0, a.L, 0.f);
      sync_block();
      if (!warp_active) continue;

      // pᵀ: keys as rows, queries as columns
      float p[NT][4];
      zero(p);
      gemm_nt<T, NT, D>(p, k_s + 16 * w * kLd, kLd, q_s, kLd, a.E);
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * j + 2 * t + (e & 1);
          const float bias = score_bias<T>(a, mask_bh, m0 + col, key_lo + (e >= 2 ? 8 : 0));
          p[j][e] = fast_exp2(p[j][e] * a.scale_log2 + bias - lse_s[col]);
        }
      bool keep[NT][4];
      if (a.dropout) keep_cols<NT>(keep, key, a.p_drop, bh, key0, m0);
      if constexpr (kWantDv) {
        float p_kept[NT][4];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            p_kept[j][e] = a.dropout ? (keep[j][e] ? p[j][e] * a.drop_scale : 0.f) : p[j][e];
        gemm_rn<T, DT, NT>(dv, p_kept, do_s, kLd, a.Ev, stage);
      }
      if constexpr (kWantDk) {
        float ds[NT][4];  // dPᵀ, then dSᵀ
        zero(ds);
        gemm_nt<T, NT, D>(ds, v_s + 16 * w * kLd, kLd, do_s, kLd, a.Ev);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float dp = a.dropout ? (keep[j][e] ? ds[j][e] * a.drop_scale : 0.f) : ds[j][e];
            ds[j][e] = p[j][e] * (dp - delta_s[8 * j + 2 * t + (e & 1)]);
          }
        if (write_dmask) {
          float* dmask = a.dmask + int64_t(bh) * a.L * a.S;
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int64_t i = m0 + 8 * j + 2 * t + (e & 1), kj = key_lo + (e >= 2 ? 8 : 0);
              if (i < a.L && kj < a.S) dmask[i * a.S + kj] = ds[j][e];
            }
        }
        gemm_rn<T, DT, NT>(dk, ds, q_s, kLd, a.E, stage);
      }
    }
  }
  if (!warp_active) return;
  if constexpr (kWantDk) {
    T* out = static_cast<T*>(a.dk) + (b * a.kv_heads + hkv) * a.S * a.E;
    store_fragments<T, DT>(out, a.E, 1, key0, a.S, a.E, dk, a.scale, a.scale);
  }
  if constexpr (kWantDv) {
    T* out = static_cast<T*>(a.dv) + (b * a.kv_heads + hkv) * a.S * a.Ev;
    store_fragments<T, DT>(out, a.Ev, 1, key0, a.S, a.Ev, dv, 1.f, 1.f);
  }
}

// ---------------------------------------------------------------------------------------------------------
// dQ
// ---------------------------------------------------------------------------------------------------------

template <typename T, int D>
struct DqLayout {
  using C = DqConfig<T, D>;
  static constexpr int kLd = tile_ld<T, D>();
  static constexpr int kQ = 0;  // offsets in elements of T
  static constexpr int kDo = kQ + C::kBlockM * kLd;
  static constexpr int kK = kDo + C::kBlockM * kLd;
  static constexpr int kV = kK + C::kBlockN * kLd;
  static constexpr int kEnd = kV + C::kBlockN * kLd;
  static constexpr int kStageLd = C::kBlockN + 4;
  static constexpr size_t kBytes =
      size_t(kEnd) * sizeof(T) + (kTensorCores<T> ? 0 : size_t(C::kBlockM) * kStageLd * sizeof(float));
  static_assert(kBytes <= kMaxSharedBytes, "a block must fit the smallest per-block shared memory (sm_86/89)");
};

template <typename T, int D>
FASTSEQ_KERNEL(32 * DqConfig<T, D>::kWarps, 1) attn_bwd_dq_kernel(const AttnArgs a) {
  using C = DqConfig<T, D>;
  using Layout = DqLayout<T, D>;
  constexpr int kThreads = 32 * C::kWarps, BM = C::kBlockM, BN = C::kBlockN, NT = BN / 8, DT = D / 8;
  constexpr int kLd = Layout::kLd;
  T* smem = shared_memory<T>();
  T* q_s = smem + Layout::kQ;
  T* do_s = smem + Layout::kDo;
  T* k_s = smem + Layout::kK;
  T* v_s = smem + Layout::kV;
  const int w = warp_id(), t = lane_id() & 3;
  float* stage = reinterpret_cast<float*>(smem + Layout::kEnd) + w * 16 * Layout::kStageLd;
  const RowBlock rb = row_block<BM>(a);
  const int bh = rb.bh;
  const int64_t b = rb.b, h = rb.h, m0 = rb.m0, row0 = rb.row0, row_lo = rb.row_lo, row_hi = rb.row_hi;
  const bool warp_active = rb.warp_active;

  const T* q = head_at<T>(a.q, b, h);
  const T* d_o = head_at<T>(a.dout, b, h);
  const T* k = head_at<T>(a.k, b, h / a.group_k);
  const T* v = head_at<T>(a.v, b, h / a.group_v);
  const char* mask_bh = a.mask_kind != kMaskNone ? mask_at(a, b, h) : nullptr;
  const DropoutKey key = dropout_key(a);
  const float* lse = a.lse + int64_t(bh) * a.L;
  const float* delta = a.delta + int64_t(bh) * a.L;
  const float lse_lo = row_lo < a.L ? lse[row_lo] : INFINITY, lse_hi = row_hi < a.L ? lse[row_hi] : INFINITY;
  const float delta_lo = row_lo < a.L ? delta[row_lo] : 0.f, delta_hi = row_hi < a.L ? delta[row_hi] : 0.f;

  load_tile<T, BM, kThreads>(q_s, kLd, q, m0, a.L, a.q.stride[2], a.q.stride[3], a.E, a.q.vec);
  load_tile<T, BM, kThreads>(do_s, kLd, d_o, m0, a.L, a.dout.stride[2], a.dout.stride[3], a.Ev, a.dout.vec);

  const int64_t hi = causal_key_end(a, m0, BM);
  float dq[DT][4];
  zero(dq);
  for (int64_t n0 = 0; n0 < hi; n0 += BN) {
    if (a.mask_kind != kMaskNone) {
      if (!sync_block_or(any_live<T, NT, false>(a, mask_bh, row_lo, n0))) continue;
    } else {
      sync_block();
    }
    load_tile<T, BN, kThreads>(k_s, kLd, k, n0, a.S, a.k.stride[2], a.k.stride[3], a.E, a.k.vec);
    load_tile<T, BN, kThreads>(v_s, kLd, v, n0, a.S, a.v.stride[2], a.v.stride[3], a.Ev, a.v.vec);
    sync_block();
    if (!warp_active) continue;

    float p[NT][4], ds[NT][4];
    zero(p);
    zero(ds);
    gemm_nt<T, NT, D>(p, q_s + 16 * w * kLd, kLd, k_s, kLd, a.E);
    gemm_nt<T, NT, D>(ds, do_s + 16 * w * kLd, kLd, v_s, kLd, a.Ev);  // dP
    bool keep[NT][4];
    if (a.dropout) keep_rows<NT>(keep, key, a.p_drop, bh, row_lo, n0);
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool hi_row = e >= 2;
        const float bias = score_bias<T>(a, mask_bh, hi_row ? row_hi : row_lo, n0 + 8 * j + 2 * t + (e & 1));
        const float prob = fast_exp2(p[j][e] * a.scale_log2 + bias - (hi_row ? lse_hi : lse_lo));
        const float dp = a.dropout ? (keep[j][e] ? ds[j][e] * a.drop_scale : 0.f) : ds[j][e];
        ds[j][e] = prob * (dp - (hi_row ? delta_hi : delta_lo));
      }
    gemm_rn<T, DT, NT>(dq, ds, k_s, kLd, a.E, stage);
  }
  if (!warp_active) return;
  T* out = static_cast<T*>(a.dq) + int64_t(bh) * a.L * a.E;
  store_fragments<T, DT>(out, a.E, 1, row0, a.L, a.E, dq, a.scale, a.scale);
}

// ---------------------------------------------------------------------------------------------------------
// Launch functions (attention_kernels.h)
// ---------------------------------------------------------------------------------------------------------

template <typename T, int D>
BwdShape bwd_shape() {
  using K = DkdvConfig<T, D>;
  using Q = DqConfig<T, D>;
  return {{K::kBlockM, K::kBlockN, 32 * K::kWarps, DkdvLayout<T, D>::kBytes},
          {Q::kBlockM, Q::kBlockN, 32 * Q::kWarps, DqLayout<T, D>::kBytes}};
}

template <typename T, int D, int MODE>
cudaError_t launch_dkdv(AttnArgs a, int kv_heads, cudaStream_t stream) {
  using C = DkdvConfig<T, D>;
  using Layout = DkdvLayout<T, D>;
  a.kv_heads = kv_heads;
  const int64_t blocks = ceil_div(a.S, C::kBlockN) * a.B * kv_heads;
  auto kernel = attn_bwd_dkdv_kernel<T, D, MODE>;
  const cudaError_t error = allow_shared(kernel, Layout::kBytes);
  if (error != cudaSuccess) return error;
  FASTSEQ_LAUNCH(kernel, dim3(unsigned(blocks)), 32 * C::kWarps, Layout::kBytes, stream, a);
  return cudaSuccess;
}

template <typename T, int D>
cudaError_t launch_bwd(const AttnArgs& a, int Hk, int Hv, cudaStream_t stream) {
  const int64_t rows = int64_t(a.B) * a.H * a.L;
  auto delta_kernel = attn_bwd_delta_kernel<T>;
  FASTSEQ_LAUNCH(delta_kernel, dim3(unsigned(ceil_div(rows, kDeltaThreads))), kDeltaThreads, 0, stream, a);
  // dK and dV in one pass where both accumulators fit in registers (heads <= 128) and they share their heads
  cudaError_t error = cudaSuccess;
  if constexpr (D <= 128) {
    if (Hk == Hv) {
      error = launch_dkdv<T, D, kDkDv>(a, Hk, stream);
    } else {
      error = launch_dkdv<T, D, kDk>(a, Hk, stream);
      if (error == cudaSuccess) error = launch_dkdv<T, D, kDv>(a, Hv, stream);
    }
  } else {
    error = launch_dkdv<T, D, kDk>(a, Hk, stream);
    if (error == cudaSuccess) error = launch_dkdv<T, D, kDv>(a, Hv, stream);
  }
  if (error != cudaSuccess) return error;
  using C = DqConfig<T, D>;
  using Layout = DqLayout<T, D>;
  const int64_t blocks = ceil_div(a.L, C::kBlockM) * a.B * a.H;
  auto dq_kernel = attn_bwd_dq_kernel<T, D>;
  error = allow_shared(dq_kernel, Layout::kBytes);
  if (error != cudaSuccess) return error;
  FASTSEQ_LAUNCH(dq_kernel, dim3(unsigned(blocks)), 32 * C::kWarps, Layout::kBytes, stream, a);
  return cudaSuccess;
}

#define FASTSEQ_ATTN_BWD_INSTANCES(T, D) \
  template BwdShape bwd_shape<T, D>();   \
  template cudaError_t launch_bwd<T, D>(const AttnArgs&, int, int, cudaStream_t);
#define FASTSEQ_ATTN_BWD_HEADS(T)    \
  FASTSEQ_ATTN_BWD_INSTANCES(T, 64)  \
  FASTSEQ_ATTN_BWD_INSTANCES(T, 128) \
  FASTSEQ_ATTN_BWD_INSTANCES(T, 256)
FASTSEQ_ATTN_BWD_HEADS(float)
FASTSEQ_ATTN_BWD_HEADS(c10::Half)
FASTSEQ_ATTN_BWD_HEADS(c10::BFloat16)

}  // namespace attn
}  // namespace fastseq
