// One step of the recurrent cells on CUDA tensors: LSTM, GRU and Elman RNN (tanh / relu), forward and backward,
// one kernel launch each. The CUDA implementations of torch.ops.fastseq_cpp.{lstm,gru,rnn}_cell_{fwd,bwd} (schemas
// in csrc/cpu/library.cpp): same arguments, returns, dtypes and float32 workspace as the CPU kernels
// (csrc/cpu/rnn_cells.cpp) and the Triton launchers (kernels/rnn_cell.py): LSTM (a_i, a_f, a_g, a_o, c'),
// GRU (a_r, a_z, a_n, W_hn·h + b_hn), RNN (a).
//
// Math (fastseq.reference): a = x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh with G gates in torch's order, then the gate
// nonlinearities and the state update (rnn_pointwise.h: the CPU kernels' float32 functions).
//
// Forward. Grid (⌈H/U⌉, ⌈B/16⌉), 256 threads: block (x, y) owns 16 batch rows and U hidden units *of every
// gate*, i.e. 32 product columns: LSTM and GRU U = 8 (4 slots of 8: GRU keeps x·W_inᵀ and h·W_hnᵀ apart in
// slots 2 and 3, because the reset gate scales only the hidden one), RNN U = 32. It streams K = I (then H) in
// chunks of 64 through shared memory, x (h) rows and the matching 32 weight rows, into the block product
// (rnn_cuda.cuh: WMMA tensor cores for float16/bfloat16, FMA for float32, float32 accumulators). Biases, gates
// and the update happen in registers; only h' (c') and, in training, the workspace reach memory.
//
// Backward. Grid (1 + ⌈I/32⌉ + ⌈H/32⌉, ⌈B/16⌉). Block x = 0 turns the output gradients and the workspace into the
// pre-activation gradients dA (written in the weights' dtype: the caller's weight gradients are products of them)
// and dL/dc. Blocks x ≥ 1 each own 32 columns of dx = dA_x·W_ih or dh = dA_h·W_hh (+ GRU's direct dh'·z): they
// recompute dA chunk by chunk (16 units of every gate) straight into the shared-memory operand, rounded to the
// product dtype as the Triton kernels do, and reduce against the matching weight rows, so dA is never read back.
//
// Precision: products in the input dtype (tensor cores for half precision), float32 accumulation and gate math,
// outputs rounded to nearest even once. Any size: every load and store is bounds-checked.

#include "rnn_cuda.cuh"

