// Attention forward in CUDA (torch.ops.fastseq_cpp.sdpa_fwd), its split-key decode path, and the dropout
// keep-mask generator (sdpa_dropout_mask): the kernels and their launch functions (attention_kernels.h). The
// semantics are those of kernels/attention.py (the Triton backend); the device pieces are in
// attention_common.cuh, the operators (checks, outputs, the choice of splits) in attention_cuda_ops.cpp.
//
// Math: for one (batch, head), q (L, E), k (S, E), v (S, Ev): s₂ = log₂e · (scale · q kᵀ + bias) (bias: 0 / −∞
// from a bool mask, causality and bounds, a float mask as is), P = softmax over keys (0 on a row where no key
// takes part), P̃ = P ⊙ keep / (1 − p) under dropout, out = P̃ v, lse₂ = m + log₂ l per row (+∞ on an empty row).
//
// Blocking (attn_fwd_kernel): one block per (row block of BLOCK_M = 16·warps query rows, batch·head), the row
// blocks of a head in a row of the grid with the heaviest (causal) first. Each warp owns 16 query rows. The q
// tile is loaded into shared memory once; the block walks the key tiles (BLOCK_N keys): k and v tiles into
// shared memory, then per warp s = q kᵀ on the tensor cores (mma.sync m16n8k16, operands by ldmatrix; float32
// on CUDA cores), the online softmax on the score fragments in registers (running max m and sum l per row,
// the float32 accumulator of P̃ v rescaled by exp2(m_old − m_new)), and P̃ v with P̃ taken straight from the
// score registers as the A operand (CUDA cores: through 16 staging rows per warp). The (L, S) scores never
// leave the chip: shared memory holds q, k and v tiles (rows padded by 16 bytes, ldmatrix without bank
// conflicts); registers hold the accumulator (16 × D per warp), one score tile and the row statistics.
//
// Skipped, never computed: key tiles past the causal limit of the block's last row; with a mask, any key tile
// in which no (row, key) pair of the block takes part (a vote of the block over the mask tile, read before
// the k and v tiles are loaded); in a warp whose 16 rows are all past L, every product.
//
// Decode (num_splits > 1, for L ≤ 16 against many keys): the key tiles are split across gridDim.y blocks per
// (row block, head); each writes its unnormalised float32 accumulator and (m, l), and
// attn_fwd_combine_kernel merges them: out = Σ wᵢ accᵢ / Σ wᵢ lᵢ with wᵢ = exp2(mᵢ − max m).

#include "attention_common.cuh"

