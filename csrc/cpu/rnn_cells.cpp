// One step of the recurrent cells on CPU tensors: LSTM, GRU and Elman RNN (tanh / relu), forward and backward.
// The operators torch.ops.fastseq_cpp.{lstm,gru,rnn}_cell_{fwd,bwd} (schemas in library.cpp); the Python adapter
// fastseq/cpp_kernels.py gives them the launcher interface of kernels/rnn_cell.py, whose contract (arguments,
// returned tensors, workspace layout) they follow exactly.
//
// Math (fastseq.reference): with G gates stacked in torch's order (LSTM i,f,g,o; GRU r,z,n; RNN one),
// a = x·W_ihᵀ + b_ih + h·W_hhᵀ + b_hh, then the gate nonlinearities and the state update.
//
// Forward: the two products on float32 operands, for a few rows by the small-M kernel (small_gemm.h: the weights
// read once, in place; x·W_ihᵀ + h·W_hhᵀ summed in one accumulator for LSTM and RNN), for more by ATen's GEMM
// (GRU keeps the hidden side apart, since the reset gate scales its candidate term), then one fused
// loop over (row, unit) that adds the biases, applies the nonlinearities and the update and writes h' (c'), and
// in training the float32 workspace of pre-activations (LSTM: a_i, a_f, a_g, a_o, c'; GRU: a_r, a_z, a_n,
// W_hn·h + b_hn; RNN: a), exactly the Triton kernels' layout, so either backend's backward reads the other's.
//
// Backward: one fused loop turns the output gradients and the workspace into the pre-activation gradients dA
// (float32; written out in the input dtype), and dc for LSTM; then dx = dA_x·W_ih and dh = dA_h·W_hh (+ GRU's
// direct dh·z) as GEMMs. Rows are split across threads with at::parallel_for; units run in the inner,
// vectorised loop.

#include "rnn_common.h"

#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastseq {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// A bias as float32 contiguous, or zeros of `n` where absent (adding 0 leaves every pre-activation as is).
Tensor bias_or_zeros(const OptTensor& b, int64_t n, const Tensor& like) {
  if (b.has_value() && b->defined()) return f32_contiguous(*b);
  return at::zeros({n}, like.options().dtype(at::kFloat));
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// Where the kernels write an output: the output itself when float32, else a float32 stand-in that round_into
// then rounds (to nearest even) into it.
Tensor float_out(const Tensor& out) {
  return out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
}

void round_into(Tensor& out, const Tensor& out32) {
  if (!out.is_same(out32)) out.copy_(out32);
}

// `shape` when `cond`, else (0,): the shape of an optional result (absent ones travel as empty tensors).
std::vector<int64_t> shape_if(bool cond, std::vector<int64_t> shape) {
  return cond ? shape : std::vector<int64_t>{0};
}

void check_state(const Tensor& t, int64_t B, int64_t H, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == H, "cell: ", name, " must be (", B, ", ", H, "), got ",
              t.sizes());
}

void check_cell(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh, int64_t gates) {
  check_dtype(x, "input");
  check_dtype(w_ih, "w_ih");
  check_dtype(w_hh, "w_hh");
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2, "cell: input and weights must be 2-D");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_ih.size(0) == gates * H && w_hh.size(0) == gates * H && w_ih.size(1) == x.size(1),
              "cell: weight shapes ", w_ih.sizes(), " and ", w_hh.sizes(), " do not match input ", x.sizes(),
              " and ", gates, " gates");
  if (given(h)) check_state(*h, x.size(0), H, "h");
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// x·W_ihᵀ, plus h·W_hhᵀ when h is defined: float32 (B, N). Up to kSmallGemmMaxRows rows the small-M kernel reads
// the weights in place (any row stride), once for all rows, and sums both products in each output's accumulator;
// larger batches go through ATen's GEMM.
Tensor gate_products(const Tensor& x, const Tensor& w_ih, const Tensor& h = Tensor(), const Tensor& w_hh = Tensor()) {
  const int64_t B = x.size(0), N = w_ih.size(0);
  if (B > kSmallGemmMaxRows) {
    Tensor out = at::cpu::mm(f32_contiguous(x), f32_contiguous(w_ih).t());
    if (h.defined()) at::cpu::addmm_(out, f32_contiguous(h), f32_contiguous(w_hh).t());
    return out;
  }
  // Held here: the operands point into them.
  const Tensor x32 = unit_column_stride(as_f32(x)), wi32 = unit_column_stride(as_f32(w_ih));
  const Tensor h32 = h.defined() ? unit_column_stride(as_f32(h)) : Tensor();
  const Tensor wh32 = h.defined() ? unit_column_stride(as_f32(w_hh)) : Tensor();
  NtOperand ops[2] = {nt_operand(x32, wi32), {}};
  if (h.defined()) ops[1] = nt_operand(h32, wh32);
  Tensor out = at::empty({B, N}, x.options().dtype(at::kFloat));
  gemm_nt(B, N, ops, h.defined() ? 2 : 1, out.data_ptr<float>(), N, false);
  return out;
}

