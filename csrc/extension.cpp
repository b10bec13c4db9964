// fastseq._C: the compiled extension, and the Python module that tells fastseq.dispatch which kernels were
// compiled in. The kernels are torch operators: the C++ CPU kernels are torch.ops.fastseq_cpp.* (schemas in
// csrc/cpu/library.cpp, CPU implementations beside them in csrc/cpu/, registered when this library loads),
// which fastseq/cpp_kernels.py wraps as the "cpp" backend's launchers. The CUDA kernels (csrc/cuda/, compiled where
// a CUDA toolkit is found) register CUDA implementations of the same operators, so the "cuda" backend runs through
// the same launchers.
//
// `kernels(device)` is read from the dispatcher, not written by hand: an operator family ("lstm_cell", …) is
// listed for a device type only when both its forward and backward operators have a kernel registered for it
// ("sdpa": fastseq_cpp::sdpa_fwd and fastseq_cpp::sdpa_bwd, where the attention kernels register them).
//
// With CUDA, the module also says which path a CUDA layer call takes (the persistent cooperative kernel or per-step
// products) and why: cuda_layer_plan, cuda_layer_plan_model (a described device, for tests without a GPU),
// set_cuda_layer_path / cuda_layer_path (force a path, for tests and benchmarks; also FASTSEQ_CUDA_LAYER_PATH at
// import), cuda_last_layer_path.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <string>
#include <vector>

#ifdef FASTSEQ_WITH_CUDA
#include "cuda/layer_path.h"
#endif

namespace fastseq {

namespace {

bool has_kernel(const std::string& name, c10::DispatchKey key) {
  const auto op = c10::Dispatcher::singleton().findOp(c10::OperatorName(name, ""));
  return op.has_value() && op->hasKernelForDispatchKey(key);
}

}  // namespace

std::vector<std::string> kernels(const std::string& device_type) {
  TORCH_CHECK(device_type == "cpu" || device_type == "cuda",
              "kernels(device_type): device_type must be 'cpu' or 'cuda', got '", device_type, "'");
  const auto key = device_type == "cpu" ? c10::DispatchKey::CPU : c10::DispatchKey::CUDA;
  std::vector<std::string> names;
  for (const char* family : {"lstm_cell", "gru_cell", "rnn_cell", "lstm_layer", "gru_layer", "rnn_layer", "sdpa"}) {
    const std::string op = std::string("fastseq_cpp::") + family;
    if (has_kernel(op + "_fwd", key) && has_kernel(op + "_bwd", key)) names.emplace_back(family);
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

#ifdef FASTSEQ_WITH_CUDA
namespace {

pybind11::dict plan_dict(const cuda::PlanInfo& p) {
  pybind11::dict d;
  d["path"] = p.persistent ? "persistent" : "fallback";
  d["reason"] = p.reason;
  d["units_per_block"] = p.units;
  d["proj_cols_per_block"] = p.pu;
  d["blocks_per_direction"] = p.nb;
  d["blocks"] = p.blocks;
  d["co_resident_capacity"] = p.capacity;
  d["shared_memory_bytes"] = p.smem;
  return d;
}

}  // namespace

void bind_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "cuda_layer_plan",
      [](const std::string& kind, const std::string& dtype, bool backward, int D, int B, int H, int P, int device) {
        return plan_dict(cuda::layer_plan_info(kind, dtype, backward, D, B, H, P, device));
      },
      "which path a CUDA layer call of these sizes takes (persistent or fallback) and why", py::arg("kind"),
      py::arg("dtype"), py::arg("backward"), py::arg("D"), py::arg("B"), py::arg("H"), py::arg("P") = 0,
      py::arg("device") = 0);
  m.def(
      "cuda_layer_plan_model",
      [](const std::string& kind, const std::string& dtype, bool backward, int D, int B, int H, int P, int sms,
         int64_t smem_optin, int64_t smem_per_sm, bool cooperative) {
        return plan_dict(
            cuda::layer_plan_model(kind, dtype, backward, D, B, H, P, sms, smem_optin, smem_per_sm, cooperative));
      },
      "the same choice on a described device (occupancy modelled from shared memory and threads)", py::arg("kind"),
      py::arg("dtype"), py::arg("backward"), py::arg("D"), py::arg("B"), py::arg("H"), py::arg("P"), py::arg("sms"),
      py::arg("smem_optin"), py::arg("smem_per_sm"), py::arg("cooperative") = true);
  m.def("set_cuda_layer_path", &cuda::set_layer_path,
        "force the CUDA layers' path: 'auto', 'persistent' (raise where it cannot run) or 'fallback'");
  m.def("cuda_layer_path", &cuda::layer_path, "the forced CUDA layer path ('auto' unless set)");
  m.def("cuda_last_layer_path", &cuda::last_layer_path, "the path the last CUDA layer call took, and why");
  // FASTSEQ_CUDA_LAYER_PATH=persistent|fallback forces a path from the start (benchmarks of either path); a bad value
  // warns and leaves "auto" rather than making the extension fail to import.
  if (const char* path = std::getenv("FASTSEQ_CUDA_LAYER_PATH")) {
    try {
      cuda::set_layer_path(path);
    } catch (const c10::Error& e) {
      TORCH_WARN("FASTSEQ_CUDA_LAYER_PATH ignored: ", e.msg());
    }
  }
}
#endif

}  // namespace fastseq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastseq's compiled kernels (C++ for CPU tensors, CUDA for GPU tensors)";
  m.def("kernels", &fastseq::kernels, "operator names with a compiled kernel for a device type");
  m.def("built_with_cuda", &fastseq::built_with_cuda, "whether the CUDA sources were compiled in");
  m.attr("torch_version") = TORCH_VERSION;
  fastseq::bind_direct_calls(m);
#ifdef FASTSEQ_WITH_CUDA
  fastseq::bind_cuda(m);
#endif
}