namespace fastseq {
namespace cuda {
namespace {

constexpr int kCols = kCellCols;  // product columns per block
constexpr int kChunk = 64;   // K columns per chunk (forward)
constexpr int kBwdUnits = 16;  // units per chunk (backward): K chunk = G·16

template <Kind K>
constexpr int cell_slots() {
  return K == Kind::rnn ? 1 : 4;
}

template <Kind K>
constexpr int cell_units() {
  return kCols / cell_slots<K>();
}

// The weight gate a forward slot takes on the input (hidden = false) or hidden side; −1: none (zero rows).
template <Kind K>
__device__ __forceinline__ int slot_gate(int slot, bool hidden) {
  if (K != Kind::gru) return slot;
  if (!hidden) return slot < 3 ? slot : -1;
  return slot < 2 ? slot : slot == 3 ? 2 : -1;
}

template <typename T>
__device__ __forceinline__ float bias(const T* b, int64_t i, int64_t stride) {
  return b != nullptr ? to_f32(b[i * stride]) : 0.0f;
}

// Accumulates a·W_sideᵀ (one side of the cell: x against W_ih or h against W_hh) into the block product.
template <typename T, Kind K>
__device__ void cell_side(BlockProduct<T>& prod, T* A_s, T* W_s, const T* a, int64_t s_ab, int64_t s_ak, int Kdim,
                          const T* w, int64_t s_wr, int64_t s_wc, bool hidden, int row0, int n_rows, int j0, int H) {
  constexpr int U = cell_units<K>();
  constexpr int LD = smem_ld<T>(kChunk);
  for (int k0 = 0; k0 < Kdim; k0 += kChunk) {
    __syncthreads();  // the previous chunk is consumed
    fill_rows(A_s, LD, n_rows, k0, kChunk, Kdim,
              [&](int r, int k) { return a[(row0 + r) * s_ab + k * s_ak]; });
    for (int idx = threadIdx.x; idx < kCols * kChunk; idx += kThreads) {
      const int col = idx / kChunk, k = idx % kChunk;
      const int g = slot_gate<K>(col / U, hidden), j = j0 + col % U;
      const bool inside = g >= 0 && j < H && k0 + k < Kdim;
      W_s[col * LD + k] = inside ? w[(static_cast<int64_t>(g) * H + j) * s_wr + (k0 + k) * s_wc] : from_f32<T>(0.0f);
    }
    __syncthreads();
    prod.chunk(A_s, LD, W_s, LD, kChunk, n_rows);
  }
}

template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads) cell_fwd_kernel(CellFwdArgs<T> p) {
  constexpr int U = cell_units<K>();
  constexpr int LD = smem_ld<T>(kChunk);
  __shared__ __align__(128) T A_s[kRows * LD];
  __shared__ __align__(128) T W_s[kCols * LD];
  __shared__ __align__(128) float part_s[partial_floats<T>(kCols)];
  const int j0 = blockIdx.x * U, row0 = blockIdx.y * kRows;
  const int n_rows = min(kRows, p.B - row0);

  BlockProduct<T> prod;
  prod.init(kCols);
  cell_side<T, K>(prod, A_s, W_s, p.x, p.s_xb, p.s_xk, p.I, p.w_ih, p.s_wir, p.s_wic, false, row0, n_rows, j0, p.H);
  if (p.has_state) {
    cell_side<T, K>(prod, A_s, W_s, p.h, p.s_hb, p.s_hk, p.H, p.w_hh, p.s_whr, p.s_whc, true, row0, n_rows, j0, p.H);
  }
  prod.store(part_s, kCols);
  __syncthreads();

  const int H = p.H;
  for (int idx = threadIdx.x; idx < kRows * U; idx += kThreads) {
    const int r = idx / U, u = idx % U, j = j0 + u;
    if (r >= n_rows || j >= H) continue;
    const int64_t b = row0 + r;
    auto pre = [&](int slot) { return product_sum<T>(part_s, kCols, r, slot * U + u); };
    if constexpr (K == Kind::lstm) {
      float a[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) a[g] = pre(g) + bias(p.b_ih, g * H + j, p.s_bi) + bias(p.b_hh, g * H + j, p.s_bh);
      float c_new, m;
      if (p.has_state) {
        lstm_update(a[0], a[1], a[2], a[3], to_f32(p.c[b * p.s_cb + j * p.s_ck]), c_new, m);
      } else {  // no f·c term at all (a NaN forget gate must not reach c' through 0·NaN)
        c_new = sigmoid_f32(a[0]) * tanh_f32(a[2]);
        m = sigmoid_f32(a[3]) * tanh_f32(c_new);
      }
      p.h_out[b * H + j] = from_f32<T>(m);
      p.c_out[b * H + j] = from_f32<T>(c_new);
      if (p.save) {
        float* w = p.ws + b * 5 * H + j;
#pragma unroll
        for (int g = 0; g < 4; ++g) w[g * H] = a[g];
        w[4 * H] = c_new;
      }
    } else if constexpr (K == Kind::gru) {
      const float a_r = pre(0) + bias(p.b_ih, j, p.s_bi) + bias(p.b_hh, j, p.s_bh);
      const float a_z = pre(1) + bias(p.b_ih, H + j, p.s_bi) + bias(p.b_hh, H + j, p.s_bh);
      const float xn = pre(2) + bias(p.b_ih, 2 * H + j, p.s_bi);
      const float hn = pre(3) + bias(p.b_hh, 2 * H + j, p.s_bh);  // W_hn·h + b_hn: r scales all of it
      float a_n, h_new;
      if (p.has_state) {
        h_new = gru_update(a_r, a_z, xn, hn, to_f32(p.h[b * p.s_hb + j * p.s_hk]), a_n);
      } else {
        a_n = xn + sigmoid_f32(a_r) * hn;
        const float n = tanh_f32(a_n);
        h_new = n - sigmoid_f32(a_z) * n;
      }
      p.h_out[b * H + j] = from_f32<T>(h_new);
      if (p.save) {
        float* w = p.ws + b * 4 * H + j;
        w[0] = a_r;
        w[H] = a_z;
        w[2 * H] = a_n;
        w[3 * H] = hn;
      }
    } else {
      const float a = pre(0) + bias(p.b_ih, j, p.s_bi) + bias(p.b_hh, j, p.s_bh);
      p.h_out[b * H + j] = from_f32<T>(rnn_activation(a, p.relu));
      if (p.save) p.ws[b * H + j] = a;
    }
  }
}

// The pre-activation gradients of row b, unit j: da[g] for the input side, dah[g] for the hidden side (they differ
// only in GRU's n gate). Returns dL/dc (LSTM) or z (GRU), else 0.
template <typename T, Kind K>
__device__ __forceinline__ float cell_gate_grads(const CellBwdArgs<T>& p, int64_t b, int j, float da[4],
                                                 float dah[4]) {
  const int H = p.H;
  const float dh = to_f32(p.dh[b * p.s_dhb + j * p.s_dhk]);
  float extra = 0.0f;
  if constexpr (K == Kind::lstm) {
    const float* w = p.ws + b * 5 * H + j;
    const float c_prev = p.has_state ? to_f32(p.c[b * p.s_cb + j * p.s_ck]) : 0.0f;
    extra = lstm_gate_grads(w[0], w[H], w[2 * H], w[3 * H], w[4 * H], c_prev, dh,
                            to_f32(p.dc[b * p.s_dcb + j * p.s_dck]), da);
#pragma unroll
    for (int g = 0; g < 4; ++g) dah[g] = da[g];
  } else if constexpr (K == Kind::gru) {
    const float* w = p.ws + b * 4 * H + j;
    const float h_prev = p.has_state ? to_f32(p.h[b * p.s_hb + j * p.s_hk]) : 0.0f;
    float da_hn;
    extra = gru_gate_grads(w[0], w[H], w[2 * H], w[3 * H], h_prev, dh, da, da_hn);
    dah[0] = da[0];
    dah[1] = da[1];
    dah[2] = da_hn;
  } else {
    da[0] = dah[0] = rnn_gate_grad(p.ws[b * H + j], dh, p.relu);
  }
  return extra;
}

// Block x = 0: the gate gradients and dL/dc of 16 rows, every unit.
template <typename T, Kind K>
__device__ void cell_bwd_pointwise(const CellBwdArgs<T>& p, int row0, int n_rows) {
  constexpr int G = K == Kind::lstm ? 4 : K == Kind::gru ? 3 : 1;
  const int H = p.H;
  for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(n_rows) * H; idx += kThreads) {
    const int64_t b = row0 + idx / H;
    const int j = static_cast<int>(idx % H);
    float da[4], dah[4];
    const float extra = cell_gate_grads<T, K>(p, b, j, da, dah);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      p.dgx[b * G * H + g * H + j] = from_f32<T>(da[g]);
      if (K == Kind::gru) p.dgh[b * G * H + g * H + j] = from_f32<T>(dah[g]);
    }
    if (K == Kind::lstm && p.has_state) p.dc_prev[b * H + j] = from_f32<T>(extra);
  }
}