Tensor state_or_undefined(const OptTensor& t) { return given(t) ? *t : Tensor(); }

// One row's units (j < H): g = the summed products (LSTM, RNN) or x·W_ihᵀ and h·W_hhᵀ apart (GRU); bi, bh the
// biases; c / h the consumed state (HAS_STATE); outputs h' (c') in float32; ws the row's workspace (SAVE).
template <bool HAS_STATE, bool SAVE>
FASTSEQ_ROW void lstm_fwd_row(int64_t H, const float* __restrict g, const float* __restrict bi,
                              const float* __restrict bh, const float* __restrict c, float* __restrict h_out,
                              float* __restrict c_out, float* __restrict w0, float* __restrict w1,
                              float* __restrict w2, float* __restrict w3, float* __restrict w4) {
  for (int64_t j = 0; j < H; ++j) {
    const float a_i = g[j] + bi[j] + bh[j];
    const float a_f = g[H + j] + bi[H + j] + bh[H + j];
    const float a_g = g[2 * H + j] + bi[2 * H + j] + bh[2 * H + j];
    const float a_o = g[3 * H + j] + bi[3 * H + j] + bh[3 * H + j];
    const float i = sigmoid_f32(a_i);
    const float gg = tanh_f32(a_g);
    const float o = sigmoid_f32(a_o);
    float c_new;
    if constexpr (HAS_STATE) {
      c_new = sigmoid_f32(a_f) * c[j] + i * gg;
    } else {
      c_new = i * gg;
    }
    h_out[j] = o * tanh_f32(c_new);
    c_out[j] = c_new;
    if constexpr (SAVE) {
      w0[j] = a_i;
      w1[j] = a_f;
      w2[j] = a_g;
      w3[j] = a_o;
      w4[j] = c_new;
    }
  }
}

template <bool HAS_STATE, bool SAVE>
FASTSEQ_ROW void gru_fwd_row(int64_t H, const float* __restrict x, const float* __restrict y,
                             const float* __restrict bi, const float* __restrict bh, const float* __restrict h,
                             float* __restrict h_out, float* __restrict w0, float* __restrict w1,
                             float* __restrict w2, float* __restrict w3) {
  for (int64_t j = 0; j < H; ++j) {
    float a_r = x[j], a_z = x[H + j], hn = 0.0f;
    if constexpr (HAS_STATE) {
      a_r = a_r + y[j];
      a_z = a_z + y[H + j];
      hn = y[2 * H + j];
    }
    a_r = a_r + bi[j] + bh[j];
    a_z = a_z + bi[H + j] + bh[H + j];
    const float xn = x[2 * H + j] + bi[2 * H + j];
    hn = hn + bh[2 * H + j];  // W_hn·h + b_hn: the reset gate scales all of it
    const float r = sigmoid_f32(a_r);
    const float z = sigmoid_f32(a_z);
    const float a_n = xn + r * hn;
    const float n = tanh_f32(a_n);
    // (1 − z)·n + z·h written as torch writes it, so near-cancellation rounds as in torch
    if constexpr (HAS_STATE) {
      h_out[j] = n + z * (h[j] - n);
    } else {
      h_out[j] = n - z * n;
    }
    if constexpr (SAVE) {
      w0[j] = a_r;
      w1[j] = a_z;
      w2[j] = a_n;
      w3[j] = hn;
    }
  }
}