namespace fastseq {
namespace attn {

template <typename T, int D>
struct FwdLayout {
  using C = FwdConfig<T, D>;
  static constexpr int kLd = tile_ld<T, D>();
  static constexpr int kQ = 0;  // offsets in elements of T
  static constexpr int kK = kQ + C::kBlockM * kLd;
  static constexpr int kV = kK + C::kBlockN * kLd;
  static constexpr int kEnd = kV + C::kBlockN * kLd;
  static constexpr int kStageLd = C::kBlockN + 4;  // float32 staging rows of P (CUDA-core path)
  static constexpr size_t kBytes =
      size_t(kEnd) * sizeof(T) + (kTensorCores<T> ? 0 : size_t(C::kBlockM) * kStageLd * sizeof(float));
  static_assert(kBytes <= kMaxSharedBytes, "a block must fit the smallest per-block shared memory (sm_86/89)");
};

template <typename T, int D>
FASTSEQ_KERNEL(32 * FwdConfig<T, D>::kWarps, 1) attn_fwd_kernel(const AttnArgs a) {
  using C = FwdConfig<T, D>;
  using Layout = FwdLayout<T, D>;
  constexpr int kThreads = 32 * C::kWarps, BM = C::kBlockM, BN = C::kBlockN, NT = BN / 8, DT = D / 8;
  constexpr int kLd = Layout::kLd;
  T* smem = shared_memory<T>();
  T* q_s = smem + Layout::kQ;
  T* k_s = smem + Layout::kK;
  T* v_s = smem + Layout::kV;
  const int w = warp_id(), t = lane_id() & 3;
  float* stage = reinterpret_cast<float*>(smem + Layout::kEnd) + w * 16 * Layout::kStageLd;
  const RowBlock rb = row_block<BM>(a);
  const int bh = rb.bh;
  const int64_t b = rb.b, h = rb.h, m0 = rb.m0, row0 = rb.row0, row_lo = rb.row_lo, row_hi = rb.row_hi;
  const bool warp_active = rb.warp_active;

  const T* q = head_at<T>(a.q, b, h);
  const T* k = head_at<T>(a.k, b, h / a.group_k);
  const T* v = head_at<T>(a.v, b, h / a.group_v);
  const char* mask_bh = a.mask_kind != kMaskNone ? mask_at(a, b, h) : nullptr;
  const DropoutKey key = dropout_key(a);

  load_tile<T, BM, kThreads>(q_s, kLd, q, m0, a.L, a.q.stride[2], a.q.stride[3], a.E, a.q.vec);

  // keys [lo, hi): up to the causal limit of the block's last row; a split owns tiles_per_split tiles of it
  int64_t hi = causal_key_end(a, m0, BM), lo = 0;
  if (a.num_splits > 1) {
    lo = int64_t(block_y()) * a.tiles_per_split * BN;
    hi = min_i64(hi, lo + int64_t(a.tiles_per_split) * BN);
  }

  float acc[DT][4];
  zero(acc);
  float m_lo = kNegInf, m_hi = kNegInf, l_lo = 0.f, l_hi = 0.f;
  for (int64_t n0 = lo; n0 < hi; n0 += BN) {
    if (a.mask_kind != kMaskNone) {
      // the vote is also the barrier after which the previous tile's shared memory may be overwritten
      if (!sync_block_or(any_live<T, NT, false>(a, mask_bh, row_lo, n0))) continue;
    } else {
      sync_block();
    }
    load_tile<T, BN, kThreads>(k_s, kLd, k, n0, a.S, a.k.stride[2], a.k.stride[3], a.E, a.k.vec);
    load_tile<T, BN, kThreads>(v_s, kLd, v, n0, a.S, a.v.stride[2], a.v.stride[3], a.Ev, a.v.vec);
    sync_block();
    if (!warp_active) continue;

    float s[NT][4];
    zero(s);
    gemm_nt<T, NT, D>(s, q_s + 16 * w * kLd, kLd, k_s, kLd, a.E);
    float max_lo = kNegInf, max_hi = kNegInf;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = e >= 2 ? row_hi : row_lo;
        s[j][e] = s[j][e] * a.scale_log2 + score_bias<T>(a, mask_bh, row, n0 + 8 * j + 2 * t + (e & 1));
      }
      max_lo = nan_max(max_lo, nan_max(s[j][0], s[j][1]));
      max_hi = nan_max(max_hi, nan_max(s[j][2], s[j][3]));
    }
    const float new_lo = nan_max(m_lo, quad_max(max_lo)), new_hi = nan_max(m_hi, quad_max(max_hi));
    // a row with no key yet keeps m = −∞: subtract 0 instead (no −∞ − −∞)
    const float safe_lo = new_lo == kNegInf ? 0.f : new_lo, safe_hi = new_hi == kNegInf ? 0.f : new_hi;
    const float alpha_lo = fast_exp2(m_lo - safe_lo), alpha_hi = fast_exp2(m_hi - safe_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = fast_exp2(s[j][0] - safe_lo);
      s[j][1] = fast_exp2(s[j][1] - safe_lo);
      s[j][2] = fast_exp2(s[j][2] - safe_hi);
      s[j][3] = fast_exp2(s[j][3] - safe_hi);
      sum_lo += s[j][0] + s[j][1];
      sum_hi += s[j][2] + s[j][3];
    }
    l_lo = l_lo * alpha_lo + sum_lo;  // per-thread partial sums: the quad adds them up at the end
    l_hi = l_hi * alpha_hi + sum_hi;
    if (a.dropout) {
      bool keep[NT][4];
      keep_rows<NT>(keep, key, a.p_drop, bh, row_lo, n0);
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = keep[j][e] ? s[j][e] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < DT; ++j) {
      acc[j][0] *= alpha_lo;
      acc[j][1] *= alpha_lo;
      acc[j][2] *= alpha_hi;
      acc[j][3] *= alpha_hi;
    }
    gemm_rn<T, DT, NT>(acc, s, v_s, kLd, a.Ev, stage);
  }

