// Host helpers of the CUDA operators (rnn_cells_ops.cpp, rnn_layers_ops.cpp): tensors to kernel pointers, dtype
// dispatch, and argument checks whose messages name the argument, what was expected and what was given.

#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>
#include <type_traits>

#include "rnn_kernels.h"

namespace fastseq {
namespace cuda {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

inline bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// torch's at::Half / at::BFloat16 are bit-compatible with CUDA's __half / __nv_bfloat16.
template <typename T>
T* ptr(const Tensor& t) {
  using Torch = std::conditional_t<std::is_same_v<T, __half>, at::Half,
                                   std::conditional_t<std::is_same_v<T, __nv_bfloat16>, at::BFloat16, T>>;
  return reinterpret_cast<T*>(t.data_ptr<Torch>());
}

template <typename T>
T* ptr_or_null(const OptTensor& t) {
  return given(t) ? ptr<T>(*t) : nullptr;
}

// Calls f(T{}) with T the CUDA type of `dtype` (float, __half, __nv_bfloat16).
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* what, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, what, ": the CUDA kernels take float32, float16 or bfloat16, got ", dtype);
  }
}

// `t` is a CUDA tensor on the device of `like`.
inline void check_cuda_tensor(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.device().is_cuda(), name, ": the CUDA kernels take CUDA tensors, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, ": expected a tensor on ", like.device(), ", got one on ",
              t.device());
}

inline void check_same_dtype(const Tensor& t, const char* name, const Tensor& like, const char* like_name) {
  check_cuda_tensor(t, name, like);
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name, ": expected ",
              like.scalar_type(), ", got ", t.scalar_type());
}

inline bool is_relu(const std::string& nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", "Unknown nonlinearity: ", nonlinearity,
              ". Expected 'tanh' or 'relu'");
  return nonlinearity == "relu";
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

}  // namespace cuda
}  // namespace fastseq