// Blocks x ≥ 1: 32 columns of dx (against W_ih) or dh (against W_hh), dA recomputed chunk by chunk.
template <typename T, Kind K>
__device__ void cell_bwd_columns(const CellBwdArgs<T>& p, int row0, int n_rows) {
  constexpr int G = K == Kind::lstm ? 4 : K == Kind::gru ? 3 : 1;
  constexpr int KC = G * kBwdUnits;
  constexpr int LD = smem_ld<T>(4 * kBwdUnits);
  __shared__ __align__(128) T A_s[kRows * LD];
  __shared__ __align__(128) T W_s[kCols * LD];
  __shared__ __align__(128) float part_s[partial_floats<T>(kCols)];
  const int H = p.H;
  const int slice = blockIdx.x - 1;
  const bool is_x = slice < p.n_x_blocks;
  const int col0 = (is_x ? slice : slice - p.n_x_blocks) * kCols;
  const int n_cols = is_x ? p.I : H;
  const T* w = is_x ? p.w_ih : p.w_hh;
  const int64_t s_wr = is_x ? p.s_wir : p.s_whr, s_wc = is_x ? p.s_wic : p.s_whc;

  BlockProduct<T> prod;
  prod.init(kCols);
  for (int ju0 = 0; ju0 < H; ju0 += kBwdUnits) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kRows * kBwdUnits; idx += kThreads) {
      const int r = idx / kBwdUnits, u = idx % kBwdUnits, j = ju0 + u;
      float da[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dah[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (r < n_rows && j < H) cell_gate_grads<T, K>(p, row0 + r, j, da, dah);
#pragma unroll
      for (int g = 0; g < G; ++g) A_s[r * LD + g * kBwdUnits + u] = from_f32<T>(is_x ? da[g] : dah[g]);
    }
    for (int idx = threadIdx.x; idx < kCols * KC; idx += kThreads) {
      const int c = idx / KC, k = idx % KC, g = k / kBwdUnits, j = ju0 + k % kBwdUnits;
      const bool inside = j < H && col0 + c < n_cols;
      W_s[c * LD + k] =
          inside ? w[(static_cast<int64_t>(g) * H + j) * s_wr + static_cast<int64_t>(col0 + c) * s_wc]
                 : from_f32<T>(0.0f);
    }
    __syncthreads();
    prod.chunk(A_s, LD, W_s, LD, KC, n_rows);
  }
  prod.store(part_s, kCols);
  __syncthreads();
  T* out = is_x ? p.dx : p.dh_prev;
  for (int idx = threadIdx.x; idx < kRows * kCols; idx += kThreads) {
    const int r = idx / kCols, c = idx % kCols, col = col0 + c;
    if (r >= n_rows || col >= n_cols) continue;
    const int64_t b = row0 + r;
    float v = product_sum<T>(part_s, kCols, r, c);
    if (K == Kind::gru && !is_x) {  // h' = … + z·h: the direct path, z from its pre-activation
      v += to_f32(p.dh[b * p.s_dhb + col * p.s_dhk]) * sigmoid_f32(p.ws[b * 4 * H + H + col]);
    }
    out[b * n_cols + col] = from_f32<T>(v);
  }
}

