// The recurrence of one LSTM, GRU or Elman RNN (tanh / relu) layer over a whole sequence on CPU tensors, in one
// or two directions, forward and backward, padded or packed: torch.ops.fastseq_cpp.{lstm,gru,rnn}_layer_{fwd,bwd}
// (schemas in library.cpp). fastseq/cpp_kernels.py gives them the launcher interface of kernels/rnn_seq.py,
// whose contract they follow exactly: arguments, returned tensors, and the float32 workspace, per (direction,
// row) LSTM [a_i, a_f, a_g, a_o, c', c, m (only with a projection), h], GRU [a_r, a_z, a_n, hn, h], RNN [a, h]
// (pre-activations with every bias; h and c the state the step consumed), which the operators' weight gradients
// and either backend's backward read.
//
// Math (fastseq.reference, one layer): the caller has done gates_x = x·W_ihᵀ + b_ih for every step; per
// direction d and step t (forward t = 0…T−1, reverse T−1…0), a = gates_x[t] + b_hh + h·W_hhᵀ, then
//   LSTM  c' = σ(a_f)·c + σ(a_i)·tanh(a_g), m = σ(a_o)·tanh(c'), h' = m or m·W_hrᵀ (projection P)
//   GRU   a_n = gx_n + σ(a_r)·(h·W_hnᵀ + b_hn), n = tanh(a_n), h' = n + σ(a_z)·(h − n)
//   RNN   h' = tanh or relu(a)
// Packed (batch_sizes): at step t only rows b < batch_sizes[t] advance; the others keep their state.
//
// Per step: the product h[:n]·W_hh[d]ᵀ by the small-M kernel (small_gemm.h: W_hh read as stored, nothing packed),
// then one fused loop over (row, unit) that adds gates_x and b_hh, applies the update on the float32 state (which
// stays in cache from step to step) and writes out[t] (and the workspace in training). With a projection a second
// product makes h' = m·W_hrᵀ. Threads: directions run side by side, each its whole time loop on a thread of its
// own; threads beyond the directions split each step's units (unit_slices), so each thread reads the same rows of
// W_hh at every step. Backward runs each direction's steps in reverse, carrying float32 dh (and dc): the fused loop
// turns dh + grad_out[t] and the workspace into the gate gradients (written in the input dtype, and kept in float32
// for the GEMM dh ← dA_h·W_hh, through ATen's batch-reduce GEMM). Rows of its pointwise loops are split across
// threads (at::parallel_for) where a step has enough of them; its GEMMs thread themselves.

#include "rnn_common.h"

#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastseq {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------------------------------------------------
// Time steps, rows and sequences
// ---------------------------------------------------------------------------------------------------------

// The time steps of a launch: how many rows advance at step t and where step t's rows start in the row-major
// outputs (t·B padded, the exclusive cumulative sum of batch_sizes packed).
struct Steps {
  int64_t T = 0, B = 0, rows = 0;
  bool packed = false;
  std::vector<int64_t> sizes, offsets;

  int64_t n(int64_t t) const { return packed ? sizes[t] : B; }
  int64_t row0(int64_t t) const { return packed ? offsets[t] : t * B; }
};

Steps steps_of(const Tensor& seq, const OptTensor& batch_sizes, int64_t B) {
  Steps s;
  s.B = B;
  if (given(batch_sizes)) {
    TORCH_CHECK(seq.dim() == 2, "packed data must be 2-D (N, ·), got ", seq.sizes());
    const Tensor bs = batch_sizes->to(at::kCPU, at::kLong).contiguous();
    s.packed = true;
    s.T = bs.numel();
    s.rows = seq.size(0);
    const int64_t* p = bs.data_ptr<int64_t>();
    s.sizes.assign(p, p + s.T);
    s.offsets.resize(s.T);
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(s.sizes[t] >= 0 && s.sizes[t] <= B, "batch_sizes[", t, "] = ", s.sizes[t],
                  " is not in [0, ", B, "]");
      s.offsets[t] = total;
      total += s.sizes[t];
    }
    TORCH_CHECK(total == s.rows, "batch_sizes sum to ", total, " but the packed data has ", s.rows, " rows");
  } else {
    TORCH_CHECK(seq.dim() == 3 && seq.size(1) == B, "a padded sequence must be (T, ", B, ", ·), got ", seq.sizes());
    s.T = seq.size(0);
    s.rows = s.T * B;
  }
  return s;
}

// Rows of a (T, B, C) tensor with any strides but unit column stride, or of packed data (N, C).
template <typename T>
struct Seq {
  T* base;
  int64_t s_t, s_b;
  bool packed;

  T* row(int64_t t, int64_t row0, int64_t b) const { return base + (packed ? (row0 + b) * s_b : t * s_t + b * s_b); }
};

