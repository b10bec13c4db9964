// Host side of the CUDA attention operators (attention_fwd.cu, attention_bwd.cu): argument checks with
// messages that name the argument, what was expected and what was given; the Operand view of a tensor;
// dispatch over element type and head class; launches (or, under FASTSEQ_CUDA_EMULATION, runs on the CPU
// emulator of tests/cuda_emulation).

#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "attention_common.cuh"

#ifndef FASTSEQ_CUDA_EMULATION
// (not ATen/cuda/CUDAContext.h: it pulls in cuBLAS/cuSPARSE headers a bare toolkit may lack)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// Where the implementations are registered: torch.ops.fastseq_cpp for CUDA tensors; the emulation build
// registers them for CPU tensors in a namespace of its own.
#ifndef FASTSEQ_ATTN_NAMESPACE
#define FASTSEQ_ATTN_NAMESPACE fastseq_cpp
#define FASTSEQ_ATTN_DISPATCH_KEY CUDA
#endif
#define FASTSEQ_ATTN_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

// Kernels launch on the device of `t` (and its current stream).
#ifdef FASTSEQ_CUDA_EMULATION
#define FASTSEQ_DEVICE_GUARD(t) (void)(t)
#else
#define FASTSEQ_DEVICE_GUARD(t) const c10::cuda::OptionalCUDAGuard fastseq_device_guard((t).device())
#endif

namespace fastseq {
namespace attn {

#ifdef FASTSEQ_CUDA_EMULATION
using emu::dim3;
// A kernel pointer (no template commas inside the macro), its grid, threads, dynamic shared bytes, arguments.
#define FASTSEQ_LAUNCH(kernel, grid, threads, smem, ...) \
  ::emu::launch((grid), (threads), (smem), [&] { kernel(__VA_ARGS__); })
#else
#define FASTSEQ_LAUNCH(kernel, grid, threads, smem, ...)                                          \
  do {                                                                                            \
    kernel<<<(grid), (threads), (smem), c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__);        \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                               \
  } while (0)
#endif

// Head sizes (E and Ev) the kernels take: a tile row spans the whole head, padded to 64, 128 or 256.
constexpr int kMaxHeadSize = 256;

inline std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

inline int head_class(int64_t E, int64_t Ev) {
  const int64_t d = std::max(E, Ev);
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

inline void check_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
#ifdef FASTSEQ_CUDA_EMULATION
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor in the emulation build, got ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
#endif
  TORCH_CHECK(t.device() == like.device(), name, " must be on the device of query (", like.device(), "), got ",
              t.device());
}

// q (B, H, L, E), k (B, Hk, S, E), v (B, Hv, S, Ev): the shapes, dtypes and devices the kernels take.
inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4, "query must be 4-D (B, H, L, E), got shape ", shape_of(q));
  TORCH_CHECK(k.dim() == 4, "key must be 4-D (B, Hk, S, E), got shape ", shape_of(k));
  TORCH_CHECK(v.dim() == 4, "value must be 4-D (B, Hv, S, Ev), got shape ", shape_of(v));
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "query must be float32, float16 or bfloat16 for the CUDA attention kernels, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, "key and value must have query's dtype (", dt,
              "), got ", k.scalar_type(), " and ", v.scalar_type());
  check_device(q, "query", q);
  check_device(k, "key", q);
  check_device(v, "value", q);
  const int64_t B = q.size(0), H = q.size(1), E = q.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B, "key.size(0) and value.size(0) must be the batch size. Expected ",
              B, ", got ", k.size(0), " and ", v.size(0));
  TORCH_CHECK(k.size(3) == E, "key.size(3) must be equal to query.size(3) (E). Expected ", E, ", got ", k.size(3));
  TORCH_CHECK(v.size(2) == k.size(2), "value.size(2) must be equal to key.size(2) (S). Expected ", k.size(2),
              ", got ", v.size(2));
  const int64_t Hk = k.size(1), Hv = v.size(1);
  TORCH_CHECK(H == 0 || (Hk > 0 && Hv > 0 && H % Hk == 0 && H % Hv == 0),
              "key and value heads must divide the query heads. Expected divisors of ", H, ", got ", Hk, " and ",
              Hv);
  TORCH_CHECK(E <= kMaxHeadSize && v.size(3) <= kMaxHeadSize, "the CUDA attention kernels take head sizes up to ",
              kMaxHeadSize, ", got E=", E, " and Ev=", v.size(3));
  TORCH_CHECK(q.size(2) < (int64_t(1) << 31) && k.size(2) < (int64_t(1) << 31) && B * H < (int64_t(1) << 31),
              "sequence lengths and B·H must be below 2^31, got L=", q.size(2), ", S=", k.size(2), ", B·H=", B * H);
}

inline void check_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& q, int64_t S) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.dim() == 4, "mask must be 4-D (1 or B, 1 or H, 1 or L, 1 or S), got shape ", shape_of(m));
  const int64_t full[4] = {q.size(0), q.size(1), q.size(2), S};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(m.size(i) == 1 || m.size(i) == full[i], "mask.size(", i, ") must be 1 or ", full[i], ", got ",
                m.size(i), " (mask shape ", shape_of(m), ")");
  const auto dt = m.scalar_type();
  TORCH_CHECK(dt == at::kBool || dt == at::kFloat || dt == q.scalar_type(),
              "mask must be bool, float32 or query's dtype (", q.scalar_type(), "), got ", dt);
  check_device(m, "mask", q);
}

