// The torch operators of the CUDA cells: torch.ops.fastseq_cpp.{lstm,gru,rnn}_cell_{fwd,bwd} for CUDA tensors
// (schemas in csrc/cpu/library.cpp; the kernels and their math in rnn_cells.cu). Validation with messages that name
// the argument, allocation of the outputs (the float32 workspace of the CPU and Triton kernels: LSTM (a_i, a_f, a_g,
// a_o, c'), GRU (a_r, a_z, a_n, W_hn·h + b_hn), RNN (a)), and the launch. Host code only, compiled once by the host
// compiler (rnn_kernels.h says why the kernels live apart).

#include "rnn_ops.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fastseq {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------------------

// `shape` when `cond`, else (0,): the shape of an optional result (absent ones travel as empty tensors).
std::vector<int64_t> shape_if(bool cond, std::vector<int64_t> shape) {
  return cond ? shape : std::vector<int64_t>{0};
}

void check_state(const Tensor& t, int64_t B, int64_t H, const char* name, const Tensor& like) {
  check_same_dtype(t, name, like, "input");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == H, "cell: ", name, " must be (", B, ", ", H, "), got ",
              t.sizes());
}

void check_cell(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                const OptTensor& b_hh, int64_t gates) {
  check_cuda_tensor(x, "input", x);
  dispatch_dtype(x.scalar_type(), "input", [](auto) {});
  check_same_dtype(w_ih, "w_ih", x, "input");
  check_same_dtype(w_hh, "w_hh", x, "input");
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2, "cell: input and weights must be 2-D");
  const int64_t H = w_hh.size(1);
  TORCH_CHECK(w_ih.size(0) == gates * H && w_hh.size(0) == gates * H && w_ih.size(1) == x.size(1),
              "cell: weight shapes ", w_ih.sizes(), " and ", w_hh.sizes(), " do not match input ", x.sizes(),
              " and ", gates, " gates");
  for (const auto& [b, name] : {std::make_pair(&b_ih, "b_ih"), std::make_pair(&b_hh, "b_hh")}) {
    if (!given(*b)) continue;
    check_same_dtype(**b, name, x, "input");
    TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == gates * H, "cell: ", name, " must be (", gates * H, "), got ",
                (*b)->sizes());
  }
  if (given(h)) check_state(*h, x.size(0), H, "h", x);
  TORCH_CHECK(ceil_div(x.size(0), kRows) <= 65535, "cell: batch ", x.size(0), " is over the CUDA kernels' limit of ",
              65535 * kRows, " rows");
}

int64_t stride_or_0(const OptTensor& t, int dim) { return given(t) ? t->stride(dim) : 0; }

// Shared by the three forward operators: outputs allocated, arguments packed, kernel launched.
std::tuple<Tensor, Tensor, Tensor> cell_fwd(Kind kind, const Tensor& x, const OptTensor& h, const OptTensor& c,
                                            const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                            const OptTensor& b_hh, bool save, bool relu) {
  const int64_t G = num_gates(kind);
  check_cell(x, h, w_ih, w_hh, b_ih, b_hh, G);
  const int64_t B = x.size(0), H = w_hh.size(1);
  const int64_t ws_gates = kind == Kind::lstm ? 5 : kind == Kind::gru ? 4 : 1;
  Tensor h_out = at::empty({B, H}, x.options());
  Tensor c_out = kind == Kind::lstm ? at::empty({B, H}, x.options()) : Tensor();
  Tensor ws = at::empty(shape_if(save, {B, ws_gates * H}), x.options().dtype(at::kFloat));
  if (B == 0 || H == 0) return {h_out, c_out, ws};
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_dtype(x.scalar_type(), "input", [&](auto tag) {
    using T = decltype(tag);
    CellFwdArgs<T> a{};
    a.x = ptr<T>(x);
    a.h = ptr_or_null<T>(h);
    a.c = ptr_or_null<T>(c);
    a.w_ih = ptr<T>(w_ih);
    a.w_hh = ptr<T>(w_hh);
    a.b_ih = ptr_or_null<T>(b_ih);
    a.b_hh = ptr_or_null<T>(b_hh);
    a.h_out = ptr<T>(h_out);
    a.c_out = c_out.defined() ? ptr<T>(c_out) : nullptr;
    a.ws = save ? ws.data_ptr<float>() : nullptr;
    a.B = static_cast<int>(B);
    a.I = static_cast<int>(x.size(1));
    a.H = static_cast<int>(H);
    a.s_xb = x.stride(0), a.s_xk = x.stride(1);
    a.s_hb = stride_or_0(h, 0), a.s_hk = stride_or_0(h, 1);
    a.s_cb = stride_or_0(c, 0), a.s_ck = stride_or_0(c, 1);
    a.s_wir = w_ih.stride(0), a.s_wic = w_ih.stride(1), a.s_whr = w_hh.stride(0), a.s_whc = w_hh.stride(1);
    a.s_bi = stride_or_0(b_ih, 0), a.s_bh = stride_or_0(b_hh, 0);
    a.has_state = given(h);
    a.save = save;
    a.relu = relu;
    launch_cell_fwd<T>(kind, a, current_stream());
  });
  return {h_out, c_out, ws};
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& x, const OptTensor& h, const OptTensor& c,
                                                 const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                                 const OptTensor& b_hh, bool save) {
  TORCH_CHECK(given(h) == given(c), "lstm_cell_fwd: h and c must both be given or both be None");
  if (given(c)) check_state(*c, x.size(0), w_hh.size(1), "c", x);
  return cell_fwd(Kind::lstm, x, h, c, w_ih, w_hh, b_ih, b_hh, save, false);
}