template <bool RELU, bool SAVE>
FASTSEQ_ROW void rnn_fwd_row(int64_t H, const float* __restrict g, const float* __restrict bi,
                             const float* __restrict bh, float* __restrict h_out, float* __restrict ws) {
  for (int64_t j = 0; j < H; ++j) {
    const float a = g[j] + bi[j] + bh[j];
    h_out[j] = RELU ? relu_f32(a) : tanh_f32(a);
    if constexpr (SAVE) ws[j] = a;
  }
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& x, const OptTensor& h, const OptTensor& c,
                                                 const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                 const OptTensor& b_hh, bool save) {
  check_cell(x, h, w_ih, w_hh, 4);
  TORCH_CHECK(given(h) == given(c), "lstm_cell_fwd: h and c must both be given or both be None");
  if (given(c)) check_state(*c, x.size(0), w_hh.size(1), "c");
  const int64_t B = x.size(0), H = w_hh.size(1);
  Tensor h_out = at::empty({B, H}, x.options());
  Tensor c_out = at::empty({B, H}, x.options());
  Tensor ws = at::empty(shape_if(save, {B, 5 * H}), x.options().dtype(at::kFloat));
  if (B == 0 || H == 0) return {h_out, c_out, ws};
  Tensor gates = gate_products(x, w_ih, state_or_undefined(h), w_hh);  // (B, 4H) float32
  Tensor c32 = given(h) ? f32_contiguous(*c) : Tensor();
  const Tensor bi = bias_or_zeros(b_ih, 4 * H, x), bh = bias_or_zeros(b_hh, 4 * H, x);
  Tensor h32 = float_out(h_out), c32_out = float_out(c_out);
  const float *g_p = gates.data_ptr<float>(), *bi_p = bi.data_ptr<float>(), *bh_p = bh.data_ptr<float>();
  const float* c_p = given(h) ? c32.data_ptr<float>() : nullptr;
  float *h_p = h32.data_ptr<float>(), *co_p = c32_out.data_ptr<float>(), *ws_p = save ? ws.data_ptr<float>() : nullptr;
  with_flags(given(h), save, [&](auto has_state, auto do_save) {
    constexpr bool HS = decltype(has_state)::value, SV = decltype(do_save)::value;
    for_rows(B, 5 * H, [&](int64_t b) {
      const Cols w(SV ? ws_p + b * 5 * H : nullptr, H, 5);
      lstm_fwd_row<HS, SV>(H, g_p + b * 4 * H, bi_p, bh_p, HS ? c_p + b * H : nullptr, h_p + b * H, co_p + b * H,
                           w.c[0], w.c[1], w.c[2], w.c[3], w.c[4]);
    });
  });
  round_into(h_out, h32);
  round_into(c_out, c32_out);
  return {h_out, c_out, ws};
}