template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads) cell_bwd_kernel(CellBwdArgs<T> p) {
  const int row0 = blockIdx.y * kRows;
  const int n_rows = min(kRows, p.B - row0);
  if (blockIdx.x == 0) {
    cell_bwd_pointwise<T, K>(p, row0, n_rows);
  } else {
    cell_bwd_columns<T, K>(p, row0, n_rows);
  }
}

}  // namespace

template <typename T>
void launch_cell_fwd(Kind kind, const CellFwdArgs<T>& args, cudaStream_t stream) {
  with_kind(kind, [&](auto k) {
    constexpr Kind K = decltype(k)::value;
    const dim3 grid(ceil_div(args.H, cell_units<K>()), ceil_div(args.B, kRows));
    cell_fwd_kernel<T, K><<<grid, kThreads, 0, stream>>>(args);
  });
  check_launch("cell_fwd_kernel");
}

template <typename T>
void launch_cell_bwd(Kind kind, const CellBwdArgs<T>& args, cudaStream_t stream) {
  const dim3 grid(1 + args.n_x_blocks + args.n_h_blocks, ceil_div(args.B, kRows));
  with_kind(kind, [&](auto k) { cell_bwd_kernel<T, decltype(k)::value><<<grid, kThreads, 0, stream>>>(args); });
  check_launch("cell_bwd_kernel");
}

#define FASTSEQ_INSTANTIATE(T)                                                             \
  template void launch_cell_fwd<T>(Kind, const CellFwdArgs<T>&, cudaStream_t);             \
  template void launch_cell_bwd<T>(Kind, const CellBwdArgs<T>&, cudaStream_t);
FASTSEQ_FOR_EACH_DTYPE(FASTSEQ_INSTANTIATE)
#undef FASTSEQ_INSTANTIATE

}  // namespace cuda
}  // namespace fastseq