std::tuple<Tensor, Tensor> gru_cell_fwd(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                        const OptTensor& b_ih, const OptTensor& b_hh, bool save) {
  auto [h_out, c_out, ws] = cell_fwd(Kind::gru, x, h, std::nullopt, w_ih, w_hh, b_ih, b_hh, save, false);
  return {h_out, ws};
}

std::tuple<Tensor, Tensor> rnn_cell_fwd(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                        const OptTensor& b_ih, const OptTensor& b_hh, bool save,
                                        std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  auto [h_out, c_out, ws] = cell_fwd(Kind::rnn, x, h, std::nullopt, w_ih, w_hh, b_ih, b_hh, save, relu);
  return {h_out, ws};
}

void check_cell_bwd(const Tensor& grad_h, const Tensor& ws, const Tensor& w_ih, const Tensor& w_hh, int64_t gates,
                    int64_t ws_gates) {
  check_cuda_tensor(w_ih, "w_ih", w_ih);
  dispatch_dtype(w_ih.scalar_type(), "w_ih", [](auto) {});
  check_same_dtype(grad_h, "grad_h", w_ih, "w_ih");
  check_same_dtype(w_hh, "w_hh", w_ih, "w_ih");
  TORCH_CHECK(grad_h.dim() == 2 && w_ih.dim() == 2 && w_hh.dim() == 2, "cell backward: 2-D tensors expected");
  const int64_t B = grad_h.size(0), H = grad_h.size(1);
  TORCH_CHECK(w_hh.size(1) == H && w_hh.size(0) == gates * H && w_ih.size(0) == gates * H,
              "cell backward: weights ", w_ih.sizes(), ", ", w_hh.sizes(), " do not match grad_h ", grad_h.sizes());
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.dim() == 2 && ws.size(0) == B && ws.size(1) == ws_gates * H,
              "cell backward: the workspace must be float32 (", B, ", ", ws_gates * H, "), got ", ws.scalar_type(),
              " ", ws.sizes());
  TORCH_CHECK(ws.device() == w_ih.device(), "cell backward: the workspace must be on ", w_ih.device(), ", got ",
              ws.device());
  TORCH_CHECK(ceil_div(B, kRows) <= 65535, "cell backward: batch ", B, " is over the CUDA kernels' limit of ",
              65535 * kRows, " rows");
}