std::tuple<Tensor, Tensor> gru_cell_fwd(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                        const OptTensor& b_ih, const OptTensor& b_hh, bool save) {
  check_cell(x, h, w_ih, w_hh, 3);
  const int64_t B = x.size(0), H = w_hh.size(1);
  Tensor h_out = at::empty({B, H}, x.options());
  Tensor ws = at::empty(shape_if(save, {B, 4 * H}), x.options().dtype(at::kFloat));
  if (B == 0 || H == 0) return {h_out, ws};
  Tensor gx = gate_products(x, w_ih);  // (B, 3H)
  Tensor gh, h32;
  if (given(h)) {
    gh = gate_products(*h, w_hh);  // (B, 3H), apart: r scales its n part
    h32 = f32_contiguous(*h);
  }
  const Tensor bi = bias_or_zeros(b_ih, 3 * H, x), bh = bias_or_zeros(b_hh, 3 * H, x);
  Tensor h_out32 = float_out(h_out);
  const float *x_p = gx.data_ptr<float>(), *bi_p = bi.data_ptr<float>(), *bh_p = bh.data_ptr<float>();
  const float *y_p = given(h) ? gh.data_ptr<float>() : nullptr, *h_p = given(h) ? h32.data_ptr<float>() : nullptr;
  float *o_p = h_out32.data_ptr<float>(), *ws_p = save ? ws.data_ptr<float>() : nullptr;
  with_flags(given(h), save, [&](auto has_state, auto do_save) {
    constexpr bool HS = decltype(has_state)::value, SV = decltype(do_save)::value;
    for_rows(B, 4 * H, [&](int64_t b) {
      const Cols w(SV ? ws_p + b * 4 * H : nullptr, H, 4);
      gru_fwd_row<HS, SV>(H, x_p + b * 3 * H, HS ? y_p + b * 3 * H : nullptr, bi_p, bh_p, HS ? h_p + b * H : nullptr,
                          o_p + b * H, w.c[0], w.c[1], w.c[2], w.c[3]);
    });
  });
  round_into(h_out, h_out32);
  return {h_out, ws};
}

std::tuple<Tensor, Tensor> rnn_cell_fwd(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                        const OptTensor& b_ih, const OptTensor& b_hh, bool save,
                                        std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  check_cell(x, h, w_ih, w_hh, 1);
  const int64_t B = x.size(0), H = w_hh.size(1);
  Tensor h_out = at::empty({B, H}, x.options());
  Tensor ws = at::empty(shape_if(save, {B, H}), x.options().dtype(at::kFloat));
  if (B == 0 || H == 0) return {h_out, ws};
  Tensor gates = gate_products(x, w_ih, state_or_undefined(h), w_hh);
  const Tensor bi = bias_or_zeros(b_ih, H, x), bh = bias_or_zeros(b_hh, H, x);
  Tensor h_out32 = float_out(h_out);
  const float *g_p = gates.data_ptr<float>(), *bi_p = bi.data_ptr<float>(), *bh_p = bh.data_ptr<float>();
  float *o_p = h_out32.data_ptr<float>(), *ws_p = save ? ws.data_ptr<float>() : nullptr;
  with_flags(relu, save, [&](auto is_relu_t, auto do_save) {
    constexpr bool RL = decltype(is_relu_t)::value, SV = decltype(do_save)::value;
    for_rows(B, 2 * H, [&](int64_t b) {
      rnn_fwd_row<RL, SV>(H, g_p + b * H, bi_p, bh_p, o_p + b * H, SV ? ws_p + b * H : nullptr);
    });
  });
  round_into(h_out, h_out32);
  return {h_out, ws};
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// One row's units from the workspace: dh = dL/dh' (and dc = dL/dc'), c / h the consumed state (HAS_STATE);
// out: the pre-activation gradients, and dL/dc (LSTM) or the direct part dh·z of dL/dh (GRU).
template <bool HAS_STATE>
FASTSEQ_ROW void lstm_bwd_row(int64_t H, const float* __restrict w, const float* __restrict dh,
                              const float* __restrict dc, const float* __restrict c, float* __restrict d0,
                              float* __restrict d1, float* __restrict d2, float* __restrict d3,
                              float* __restrict dc_out) {
  for (int64_t j = 0; j < H; ++j) {
    float i, di, f, df, o, dO;
    sigmoid_and_grad(w[j], i, di);
    sigmoid_and_grad(w[H + j], f, df);
    const float a_g = w[2 * H + j];
    sigmoid_and_grad(w[3 * H + j], o, dO);
    const float c_new = w[4 * H + j];
    const float dct = dc[j] + dh[j] * o * tanh_grad_f32(c_new);  // total dL/dc'
    const float cv = HAS_STATE ? c[j] : 0.0f;
    d0[j] = dct * tanh_f32(a_g) * di;
    d1[j] = dct * cv * df;
    d2[j] = dct * i * tanh_grad_f32(a_g);
    d3[j] = dh[j] * tanh_f32(c_new) * dO;
    if constexpr (HAS_STATE) dc_out[j] = dct * f;
  }
}

template <bool HAS_STATE>
FASTSEQ_ROW void gru_bwd_row(int64_t H, const float* __restrict w, const float* __restrict dh,
                             const float* __restrict h, float* __restrict x0, float* __restrict x1,
                             float* __restrict x2, float* __restrict y0, float* __restrict y1, float* __restrict y2,
                             float* __restrict dz_out) {
  for (int64_t j = 0; j < H; ++j) {
    float r, dr, z, dz;
    sigmoid_and_grad(w[j], r, dr);
    const float a_z = w[H + j];
    sigmoid_and_grad(a_z, z, dz);
    const float a_n = w[2 * H + j];
    const float hn = w[3 * H + j];
    const float n = tanh_f32(a_n);
    const float hv = HAS_STATE ? h[j] : 0.0f;
    const float da_n = dh[j] * sigmoid_f32(-a_z) * tanh_grad_f32(a_n);  // 1 − z = σ(−a_z), no cancellation
    const float da_r = da_n * hn * dr;
    const float da_z = dh[j] * (hv - n) * dz;
    x0[j] = da_r;
    x1[j] = da_z;
    x2[j] = da_n;
    y0[j] = da_r;
    y1[j] = da_z;
    y2[j] = da_n * r;
    if constexpr (HAS_STATE) dz_out[j] = dh[j] * z;  // h' = … + z·h: the direct path
  }
}

template <bool RELU>
FASTSEQ_ROW void rnn_bwd_row(int64_t H, const float* __restrict w, const float* __restrict dh,
                             float* __restrict da) {
  for (int64_t j = 0; j < H; ++j) {
    const float a = w[j];
    // relu: torch's threshold_backward, no gradient at 0 or NaN
    da[j] = RELU ? (a > 0.0f ? dh[j] : 0.0f) : dh[j] * tanh_grad_f32(a);
  }
}

void check_cell_bwd(const Tensor& grad_h, const Tensor& ws, const Tensor& w_ih, const Tensor& w_hh, int64_t gates,
                    int64_t ws_gates) {
  check_dtype(grad_h, "grad_h");
  check_dtype(w_ih, "w_ih");
  check_dtype(w_hh, "w_hh");
  TORCH_CHECK(grad_h.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2, "cell backward: 2-D tensors expected");
  const int64_t B = grad_h.size(0), H = grad_h.size(1);
  TORCH_CHECK(w_hh.size(1) == H && w_hh.size(0) == gates * H && w_ih.size(0) == gates * H,
              "cell backward: weights ", w_ih.sizes(), ", ", w_hh.sizes(), " do not match grad_h ", grad_h.sizes());
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.dim() == 2 && ws.size(0) == B && ws.size(1) == ws_gates * H,
              "cell backward: the workspace must be float32 (", B, ", ", ws_gates * H, "), got ", ws.scalar_type(),
              " ", ws.sizes());
}

