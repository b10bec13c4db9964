// fastseq._C: the compiled extension. Operators register their schemas under TORCH_LIBRARY(fastseq, ...)
// with CPU kernels in csrc/cpu/ and CUDA kernels in csrc/cuda/ (TORCH_LIBRARY_IMPL per device); this file
// is the Python module that tells fastseq.dispatch which kernels were compiled in.
//
// For now the extension carries no kernels: `kernels("cpu")` and `kernels("cuda")` are empty, so the "cpp"
// and "cuda" backends report themselves unavailable with that reason. Each kernel added later appends its
// operator name to the list of its device.

#include <torch/extension.h>

#include <string>
#include <vector>

namespace fastseq {

std::vector<std::string> kernels(const std::string& device_type) {
  TORCH_CHECK(device_type == "cpu" || device_type == "cuda",
              "kernels(device_type): device_type must be 'cpu' or 'cuda', got '", device_type, "'");
  return {};
}

bool built_with_cuda() {
#ifdef FASTSEQ_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace fastseq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastseq's compiled kernels (C++ for CPU tensors, CUDA for GPU tensors)";
  m.def("kernels", &fastseq::kernels, "operator names with a compiled kernel for a device type");
  m.def("built_with_cuda", &fastseq::built_with_cuda, "whether the CUDA sources were compiled in");
  m.attr("torch_version") = TORCH_VERSION;
}