  if (!warp_active) return;
  l_lo = quad_sum(l_lo);
  l_hi = quad_sum(l_hi);
  // a row where no key took part gives 0 (even where 0 · v was NaN) and lse +∞
  const bool dead_lo = m_lo == kNegInf, dead_hi = m_hi == kNegInf;
#pragma unroll
  for (int j = 0; j < DT; ++j) {
    if (dead_lo) acc[j][0] = acc[j][1] = 0.f;
    if (dead_hi) acc[j][2] = acc[j][3] = 0.f;
  }
  if (a.num_splits > 1) {
    const int64_t part_row = int64_t(bh) * a.num_splits + block_y();
    store_fragments<float, DT>(a.part + part_row * a.L * a.Ev, a.Ev, 1, row0, a.L, a.Ev, acc, 1.f, 1.f);
    float* ml = a.part_ml + part_row * 2 * a.L;
    if (t == 0 && row_lo < a.L) ml[row_lo] = m_lo, ml[a.L + row_lo] = l_lo;
    if (t == 0 && row_hi < a.L) ml[row_hi] = m_hi, ml[a.L + row_hi] = l_hi;
    return;
  }
  const float mul_lo = dead_lo ? 0.f : a.drop_scale / l_lo, mul_hi = dead_hi ? 0.f : a.drop_scale / l_hi;
  T* o = static_cast<T*>(a.o) + (b * a.H + h) * a.L * a.Ev;
  store_fragments<T, DT>(o, a.Ev, 1, row0, a.L, a.Ev, acc, mul_lo, mul_hi);
  float* lse = a.lse + int64_t(bh) * a.L;
  if (t == 0 && row_lo < a.L) lse[row_lo] = dead_lo ? INFINITY : m_lo + log2f(l_lo);
  if (t == 0 && row_hi < a.L) lse[row_hi] = dead_hi ? INFINITY : m_hi + log2f(l_hi);
}

// Merges the split-key partials of the decode path: one block per (batch·head, row); threads over the
// value columns.
constexpr int kCombineThreads = 128;

template <typename T>
FASTSEQ_KERNEL(kCombineThreads) attn_fwd_combine_kernel(const AttnArgs a) {
  const int64_t bh = block_x() / a.L, row = block_x() % a.L;
  const int64_t splits = a.num_splits;
  const float* ml = a.part_ml + bh * splits * 2 * a.L;
  float m_max = kNegInf;
  for (int64_t i = 0; i < splits; ++i) m_max = nan_max(m_max, ml[i * 2 * a.L + row]);
  const bool dead = m_max == kNegInf;
  const float m_safe = dead ? 0.f : m_max;
  float l_sum = 0.f;
  for (int64_t i = 0; i < splits; ++i)
    l_sum += fast_exp2(ml[i * 2 * a.L + row] - m_safe) * ml[i * 2 * a.L + a.L + row];
  const float mul = dead ? 0.f : a.drop_scale / l_sum;
  T* o = static_cast<T*>(a.o) + (bh * a.L + row) * a.Ev;
  for (int col = thread_id(); col < a.Ev; col += kCombineThreads) {
    float acc = 0.f;
    for (int64_t i = 0; i < splits; ++i) {
      const float weight = fast_exp2(ml[i * 2 * a.L + row] - m_safe);
      acc += weight * a.part[((bh * splits + i) * a.L + row) * a.Ev + col];
    }
    o[col] = T(dead ? 0.f : acc * mul);
  }
  if (thread_id() == 0) a.lse[bh * a.L + row] = dead ? INFINITY : m_max + log2f(l_sum);
}