// a·w (a: float32 contiguous (B, G); w: (G, K) weights, row-major, the GEMM's B operand as is) into a new float32
// tensor, or added into `acc`.
Tensor mm_rows(const Tensor& a, const Tensor& w, Tensor acc = Tensor()) {
  const Tensor w32 = f32_contiguous(w);
  const int64_t M = a.size(0), K = a.size(1), N = w32.size(1);
  Tensor out = acc.defined() ? acc : at::empty({M, N}, a.options());
  step_gemm(M, N, K, a.data_ptr<float>(), K, w32.data_ptr<float>(), N, out.data_ptr<float>(), N, acc.defined());
  return out;
}

// dx = dA·W_ih (float32 product), in the weights' dtype; an empty tensor when not asked for.
Tensor input_grad(bool need, const Tensor& dA, const Tensor& w_ih, int64_t B) {
  if (!need) return at::empty({0}, w_ih.options());
  return mm_rows(dA, w_ih).to(w_ih.scalar_type());
}

Tensor in_dtype(const Tensor& t32, at::ScalarType dtype) { return t32.to(dtype); }

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_cell_bwd(const Tensor& grad_h, const Tensor& grad_c,
                                                         const Tensor& workspace, const OptTensor& h,
                                                         const OptTensor& c, const Tensor& w_ih, const Tensor& w_hh,
                                                         bool need_input_grad) {
  check_cell_bwd(grad_h, workspace, w_ih, w_hh, 4, 5);
  TORCH_CHECK(given(h) == given(c), "lstm_cell_bwd: h and c must both be given or both be None");
  check_state(grad_c, grad_h.size(0), grad_h.size(1), "grad_c");
  if (given(c)) check_state(*c, grad_h.size(0), grad_h.size(1), "c");
  const auto dtype = w_ih.scalar_type();
  const int64_t B = grad_h.size(0), H = grad_h.size(1), I = w_ih.size(1);
  const bool has_state = given(h);
  if (B == 0 || H == 0) {
    return {at::empty({B, 4 * H}, w_ih.options()),
            need_input_grad ? at::zeros({B, I}, w_ih.options()) : at::empty({0}, w_ih.options()),
            at::empty(shape_if(has_state, {B, H}), w_ih.options()),
            at::empty(shape_if(has_state, {B, H}), w_ih.options())};
  }
  const Tensor ws = workspace.contiguous();
  const Tensor gh = f32_contiguous(grad_h), gc = f32_contiguous(grad_c);
  Tensor c32 = has_state ? f32_contiguous(*c) : Tensor();
  Tensor dA = at::empty({B, 4 * H}, grad_h.options().dtype(at::kFloat));
  Tensor dc32 = has_state ? at::empty({B, H}, dA.options()) : Tensor();
  const float *w_p = ws.data_ptr<float>(), *dh_p = gh.data_ptr<float>(), *dc_p = gc.data_ptr<float>();
  const float* c_p = has_state ? c32.data_ptr<float>() : nullptr;
  float *da_p = dA.data_ptr<float>(), *dco_p = has_state ? dc32.data_ptr<float>() : nullptr;
  with_flags(has_state, false, [&](auto hs, auto) {
    constexpr bool HS = decltype(hs)::value;
    for_rows(B, 9 * H, [&](int64_t b) {
      const Cols d(da_p + b * 4 * H, H, 4);
      lstm_bwd_row<HS>(H, w_p + b * 5 * H, dh_p + b * H, dc_p + b * H, HS ? c_p + b * H : nullptr, d.c[0], d.c[1],
                       d.c[2], d.c[3], HS ? dco_p + b * H : nullptr);
    });
  });
  Tensor dx = input_grad(need_input_grad, dA, w_ih, B);
  Tensor dh = has_state ? mm_rows(dA, w_hh).to(dtype) : at::empty({0}, w_ih.options());
  Tensor dc = has_state ? in_dtype(dc32, dtype) : at::empty({0}, w_ih.options());
  Tensor dgates = dtype == at::kFloat ? dA : in_dtype(dA, dtype);
  return {dgates, dx, dh, dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_cell_bwd(const Tensor& grad_h, const Tensor& workspace,
                                                        const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                                        bool need_input_grad) {
  check_cell_bwd(grad_h, workspace, w_ih, w_hh, 3, 4);
  if (given(h)) check_state(*h, grad_h.size(0), grad_h.size(1), "h");
  const auto dtype = w_ih.scalar_type();
  const int64_t B = grad_h.size(0), H = grad_h.size(1), I = w_ih.size(1);
  const bool has_state = given(h);
  if (B == 0 || H == 0) {
    return {at::empty({B, 3 * H}, w_ih.options()), at::empty({B, 3 * H}, w_ih.options()),
            need_input_grad ? at::zeros({B, I}, w_ih.options()) : at::empty({0}, w_ih.options()),
            at::empty(shape_if(has_state, {B, H}), w_ih.options())};
  }
  const Tensor ws = workspace.contiguous();
  const Tensor gh = f32_contiguous(grad_h);
  Tensor h32 = has_state ? f32_contiguous(*h) : Tensor();
  Tensor dgx = at::empty({B, 3 * H}, grad_h.options().dtype(at::kFloat));
  Tensor dgh = at::empty({B, 3 * H}, dgx.options());
  Tensor dh32 = has_state ? at::empty({B, H}, dgx.options()) : Tensor();
  const float *w_p = ws.data_ptr<float>(), *dh_p = gh.data_ptr<float>();
  const float* h_p = has_state ? h32.data_ptr<float>() : nullptr;
  float *dx_p = dgx.data_ptr<float>(), *dy_p = dgh.data_ptr<float>();
  float* dz_p = has_state ? dh32.data_ptr<float>() : nullptr;
  with_flags(has_state, false, [&](auto hs, auto) {
    constexpr bool HS = decltype(hs)::value;
    for_rows(B, 10 * H, [&](int64_t b) {
      const Cols x(dx_p + b * 3 * H, H, 3), y(dy_p + b * 3 * H, H, 3);
      gru_bwd_row<HS>(H, w_p + b * 4 * H, dh_p + b * H, HS ? h_p + b * H : nullptr, x.c[0], x.c[1], x.c[2], y.c[0],
                      y.c[1], y.c[2], HS ? dz_p + b * H : nullptr);
    });
  });
  Tensor dx = input_grad(need_input_grad, dgx, w_ih, B);
  Tensor dh = at::empty({0}, w_ih.options());
  if (has_state) {
    mm_rows(dgh, w_hh, dh32);  // dh·z + dA_h·W_hh
    dh = in_dtype(dh32, dtype);
  }
  if (dtype != at::kFloat) {
    dgx = in_dtype(dgx, dtype);
    dgh = in_dtype(dgh, dtype);
  }
  return {dgx, dgh, dx, dh};
}

std::tuple<Tensor, Tensor, Tensor> rnn_cell_bwd(const Tensor& grad_h, const Tensor& workspace, bool has_state,
                                                const Tensor& w_ih, const Tensor& w_hh, bool need_input_grad,
                                                std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  check_cell_bwd(grad_h, workspace, w_ih, w_hh, 1, 1);
  const auto dtype = w_ih.scalar_type();
  const int64_t B = grad_h.size(0), H = grad_h.size(1), I = w_ih.size(1);
  if (B == 0 || H == 0) {
    return {at::empty({B, H}, w_ih.options()),
            need_input_grad ? at::zeros({B, I}, w_ih.options()) : at::empty({0}, w_ih.options()),
            at::empty(shape_if(has_state, {B, H}), w_ih.options())};
  }
  const Tensor ws = workspace.contiguous();
  const Tensor gh = f32_contiguous(grad_h);
  Tensor dA = at::empty({B, H}, grad_h.options().dtype(at::kFloat));
  const float *w_p = ws.data_ptr<float>(), *dh_p = gh.data_ptr<float>();
  float* da_p = dA.data_ptr<float>();
  with_flags(relu, false, [&](auto r, auto) {
    constexpr bool RL = decltype(r)::value;
    for_rows(B, 3 * H, [&](int64_t b) { rnn_bwd_row<RL>(H, w_p + b * H, dh_p + b * H, da_p + b * H); });
  });
  Tensor dx = input_grad(need_input_grad, dA, w_ih, B);
  Tensor dh = has_state ? mm_rows(dA, w_hh).to(dtype) : at::empty({0}, w_ih.options());
  Tensor dgates = dtype == at::kFloat ? dA : in_dtype(dA, dtype);
  return {dgates, dx, dh};
}

}  // namespace
}  // namespace cpu
}  // namespace fastseq

TORCH_LIBRARY_IMPL(fastseq_cpp, CPU, m) {
  m.impl("lstm_cell_fwd", &fastseq::cpu::lstm_cell_fwd);
  m.impl("gru_cell_fwd", &fastseq::cpu::gru_cell_fwd);
  m.impl("rnn_cell_fwd", &fastseq::cpu::rnn_cell_fwd);
  m.impl("lstm_cell_bwd", &fastseq::cpu::lstm_cell_bwd);
  m.impl("gru_cell_bwd", &fastseq::cpu::gru_cell_bwd);
  m.impl("rnn_cell_bwd", &fastseq::cpu::rnn_cell_bwd);
}