Seq<const float> seq_of(const Tensor& t, bool packed) {  // t: float32
  return {t.data_ptr<float>(), packed ? 0 : t.stride(0), packed ? t.stride(0) : t.stride(1), packed};
}


// ---------------------------------------------------------------------------------------------------------
// Forward: the update of one row at one step, for `units` consecutive units of the H (pointers start at the
// first; gate k of unit j sits at k·H + j)
// ---------------------------------------------------------------------------------------------------------

// gx: gates_x row of this direction (4H); bias: b_hh (4H); g: h·W_hhᵀ (4H); h_prev: the consumed state (Hout); c:
// the cell state (H), updated in place; h_next: where m goes (the next state, or with a projection the m buffer
// that the projection reads); out: out[t] row (unused with a projection); w0…w6: the workspace row's columns
// a_i, a_f, a_g, a_o, c', c, and m (projection) or the consumed h.
template <bool SAVE, bool PROJ>
FASTSEQ_ROW void lstm_fwd_row(int64_t units, int64_t H, const float* __restrict gx, const float* __restrict bias,
                              const float* __restrict g, const float* __restrict h_prev, float* __restrict c,
                              float* __restrict h_next, float* __restrict out, float* __restrict w0,
                              float* __restrict w1, float* __restrict w2, float* __restrict w3, float* __restrict w4,
                              float* __restrict w5, float* __restrict w6) {
  for (int64_t j = 0; j < units; ++j) {
    const float a_i = (gx[j] + bias[j]) + g[j];
    const float a_f = (gx[H + j] + bias[H + j]) + g[H + j];
    const float a_g = (gx[2 * H + j] + bias[2 * H + j]) + g[2 * H + j];
    const float a_o = (gx[3 * H + j] + bias[3 * H + j]) + g[3 * H + j];
    const float c_prev = c[j];
    const float c_new = sigmoid_f32(a_f) * c_prev + sigmoid_f32(a_i) * tanh_f32(a_g);
    const float m_new = sigmoid_f32(a_o) * tanh_f32(c_new);
    if constexpr (SAVE) {
      w0[j] = a_i;
      w1[j] = a_f;
      w2[j] = a_g;
      w3[j] = a_o;
      w4[j] = c_new;
      w5[j] = c_prev;
      w6[j] = PROJ ? m_new : h_prev[j];  // with a projection m, else (Hout = H) the consumed h
    }
    c[j] = c_new;
    h_next[j] = m_new;
    if constexpr (!PROJ) out[j] = m_new;
  }
}

// w0…w4: a_r, a_z, a_n, hn = W_hn·h + b_hn, the consumed h.
template <bool SAVE>
FASTSEQ_ROW void gru_fwd_row(int64_t units, int64_t H, const float* __restrict gx, const float* __restrict bias,
                             const float* __restrict g, const float* __restrict h_prev, float* __restrict h_next,
                             float* __restrict out, float* __restrict w0, float* __restrict w1, float* __restrict w2,
                             float* __restrict w3, float* __restrict w4) {
  for (int64_t j = 0; j < units; ++j) {
    const float a_r = (gx[j] + bias[j]) + g[j];
    const float a_z = (gx[H + j] + bias[H + j]) + g[H + j];
    const float hn = bias[2 * H + j] + g[2 * H + j];  // W_hn·h + b_hn: the reset gate scales all of it
    const float a_n = gx[2 * H + j] + sigmoid_f32(a_r) * hn;
    const float n = tanh_f32(a_n);
    const float h_old = h_prev[j];
    const float h_new = n + sigmoid_f32(a_z) * (h_old - n);  // torch's rounding structure
    if constexpr (SAVE) {
      w0[j] = a_r;
      w1[j] = a_z;
      w2[j] = a_n;
      w3[j] = hn;
      w4[j] = h_old;
    }
    h_next[j] = h_new;
    out[j] = h_new;
  }
}