// The keep-mask (uint8 (B·H, L, S)) the attention kernels draw: one thread per (batch·head, row, key group),
// kKeepThreads (attention_kernels.h) per block.
FASTSEQ_KERNEL(kKeepThreads) dropout_keep_kernel(const int64_t* seed, uint8_t* out, int64_t BH, int64_t L,
                                                 int64_t S, float p_drop) {
  const int64_t groups = (S + 3) / 4;
  const int64_t idx = int64_t(block_x()) * kKeepThreads + thread_id();
  if (idx >= BH * L * groups) return;
  const int64_t group = idx % groups, row = (idx / groups) % L, bh = idx / (groups * L);
  const DropoutKey key{static_cast<uint64_t>(seed[0]), static_cast<uint32_t>(seed[1])};
  const Philox4 r = philox_group(key, group, row, int(bh));
  uint8_t* dst = out + (bh * L + row) * S;
  for (int i = 0; i < 4 && 4 * group + i < S; ++i) dst[4 * group + i] = kept(r.x[i], p_drop) ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------------------
// Launch functions (attention_kernels.h)
// ---------------------------------------------------------------------------------------------------------

template <typename T, int D>
KernelShape fwd_shape() {
  using C = FwdConfig<T, D>;
  return {C::kBlockM, C::kBlockN, 32 * C::kWarps, FwdLayout<T, D>::kBytes};
}

template <typename T, int D>
cudaError_t launch_fwd(const AttnArgs& a, cudaStream_t stream) {
  using C = FwdConfig<T, D>;
  using Layout = FwdLayout<T, D>;
  const int64_t BH = int64_t(a.B) * a.H, m_blocks = ceil_div(a.L, C::kBlockM);
  auto kernel = attn_fwd_kernel<T, D>;
  const cudaError_t error = allow_shared(kernel, Layout::kBytes);
  if (error != cudaSuccess) return error;
  FASTSEQ_LAUNCH(kernel, dim3(unsigned(BH * m_blocks), unsigned(a.num_splits)), 32 * C::kWarps, Layout::kBytes,
                 stream, a);
  if (a.num_splits > 1) {
    auto combine = attn_fwd_combine_kernel<T>;
    FASTSEQ_LAUNCH(combine, dim3(unsigned(BH * a.L)), kCombineThreads, 0, stream, a);
  }
  return cudaSuccess;
}

cudaError_t launch_dropout_keep(const int64_t* seed, uint8_t* out, int64_t BH, int64_t L, int64_t S, float p_drop,
                                cudaStream_t stream) {
  const int64_t threads = BH * L * ceil_div(S, 4);
  auto kernel = dropout_keep_kernel;
  FASTSEQ_LAUNCH(kernel, dim3(unsigned(ceil_div(threads, kKeepThreads))), kKeepThreads, 0, stream, seed, out, BH, L,
                 S, p_drop);
  return cudaSuccess;
}

#define FASTSEQ_ATTN_FWD_INSTANCES(T, D) \
  template KernelShape fwd_shape<T, D>();  \
  template cudaError_t launch_fwd<T, D>(const AttnArgs&, cudaStream_t);
#define FASTSEQ_ATTN_FWD_HEADS(T)    \
  FASTSEQ_ATTN_FWD_INSTANCES(T, 64)  \
  FASTSEQ_ATTN_FWD_INSTANCES(T, 128) \
  FASTSEQ_ATTN_FWD_INSTANCES(T, 256)
FASTSEQ_ATTN_FWD_HEADS(float)
FASTSEQ_ATTN_FWD_HEADS(c10::Half)
FASTSEQ_ATTN_FWD_HEADS(c10::BFloat16)

}  // namespace attn
}  // namespace fastseq