// Shared by the three backward operators. Returns (dgates_x, dgates_h, dx, dh, dc), absent ones empty.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cell_bwd(Kind kind, const Tensor& grad_h, const OptTensor& grad_c,
                                                            const Tensor& workspace, bool has_state,
                                                            const OptTensor& h, const OptTensor& c,
                                                            const Tensor& w_ih, const Tensor& w_hh,
                                                            bool need_input_grad, bool relu) {
  const int64_t G = num_gates(kind);
  check_cell_bwd(grad_h, workspace, w_ih, w_hh, G, kind == Kind::lstm ? 5 : kind == Kind::gru ? 4 : 1);
  const int64_t B = grad_h.size(0), H = grad_h.size(1), I = w_ih.size(1);
  const auto opts = w_ih.options();
  Tensor dgx = at::empty({B, G * H}, opts);
  Tensor dgh = kind == Kind::gru ? at::empty({B, G * H}, opts) : dgx;
  Tensor dx = need_input_grad ? at::empty({B, I}, opts) : at::empty({0}, opts);
  Tensor dh = at::empty(shape_if(has_state, {B, H}), opts);
  Tensor dc = at::empty(shape_if(has_state && kind == Kind::lstm, {B, H}), opts);
  if (B == 0 || H == 0) {
    if (need_input_grad) dx.zero_();
    return {dgx, dgh, dx, dh, dc};
  }
  const c10::cuda::CUDAGuard guard(w_ih.device());
  const Tensor ws = workspace.contiguous();
  const int n_x_blocks = need_input_grad ? ceil_div(I, kCellCols) : 0;
  const int n_h_blocks = has_state ? ceil_div(H, kCellCols) : 0;
  dispatch_dtype(w_ih.scalar_type(), "w_ih", [&](auto tag) {
    using T = decltype(tag);
    CellBwdArgs<T> a{};
    a.dh = ptr<T>(grad_h);
    a.dc = grad_c.has_value() ? ptr<T>(*grad_c) : nullptr;
    a.h = ptr_or_null<T>(h);
    a.c = ptr_or_null<T>(c);
    a.w_ih = ptr<T>(w_ih);
    a.w_hh = ptr<T>(w_hh);
    a.ws = ws.data_ptr<float>();
    a.dgx = ptr<T>(dgx);
    a.dgh = ptr<T>(dgh);
    a.dx = need_input_grad ? ptr<T>(dx) : nullptr;
    a.dh_prev = has_state ? ptr<T>(dh) : nullptr;
    a.dc_prev = dc.numel() > 0 ? ptr<T>(dc) : nullptr;
    a.B = static_cast<int>(B);
    a.I = static_cast<int>(I);
    a.H = static_cast<int>(H);
    a.n_x_blocks = n_x_blocks;
    a.n_h_blocks = n_h_blocks;
    a.s_dhb = grad_h.stride(0), a.s_dhk = grad_h.stride(1);
    a.s_dcb = stride_or_0(grad_c, 0), a.s_dck = stride_or_0(grad_c, 1);
    a.s_hb = stride_or_0(h, 0), a.s_hk = stride_or_0(h, 1);
    a.s_cb = stride_or_0(c, 0), a.s_ck = stride_or_0(c, 1);
    a.s_wir = w_ih.stride(0), a.s_wic = w_ih.stride(1), a.s_whr = w_hh.stride(0), a.s_whc = w_hh.stride(1);
    a.has_state = has_state;
    a.relu = relu;
    launch_cell_bwd<T>(kind, a, current_stream());
  });
  return {dgx, dgh, dx, dh, dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_cell_bwd(const Tensor& grad_h, const Tensor& grad_c,
                                                         const Tensor& workspace, const OptTensor& h,
                                                         const OptTensor& c, const Tensor& w_ih, const Tensor& w_hh,
                                                         bool need_input_grad) {
  TORCH_CHECK(given(h) == given(c), "lstm_cell_bwd: h and c must both be given or both be None");
  check_state(grad_c, grad_h.size(0), grad_h.size(1), "grad_c", grad_h);
  if (given(c)) check_state(*c, grad_h.size(0), grad_h.size(1), "c", grad_h);
  if (given(h)) check_state(*h, grad_h.size(0), grad_h.size(1), "h", grad_h);
  auto [dgx, dgh, dx, dh, dc] = cell_bwd(Kind::lstm, grad_h, grad_c, workspace, given(h), h, c, w_ih, w_hh,
                                         need_input_grad, false);
  return {dgx, dx, dh, dc};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gru_cell_bwd(const Tensor& grad_h, const Tensor& workspace,
                                                        const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh,
                                                        bool need_input_grad) {
  if (given(h)) check_state(*h, grad_h.size(0), grad_h.size(1), "h", grad_h);
  auto [dgx, dgh, dx, dh, dc] = cell_bwd(Kind::gru, grad_h, std::nullopt, workspace, given(h), h, std::nullopt,
                                         w_ih, w_hh, need_input_grad, false);
  return {dgx, dgh, dx, dh};
}

std::tuple<Tensor, Tensor, Tensor> rnn_cell_bwd(const Tensor& grad_h, const Tensor& workspace, bool has_state,
                                                const Tensor& w_ih, const Tensor& w_hh, bool need_input_grad,
                                                std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  auto [dgx, dgh, dx, dh, dc] = cell_bwd(Kind::rnn, grad_h, std::nullopt, workspace, has_state, std::nullopt,
                                         std::nullopt, w_ih, w_hh, need_input_grad, relu);
  return {dgx, dx, dh};
}

}  // namespace
}  // namespace cuda
}  // namespace fastseq

TORCH_LIBRARY_IMPL(fastseq_cpp, CUDA, m) {
  m.impl("lstm_cell_fwd", &fastseq::cuda::lstm_cell_fwd);
  m.impl("gru_cell_fwd", &fastseq::cuda::gru_cell_fwd);
  m.impl("rnn_cell_fwd", &fastseq::cuda::rnn_cell_fwd);
  m.impl("lstm_cell_bwd", &fastseq::cuda::lstm_cell_bwd);
  m.impl("gru_cell_bwd", &fastseq::cuda::gru_cell_bwd);
  m.impl("rnn_cell_bwd", &fastseq::cuda::rnn_cell_bwd);
}
