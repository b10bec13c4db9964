// fastseq._C: the compiled extension, and the Python module that tells fastseq.dispatch which kernels were
// compiled in. The kernels are torch operators: the C++ CPU kernels are torch.ops.fastseq_cpp.* (schemas in
// csrc/cpu/library.cpp, CPU implementations beside them in csrc/cpu/, registered when this library loads),
// which fastseq/cpp_kernels.py wraps as the "cpp" backend's launchers. CUDA kernels (csrc/cuda/) are to come:
// `kernels("cuda")` is empty, so the "cuda" backend reports itself unavailable with that reason.
//
// `kernels(device)` is read from the dispatcher, not written by hand: an operator family ("lstm_cell", …) is
// listed for "cpu" only when both its forward and backward operators have a CPU kernel registered.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

namespace fastseq {

namespace {

bool has_cpu_kernel(const std::string& name) {
  const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
  return op.has_value() && op->hasKernelForDispatchKey(c10::DispatchKey::CPU);
}

}  // namespace

std::vector<std::string> kernels(const std::string& device_type) {
  TORCH_CHECK(device_type == "cpu" || device_type == "cuda",
              "kernels(device_type): device_type must be 'cpu' or 'cuda', got '", device_type, "'");
  std::vector<std::string> names;
  if (device_type == "cpu") {
    for (const char* family : {"lstm_cell", "gru_cell", "rnn_cell", "lstm_layer", "gru_layer", "rnn_layer"}) {
      const std::string op = std::string("fastseq_cpp::") + family;
      if (has_cpu_kernel(op + "_fwd") && has_cpu_kernel(op + "_bwd")) names.emplace_back(family);
    }
  }
  return names;
}

bool built_with_cuda() {
#ifdef FASTSEQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void bind_direct_calls(pybind11::module_& m);  // csrc/cpu/direct_calls.cpp

}  // namespace fastseq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastseq's compiled kernels (C++ for CPU tensors, CUDA for GPU tensors)";
  m.def("kernels", &fastseq::kernels, "operator names with a compiled kernel for a device type");
  m.def("built_with_cuda", &fastseq::built_with_cuda, "whether the CUDA sources were compiled in");
  m.attr("torch_version") = TORCH_VERSION;
  fastseq::bind_direct_calls(m);
}