inline void check_seed(const c10::optional<at::Tensor>& seed, const at::Tensor& q) {
  if (!seed.has_value()) return;
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2 && seed->is_contiguous(),
              "seed must be a contiguous int64 tensor of 2 elements (seed, stream), got ", seed->scalar_type(),
              " of shape ", shape_of(*seed));
  check_device(*seed, "seed", q);
}

inline void check_probability(double p_drop) {
  TORCH_CHECK(p_drop >= 0.0 && p_drop <= 1.0, "p_drop must be in [0, 1], got ", p_drop);
}

// The strides as the kernels read them: a size-1 dimension as stride 0.
inline Operand operand(const at::Tensor& t) {
  Operand op;
  op.ptr = t.data_ptr();
  for (int i = 0; i < 4; ++i) op.stride[i] = t.size(i) == 1 ? 0 : t.stride(i);
  const int64_t vec = 16 / int64_t(t.element_size());
  op.vec = t.size(3) % vec == 0 && op.stride[3] == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
           op.stride[0] % vec == 0 && op.stride[1] % vec == 0 && op.stride[2] % vec == 0;
  return op;
}

inline int mask_kind(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return kMaskNone;
  if (mask->scalar_type() == at::kBool) return kMaskBool;
  return mask->scalar_type() == at::kFloat ? kMaskFloat32 : kMaskInputDtype;
}

// The arguments every kernel shares: sizes, heads, strides of q, k, v and the mask, scalars of the call.
inline AttnArgs common_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& seed,
                            double p_drop, bool is_causal, int64_t diag, double scale) {
  AttnArgs a;
  a.q = operand(q);
  a.k = operand(k);
  a.v = operand(v);
  a.B = int(q.size(0));
  a.H = int(q.size(1));
  a.L = int(q.size(2));
  a.S = int(k.size(2));
  a.E = int(q.size(3));
  a.Ev = int(v.size(3));
  a.group_k = a.H > 0 ? a.H / int(k.size(1)) : 1;
  a.group_v = a.H > 0 ? a.H / int(v.size(1)) : 1;
  a.mask_kind = mask_kind(mask);
  if (mask.has_value()) {
    const at::Tensor m = mask->scalar_type() == at::kBool ? mask->view(at::kByte) : *mask;
    a.mask.ptr = m.data_ptr();
    for (int i = 0; i < 4; ++i) a.mask.stride[i] = m.size(i) == 1 ? 0 : m.stride(i);
  }
  a.causal = is_causal;
  a.diag = diag;
  a.dropout = seed.has_value() && p_drop > 0.0;
  a.seed = a.dropout ? seed->data_ptr<int64_t>() : nullptr;
  // torch: 1/√0 times an empty product is 0, not NaN
  const double s = a.E == 0 ? 0.0 : scale;
  a.scale = float(s);
  a.scale_log2 = float(s * 1.4426950408889634);
  a.p_drop = float(p_drop);
  a.drop_scale = p_drop >= 1.0 ? 0.f : float(1.0 / (1.0 - p_drop));
  return a;
}

// Calls f(T{}, std::integral_constant<int, D>{}) for the element type of `dtype` and the head class D.
template <typename F>
void dispatch(at::ScalarType dtype, int head, F&& f) {
  auto by_head = [&](auto zero) {
    if (head == 64) return f(zero, std::integral_constant<int, 64>{});
    if (head == 128) return f(zero, std::integral_constant<int, 128>{});
    return f(zero, std::integral_constant<int, 256>{});
  };
  if (dtype == at::kHalf) return by_head(c10::Half(0.f));
  if (dtype == at::kBFloat16) return by_head(c10::BFloat16(0.f));
  return by_head(0.f);
}

#ifndef FASTSEQ_CUDA_EMULATION
inline int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}
#endif

// The device's multiprocessors (the decode path sizes its key splits by them); 4 on the emulator, as the
// Triton launcher assumes for its interpreter, so modest test shapes take the decode path.
inline int num_sms(const at::Tensor& like) {
#ifdef FASTSEQ_CUDA_EMULATION
  (void)like;
  return 4;
#else
  return device_attribute(cudaDevAttrMultiProcessorCount, like.device().index());
#endif
}

// Before a launch: the device is sm_80 or newer, and the kernel may take `bytes` of dynamic shared memory.
template <typename Kernel>
void prepare_launch(Kernel kernel, size_t bytes, const char* name) {
#ifdef FASTSEQ_CUDA_EMULATION
  (void)kernel;
  (void)bytes;
  (void)name;
#else
  const int device = c10::cuda::current_device();
  const int major = device_attribute(cudaDevAttrComputeCapabilityMajor, device);
  TORCH_CHECK(major >= 8, "the CUDA attention kernels need a GPU of compute capability 8.0 or newer (mma.sync "
              "m16n8k16, ldmatrix), got ", major, ".", device_attribute(cudaDevAttrComputeCapabilityMinor, device));
  const size_t limit = size_t(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= limit, name, " needs ", bytes, " bytes of shared memory per block; this device allows ",
              limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
#endif
}

}  // namespace attn
}  // namespace fastseq