// w0, w1: a and the consumed h.
template <bool SAVE, bool RELU>
FASTSEQ_ROW void rnn_fwd_row(int64_t units, const float* __restrict gx, const float* __restrict bias,
                             const float* __restrict g, const float* __restrict h_prev, float* __restrict h_next,
                             float* __restrict out, float* __restrict w0, float* __restrict w1) {
  for (int64_t j = 0; j < units; ++j) {
    const float a = (gx[j] + bias[j]) + g[j];
    const float h_new = RELU ? relu_f32(a) : tanh_f32(a);
    if constexpr (SAVE) {
      w0[j] = a;
      w1[j] = h_prev[j];
    }
    h_next[j] = h_new;
    out[j] = h_new;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward: the gate gradients of one row at one step from the workspace
// ---------------------------------------------------------------------------------------------------------

// ws: the workspace row; dh: carried dL/dh (Hout; without a projection dL/dm = dh + grad_out[t]); go:
// grad_out[t] row; dm: with a projection, dL/dm already made; dc: carried dL/dc', replaced by dL/dc;
// d0…d3: the gates_x gradient row's gate columns (float32; also the next GEMM's operand).
template <bool PROJ>
FASTSEQ_ROW void lstm_bwd_row(int64_t H, const float* __restrict ws, const float* __restrict dh,
                              const float* __restrict go, const float* __restrict dm_in, float* __restrict dc,
                              float* __restrict d0, float* __restrict d1, float* __restrict d2,
                              float* __restrict d3) {
  for (int64_t j = 0; j < H; ++j) {
    float dm;
    if constexpr (PROJ) {
      dm = dm_in[j];
    } else {
      dm = dh[j] + go[j];
    }
    float i, di, f, df, o, dO;
    sigmoid_and_grad(ws[j], i, di);
    sigmoid_and_grad(ws[H + j], f, df);
    const float a_g = ws[2 * H + j];
    sigmoid_and_grad(ws[3 * H + j], o, dO);
    const float c_new = ws[4 * H + j];
    const float c_prev = ws[5 * H + j];
    const float dct = dc[j] + dm * o * tanh_grad_f32(c_new);  // total dL/dc'
    d0[j] = dct * tanh_f32(a_g) * di;
    d1[j] = dct * c_prev * df;
    d2[j] = dct * i * tanh_grad_f32(a_g);
    d3[j] = dm * tanh_f32(c_new) * dO;
    dc[j] = dct * f;
  }
}

// dh: carried dL/dh, replaced by the direct part dh_t·z of dL/dh (the GEMM adds dgh·W_hh to it); x0…x2 / y0…y2:
// the gate columns of the gates_x gradient and of the hidden side (float32; the hidden side is the GEMM's).
FASTSEQ_ROW void gru_bwd_row(int64_t H, const float* __restrict ws, float* __restrict dh, const float* __restrict go,
                             float* __restrict x0, float* __restrict x1, float* __restrict x2, float* __restrict y0,
                             float* __restrict y1, float* __restrict y2) {
  for (int64_t j = 0; j < H; ++j) {
    const float dh_t = dh[j] + go[j];
    float r, dr, z, dz;
    sigmoid_and_grad(ws[j], r, dr);
    const float a_z = ws[H + j];
    sigmoid_and_grad(a_z, z, dz);
    const float a_n = ws[2 * H + j];
    const float hn = ws[3 * H + j];
    const float h_prev = ws[4 * H + j];
    const float da_n = dh_t * sigmoid_f32(-a_z) * tanh_grad_f32(a_n);  // 1 − z = σ(−a_z), no cancellation
    const float da_r = da_n * hn * dr;
    const float da_z = dh_t * (h_prev - tanh_f32(a_n)) * dz;
    x0[j] = da_r;
    x1[j] = da_z;
    x2[j] = da_n;
    y0[j] = da_r;
    y1[j] = da_z;
    y2[j] = da_n * r;
    dh[j] = dh_t * z;  // h' = … + z·h: the direct path
  }
}

template <bool RELU>
FASTSEQ_ROW void rnn_bwd_row(int64_t H, const float* __restrict ws, const float* __restrict dh,
                             const float* __restrict go, float* __restrict dg) {
  for (int64_t j = 0; j < H; ++j) {
    const float dh_t = dh[j] + go[j];
    const float a = ws[j];
    // relu: torch's threshold_backward, no gradient at 0 or NaN
    dg[j] = RELU ? (a > 0.0f ? dh_t : 0.0f) : dh_t * tanh_grad_f32(a);
  }
}

// ---------------------------------------------------------------------------------------------------------
// The time loops
// ---------------------------------------------------------------------------------------------------------

enum class Kind { lstm, gru, rnn };

int64_t num_gates(Kind k) { return k == Kind::lstm ? 4 : k == Kind::gru ? 3 : 1; }

int64_t ws_width(Kind k, int64_t H, int64_t P) {
  if (k == Kind::lstm) return 6 * H + (P ? H : 0) + (P ? P : H);
  return k == Kind::gru ? 5 * H : 2 * H;
}

// What one launch of a layer is made of, whatever the direction of the data.
struct Layer {
  Kind kind;
  int64_t D, B, H, HO, P, G, W;
  Steps steps;
  Tensor w_hh;  // float32, contiguous: (D, G, HO), as stored
  Tensor w_hr;  // float32, contiguous: (D, P, H), as stored; or undefined
};

Layer layer_of(Kind kind, const Tensor& seq, const Tensor& state, const Tensor& w_hh, const OptTensor& w_hr,
               const OptTensor& batch_sizes, const char* what) {
  check_dtype(seq, what);
  check_dtype(state, what);
  check_dtype(w_hh, "w_hh");
  TORCH_CHECK(state.dim() == 3 && w_hh.dim() == 3, what, ": states must be (D, B, ·) and w_hh (D, G, Hout)");
  Layer L;
  L.kind = kind;
  L.D = state.size(0);
  L.B = state.size(1);
  L.HO = state.size(2);
  const int64_t ng = num_gates(kind);
  TORCH_CHECK(w_hh.size(0) == L.D && w_hh.size(1) % ng == 0 && w_hh.size(2) == L.HO, what, ": w_hh ",
              w_hh.sizes(), " does not match the states ", state.sizes());
  L.H = w_hh.size(1) / ng;
  L.G = ng * L.H;
  L.P = 0;
  if (given(w_hr)) {
    TORCH_CHECK(kind == Kind::lstm && w_hr->dim() == 3 && w_hr->size(0) == L.D && w_hr->size(1) == L.HO &&
                    w_hr->size(2) == L.H,
                what, ": w_hr must be (", L.D, ", ", L.HO, ", ", L.H, "), got ", w_hr->sizes());
    L.P = w_hr->size(1);
  } else {
    TORCH_CHECK(L.HO == L.H, what, ": without a projection the hidden state has H = ", L.H, " units, got ", L.HO);
  }
  L.W = ws_width(kind, L.H, L.P);
  L.steps = steps_of(seq, batch_sizes, L.B);
  return L;
}

// Step s of direction d: the time index. Forward runs t = s (d = 0) or T−1−s (d = 1); backward the reverse.
inline int64_t time_of(int64_t s, int64_t T, int64_t d, bool backward) {
  const bool ascending = (d == 0) != backward;
  return ascending ? s : T - 1 - s;
}

// Below this many multiply-adds in one direction's step product (~100 µs of one core), a direction runs on one
// thread. Splitting a step across threads costs a parallel region per step: a few µs on an idle machine, but on a
// busy one every step waits for the slowest thread to be scheduled, and there it measured 10-300× slower than one
// thread (benchmarks/NOTES_cpu.md). Directions in parallel need no synchronisation and are always taken.
constexpr int64_t kParallelStepMinWork = int64_t{1} << 22;

// How many slices of units each direction's steps are split into (one thread each, one parallel region per step).
// Directions are independent, so with D ≥ threads each runs its whole time loop on a thread of its own without
// any synchronisation; only the remaining threads split a direction's units, each then reading the same rows of
// W_hh at every step, which stay in its core's cache. A projection needs every unit of m: one slice.
int64_t unit_slices(const Layer& L, bool proj) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (proj || L.D >= threads || L.B * L.G * L.HO < kParallelStepMinWork) return 1;
  return std::min(threads / L.D, std::max<int64_t>(1, L.H / 8));
}

// The forward time loop of a layer. gates_x, out: float32 with unit column stride (out: the contiguous output, or
// its float32 stand-in for low-precision inputs). Per direction the state h lives in two buffers, read by one
// step's product while its units write the other (slices of one step run concurrently); c is per unit, in place.
template <Kind K, bool SAVE, bool PROJ, bool RELU>
void layer_forward(const Layer& L, const Tensor& gates_x, const Tensor& h0, const OptTensor& c0, const Tensor& bias,
                   Tensor& out, Tensor& h_n, Tensor& c_n, Tensor& ws) {
  const Steps& S = L.steps;
  const int64_t H = L.H, HO = L.HO, G = L.G, W = L.W, D = L.D, B = L.B;
  const auto f32 = gates_x.options().dtype(at::kFloat);
  const Seq<const float> gx = seq_of(gates_x, S.packed);
  Tensor h = at::empty({D, 2, B, HO}, f32);
  h.select(1, 0).copy_(h0);
  Tensor c = K == Kind::lstm ? at::empty({D, B, H}, f32) : Tensor();
  if (c.defined()) c.copy_(*c0);
  Tensor gates = at::empty({D, B, G}, f32);
  Tensor m = PROJ ? at::empty({D, B, H}, f32) : Tensor();
  const small_gemm::Isa isa = small_gemm::best_isa();
  const int64_t ng = num_gates(K), s_out = D * HO;
  float* out_p = out.data_ptr<float>();

  // Step s of direction d for units [j0, j1).
  auto advance = [&](int64_t d, int64_t s, int64_t j0, int64_t j1) {
    const int64_t t = time_of(s, S.T, d, false), n = S.n(t), row0 = S.row0(t);
    const float* h_prev = h.data_ptr<float>() + (d * 2 + s % 2) * B * HO;
    float* h_next = h.data_ptr<float>() + (d * 2 + (s + 1) % 2) * B * HO;
    const int64_t k0 = PROJ ? 0 : j0, k1 = PROJ ? HO : j1;  // the state columns this slice owns
    for (int64_t b = n; b < B; ++b) {  // rows that do not advance (packed) keep their state
      std::memcpy(h_next + b * HO + k0, h_prev + b * HO + k0, (k1 - k0) * sizeof(float));
    }
    if (n == 0) return;
    float* g_d = gates.data_ptr<float>() + d * B * G;
    const NtOperand product{h_prev, HO, L.w_hh.data_ptr<float>() + d * G * HO, HO, HO};  // h·W_hh[d]ᵀ
    for (int64_t k = 0; k < ng; ++k) small_gemm::gemm_nt(isa, n, k * H + j0, k * H + j1, &product, 1, g_d, G, false);
    const float* b_d = bias.data_ptr<float>() + d * G + j0;
    float* c_d = c.defined() ? c.data_ptr<float>() + d * B * H : nullptr;
    float* m_d = PROJ ? m.data_ptr<float>() + d * B * H : nullptr;
    float* ws_d = SAVE ? ws.data_ptr<float>() + d * S.rows * W : nullptr;
    for (int64_t b = 0; b < n; ++b) {
      const float* gx_row = gx.row(t, row0, b) + d * G + j0;
      const float* g_row = g_d + b * G + j0;
      const float* hp_row = h_prev + b * HO + j0;
      float* out_row = out_p + (row0 + b) * s_out + d * HO + j0;
      const Cols w(SAVE ? ws_d + (row0 + b) * W + j0 : nullptr, H, 7);
      if constexpr (K == Kind::lstm) {
        lstm_fwd_row<SAVE, PROJ>(j1 - j0, H, gx_row, b_d, g_row, hp_row, c_d + b * H + j0,
                                 PROJ ? m_d + b * H + j0 : h_next + b * HO + j0, out_row, w.c[0], w.c[1], w.c[2],
                                 w.c[3], w.c[4], w.c[5], w.c[6]);
      } else if constexpr (K == Kind::gru) {
        gru_fwd_row<SAVE>(j1 - j0, H, gx_row, b_d, g_row, hp_row, h_next + b * HO + j0, out_row, w.c[0], w.c[1],
                          w.c[2], w.c[3], w.c[4]);
      } else {
        rnn_fwd_row<SAVE, RELU>(j1 - j0, gx_row, b_d, g_row, hp_row, h_next + b * HO + j0, out_row, w.c[0], w.c[1]);
      }
    }
    if constexpr (PROJ) {  // h' = m·W_hr[d]ᵀ needs every unit of m (one slice)
      if constexpr (SAVE) {
        for (int64_t b = 0; b < n; ++b) {
          std::memcpy(ws_d + (row0 + b) * W + (W - HO), h_prev + b * HO, HO * sizeof(float));
        }
      }
      const NtOperand projection{m_d, H, L.w_hr.data_ptr<float>() + d * HO * H, H, H};
      small_gemm::gemm_nt(isa, n, 0, HO, &projection, 1, h_next, HO, false);
      for (int64_t b = 0; b < n; ++b) {
        std::memcpy(out_p + (row0 + b) * s_out + d * HO, h_next + b * HO, HO * sizeof(float));
      }
    }
  };

  const int64_t slices = unit_slices(L, PROJ);
  if (slices == 1) {
    at::parallel_for(0, D, 1, [&](int64_t d_begin, int64_t d_end) {
      for (int64_t d = d_begin; d < d_end; ++d) {
        for (int64_t s = 0; s < S.T; ++s) advance(d, s, 0, H);
      }
    });
  } else {
    for (int64_t s = 0; s < S.T; ++s) {
      at::parallel_for(0, D * slices, 1, [&](int64_t i_begin, int64_t i_end) {
        for (int64_t i = i_begin; i < i_end; ++i) {
          const int64_t d = i / slices, k = i % slices;
          advance(d, s, H * k / slices, H * (k + 1) / slices);
        }
      });
    }
  }
  h_n.copy_(h.select(1, S.T % 2));
  if (c.defined()) c_n.copy_(c);
}

// The backward time loop of a layer. grad_out: float32 with unit column stride; dgx, dgh: float32 contiguous
// (the outputs, or their float32 stand-ins for low-precision inputs; dgh is dgx except for GRU).
template <Kind K, bool PROJ, bool RELU>
void layer_backward(const Layer& L, const Tensor& grad_out, const Tensor& grad_hn, const OptTensor& grad_cn,
                    const Tensor& ws, Tensor& dgx, Tensor& dgh, Tensor& dh0, Tensor& dc0, Tensor& dht) {
  const Steps& S = L.steps;
  const int64_t H = L.H, HO = L.HO, G = L.G, W = L.W, D = L.D, P = L.P;
  const auto f32 = grad_out.options().dtype(at::kFloat);
  const Seq<const float> go = seq_of(grad_out, S.packed);
  Tensor dh = at::empty({L.B, HO}, f32);
  Tensor dc = K == Kind::lstm ? at::empty({L.B, H}, f32) : Tensor();
  Tensor dm = PROJ ? at::empty({L.B, H}, f32) : Tensor();
  float* dh_p = dh.data_ptr<float>();
  float* dc_p = dc.defined() ? dc.data_ptr<float>() : nullptr;
  float* dm_p = PROJ ? dm.data_ptr<float>() : nullptr;
  const float* ws_p = ws.data_ptr<float>();
  float* dgx_p = dgx.data_ptr<float>();
  float* dgh_p = dgh.data_ptr<float>();
  const int64_t s_dg = D * G;
  for (int64_t d = 0; d < D; ++d) {
    dh.copy_(grad_hn.select(0, d));
    if (dc.defined()) dc.copy_(grad_cn->select(0, d));
    const float* w_p = L.w_hh.data_ptr<float>() + d * G * HO;            // W_hh (G, HO)
    const float* wr_p = PROJ ? L.w_hr.data_ptr<float>() + d * P * H : nullptr;  // W_hr (P, H)
    const float* ws_d = ws_p + d * S.rows * W;
    for (int64_t s = 0; s < S.T; ++s) {
      const int64_t t = time_of(s, S.T, d, true), n = S.n(t), row0 = S.row0(t);
      if (n == 0) continue;
      if (PROJ) {  // dL/dh of the step's output (written: the caller's dW_hr), then dL/dm = that · W_hr
        float* dht_p = dht.data_ptr<float>() + (d * S.rows + row0) * P;
        for (int64_t b = 0; b < n; ++b) {
          const float* go_row = go.row(t, row0, b) + d * HO;
          for (int64_t p = 0; p < P; ++p) dht_p[b * P + p] = dh_p[b * HO + p] + go_row[p];
        }
        step_gemm(n, H, P, dht_p, P, wr_p, H, dm_p, H, false);
      }
      for_rows(n, 12 * H, [&](int64_t b) {
        const float* ws_row = ws_d + (row0 + b) * W;
        const float* go_row = go.row(t, row0, b) + d * HO;
        const Cols x(dgx_p + (row0 + b) * s_dg + d * G, H, 4);
        if constexpr (K == Kind::lstm) {
          lstm_bwd_row<PROJ>(H, ws_row, dh_p + b * HO, go_row, PROJ ? dm_p + b * H : nullptr, dc_p + b * H,
                             x.c[0], x.c[1], x.c[2], x.c[3]);
        } else if constexpr (K == Kind::gru) {
          const Cols y(dgh_p + (row0 + b) * s_dg + d * G, H, 3);
          gru_bwd_row(H, ws_row, dh_p + b * HO, go_row, x.c[0], x.c[1], x.c[2], y.c[0], y.c[1], y.c[2]);
        } else {
          rnn_bwd_row<RELU>(H, ws_row, dh_p + b * HO, go_row, x.c[0]);
        }
      });
      // dh ← dA_h·W_hh (GRU: dh·z + dA_h·W_hh), dA_h read in place: this step's rows of the hidden-side
      // gradient, this direction's columns
      step_gemm(n, HO, G, dgh_p + row0 * s_dg + d * G, s_dg, w_p, HO, dh_p, HO, K == Kind::gru);
    }
    dh0.select(0, d).copy_(dh);
    if (dc.defined()) dc0.select(0, d).copy_(dc);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_fwd(Kind kind, const Tensor& gates_x, const Tensor& h0,
                                                     const OptTensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
                                                     const OptTensor& w_hr, const OptTensor& batch_sizes, bool save,
                                                     bool relu, const char* what) {
  Layer L = layer_of(kind, gates_x, h0, w_hh, w_hr, batch_sizes, what);
  TORCH_CHECK(gates_x.size(-1) == L.D * L.G, what, ": gates_x must have D·G = ", L.D * L.G, " columns, got ",
              gates_x.size(-1));
  if (kind == Kind::lstm) {
    TORCH_CHECK(given(c0) && c0->dim() == 3 && c0->size(0) == L.D && c0->size(1) == L.B && c0->size(2) == L.H,
                what, ": c0 must be (", L.D, ", ", L.B, ", ", L.H, ")");
  }
  const Steps& S = L.steps;
  auto shape = gates_x.sizes().vec();
  shape.back() = L.D * L.HO;
  const auto f32 = gates_x.options().dtype(at::kFloat);
  Tensor out = at::empty(shape, gates_x.options());
  Tensor h_n = at::empty({L.D, L.B, L.HO}, gates_x.options());
  Tensor c_n = kind == Kind::lstm ? at::empty({L.D, L.B, L.H}, gates_x.options()) : at::empty({0}, gates_x.options());
  Tensor ws = save ? at::empty({L.D, S.rows, L.W}, f32) : at::empty({0}, f32);
  if (S.T == 0 || L.B == 0 || S.rows == 0) {  // nothing advances: the final state is the initial one
    h_n.copy_(h0);
    if (kind == Kind::lstm) c_n.copy_(*c0);
    return {out, h_n, c_n, ws};
  }
  // Low-precision inputs: the whole sequence converted to float32 once, the output rounded once at the end.
  const bool f32_io = gates_x.scalar_type() == at::kFloat;
  L.w_hh = f32_contiguous(w_hh);  // the products read the weights as stored, rows of W_hh[d] and W_hr[d]
  if (L.P) L.w_hr = f32_contiguous(*w_hr);
  const Tensor gx = unit_column_stride(as_f32(gates_x));
  Tensor out32 = f32_io ? out : at::empty(shape, f32);
  const Tensor bias = given(b_hh) ? f32_contiguous(*b_hh) : at::zeros({L.D, L.G}, f32);
  TORCH_CHECK(bias.numel() == L.D * L.G, what, ": b_hh must be (", L.D, ", ", L.G, ")");
  // Only the flags a kind has are template arguments: LSTM (save, projection), GRU (save), RNN (save, relu).
  if (kind == Kind::lstm) {
    with_flags(save, L.P > 0, [&](auto sv, auto pj) {
      layer_forward<Kind::lstm, decltype(sv)::value, decltype(pj)::value, false>(L, gx, h0, c0, bias, out32, h_n,
                                                                                 c_n, ws);
    });
  } else if (kind == Kind::gru) {
    with_flags(save, false, [&](auto sv, auto) {
      layer_forward<Kind::gru, decltype(sv)::value, false, false>(L, gx, h0, c0, bias, out32, h_n, c_n, ws);
    });
  } else {
    with_flags(save, relu, [&](auto sv, auto rl) {
      layer_forward<Kind::rnn, decltype(sv)::value, false, decltype(rl)::value>(L, gx, h0, c0, bias, out32, h_n,
                                                                                c_n, ws);
    });
  }
  if (!f32_io) out.copy_(out32);  // round to nearest even
  return {out, h_n, c_n, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_bwd(Kind kind, const Tensor& grad_out, const Tensor& grad_hn,
                                                             const OptTensor& grad_cn, const Tensor& workspace,
                                                             const Tensor& w_hh, const OptTensor& w_hr,
                                                             const OptTensor& batch_sizes, bool relu,
                                                             const char* what) {
  Layer L = layer_of(kind, grad_out, grad_hn, w_hh, w_hr, batch_sizes, what);
  TORCH_CHECK(grad_out.size(-1) == L.D * L.HO, what, ": grad_out must have D·Hout = ", L.D * L.HO,
              " columns, got ", grad_out.size(-1));
  if (kind == Kind::lstm) {
    TORCH_CHECK(given(grad_cn) && grad_cn->dim() == 3 && grad_cn->size(0) == L.D && grad_cn->size(1) == L.B &&
                    grad_cn->size(2) == L.H,
                what, ": grad_cn must be (", L.D, ", ", L.B, ", ", L.H, ")");
  }
  const Steps& S = L.steps;
  const auto opts = w_hh.options();
  const auto f32 = opts.dtype(at::kFloat);
  auto shape = grad_out.sizes().vec();
  shape.back() = L.D * L.G;
  Tensor dgx = at::empty(shape, opts);
  Tensor dgh = kind == Kind::gru ? at::empty(shape, opts) : at::empty({0}, opts);
  Tensor dh0 = at::empty({L.D, L.B, L.HO}, opts);
  Tensor dc0 = kind == Kind::lstm ? at::empty({L.D, L.B, L.H}, opts) : at::empty({0}, opts);
  Tensor dht = at::empty(L.P ? std::vector<int64_t>{L.D, S.rows, L.P} : std::vector<int64_t>{0}, f32);
  if (S.T == 0 || L.B == 0 || S.rows == 0) {  // no step: the initial state's gradient is the final state's
    dh0.copy_(grad_hn);
    if (kind == Kind::lstm) dc0.copy_(*grad_cn);
    return {dgx, dgh, dh0, dc0, dht};
  }
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.dim() == 3 && workspace.size(0) == L.D &&
                  workspace.size(1) == S.rows && workspace.size(2) == L.W,
              what, ": the workspace must be float32 (", L.D, ", ", S.rows, ", ", L.W, "), got ",
              workspace.scalar_type(), " ", workspace.sizes());
  const bool f32_io = w_hh.scalar_type() == at::kFloat;
  L.w_hh = f32_contiguous(w_hh);
  if (L.P) L.w_hr = f32_contiguous(*w_hr);
  const Tensor go = unit_column_stride(as_f32(grad_out));
  const Tensor ws = workspace.contiguous();
  Tensor dgx32 = f32_io ? dgx : at::empty(shape, f32);
  Tensor dgh32 = kind != Kind::gru ? dgx32 : f32_io ? dgh : at::empty(shape, f32);
  if (kind == Kind::lstm) {
    with_flags(L.P > 0, false, [&](auto pj, auto) {
      layer_backward<Kind::lstm, decltype(pj)::value, false>(L, go, grad_hn, grad_cn, ws, dgx32, dgh32, dh0, dc0,
                                                             dht);
    });
  } else if (kind == Kind::gru) {
    layer_backward<Kind::gru, false, false>(L, go, grad_hn, grad_cn, ws, dgx32, dgh32, dh0, dc0, dht);
  } else {
    with_flags(relu, false, [&](auto rl, auto) {
      layer_backward<Kind::rnn, false, decltype(rl)::value>(L, go, grad_hn, grad_cn, ws, dgx32, dgh32, dh0, dc0,
                                                            dht);
    });
  }
  if (!f32_io) {  // round to nearest even
    dgx.copy_(dgx32);
    if (kind == Kind::gru) dgh.copy_(dgh32);
  }
  return {dgx, dgh, dh0, dc0, dht};
}

// ---------------------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_fwd(const Tensor& gates_x, const Tensor& h0, const Tensor& c0,
                                                          const Tensor& w_hh, const OptTensor& b_hh,
                                                          const OptTensor& w_hr, const OptTensor& batch_sizes,
                                                          bool save) {
  return layer_fwd(Kind::lstm, gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, save, false, "lstm_layer_fwd");
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_fwd(const Tensor& gates_x, const Tensor& h0, const Tensor& w_hh,
                                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool save) {
  auto r = layer_fwd(Kind::gru, gates_x, h0, std::nullopt, w_hh, b_hh, std::nullopt, batch_sizes, save, false,
                     "gru_layer_fwd");
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r)};
}

std::tuple<Tensor, Tensor, Tensor> rnn_layer_fwd(const Tensor& gates_x, const Tensor& h0, const Tensor& w_hh,
                                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool save,
                                                 std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  auto r = layer_fwd(Kind::rnn, gates_x, h0, std::nullopt, w_hh, b_hh, std::nullopt, batch_sizes, save, relu,
                     "rnn_layer_fwd");
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_bwd(const Tensor& grad_out, const Tensor& grad_hn,
                                                          const Tensor& grad_cn, const Tensor& workspace,
                                                          const Tensor& w_hh, const OptTensor& w_hr,
                                                          const OptTensor& batch_sizes) {
  auto r = layer_bwd(Kind::lstm, grad_out, grad_hn, grad_cn, workspace, w_hh, w_hr, batch_sizes, false,
                     "lstm_layer_bwd");
  return {std::get<0>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_bwd(const Tensor& grad_out, const Tensor& grad_hn,
                                                 const Tensor& workspace, const Tensor& w_hh,
                                                 const OptTensor& batch_sizes) {
  auto r = layer_bwd(Kind::gru, grad_out, grad_hn, std::nullopt, workspace, w_hh, std::nullopt, batch_sizes, false,
                     "gru_layer_bwd");
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<Tensor, Tensor> rnn_layer_bwd(const Tensor& grad_out, const Tensor& grad_hn, const Tensor& workspace,
                                         const Tensor& w_hh, const OptTensor& batch_sizes, std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  auto r = layer_bwd(Kind::rnn, grad_out, grad_hn, std::nullopt, workspace, w_hh, std::nullopt, batch_sizes, relu,
                     "rnn_layer_bwd");
  return {std::get<0>(r), std::get<2>(r)};
}

}  // namespace
}  // namespace cpu
}  // namespace fastseq

TORCH_LIBRARY_IMPL(fastseq_cpp, CPU, m) {
  m.impl("lstm_layer_fwd", &fastseq::cpu::lstm_layer_fwd);
  m.impl("gru_layer_fwd", &fastseq::cpu::gru_layer_fwd);
  m.impl("rnn_layer_fwd", &fastseq::cpu::rnn_layer_fwd);
  m.impl("lstm_layer_bwd", &fastseq::cpu::lstm_layer_bwd);
  m.impl("gru_layer_bwd", &fastseq::cpu::gru_layer_bwd);
  m.impl("rnn_layer_bwd", &fastseq::cpu::rnn_layer_bwd);
}
