// Direct Python entry points to the cells' forward kernels, fastseq._C.{lstm,gru,rnn}_cell_fwd, for the "cpp"
// launchers (fastseq/cpp_kernels.py). They are the operators torch.ops.fastseq_cpp.{lstm,gru,rnn}_cell_fwd, called
// through the dispatcher from C++ with their typed signatures: the same kernels on the same arguments. Calling them
// from Python through torch.ops costs several µs of argument parsing and boxing per call (measured: ~93% of a
// 1 × 1 LSTM cell's call), which at decode sizes (B = 1, H = 128) is as much as the kernel itself.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>
#include <tuple>

namespace fastseq {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Pair = std::tuple<Tensor, Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

Triple lstm_cell_fwd(const Tensor& x, const OptTensor& h, const OptTensor& c, const Tensor& w_ih, const Tensor& w_hh,
                     const OptTensor& b_ih, const OptTensor& b_hh, bool save) {
  static const auto op = typed_op<Triple(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                         const Tensor&, const OptTensor&, const OptTensor&, bool)>(
      "fastseq_cpp::lstm_cell_fwd");
  return op.call(x, h, c, w_ih, w_hh, b_ih, b_hh, save);
}

Pair gru_cell_fwd(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                  const OptTensor& b_hh, bool save) {
  static const auto op = typed_op<Pair(const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                                       const OptTensor&, const OptTensor&, bool)>("fastseq_cpp::gru_cell_fwd");
  return op.call(x, h, w_ih, w_hh, b_ih, b_hh, save);
}

Pair rnn_cell_fwd(const Tensor& x, const OptTensor& h, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                  const OptTensor& b_hh, bool save, std::string nonlinearity) {
  static const auto op = typed_op<Pair(const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                                       const OptTensor&, const OptTensor&, bool, std::string)>(
      "fastseq_cpp::rnn_cell_fwd");
  return op.call(x, h, w_ih, w_hh, b_ih, b_hh, save, std::move(nonlinearity));
}

}  // namespace

void bind_direct_calls(pybind11::module_& m) {
  // The GIL is released while a kernel runs (as torch.ops calls do).
  const auto release = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("lstm_cell_fwd", &lstm_cell_fwd, release, "torch.ops.fastseq_cpp.lstm_cell_fwd, called directly");
  m.def("gru_cell_fwd", &gru_cell_fwd, release, "torch.ops.fastseq_cpp.gru_cell_fwd, called directly");
  m.def("rnn_cell_fwd", &rnn_cell_fwd, release, "torch.ops.fastseq_cpp.rnn_cell_fwd, called directly");
}

}  // namespace fastseq
