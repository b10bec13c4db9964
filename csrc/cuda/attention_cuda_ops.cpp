// The CUDA attention operators torch.ops.fastseq_cpp.sdpa_fwd, sdpa_bwd and sdpa_dropout_mask (schemas:
// csrc/attention_schema.h): argument checks with messages that name the argument, what was expected and what was
// given; the Operand view of a tensor; outputs and workspaces; the device guard and the current stream; the
// decode path's choice of key splits; the grid and device checks; dispatch over element type and head class to the
// launch functions of attention_fwd.cu and attention_bwd.cu (attention_kernels.h). Compiled once by the host
// compiler: the .cu files include no ATen header. Under FASTSEQ_CUDA_EMULATION (tests/cuda_emulation) the same
// operators take CPU tensors and the launch functions run on the CPU emulator.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

#include "attention_kernels.h"

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

// Kernels launch on the device of `t` (and its current stream); a launch function's error raises as CUDA errors do.
#ifdef FASTSEQ_CUDA_EMULATION
#define FASTSEQ_DEVICE_GUARD(t) (void)(t)
#define FASTSEQ_CURRENT_STREAM() cudaStream_t(nullptr)
#define FASTSEQ_LAUNCH_CHECK(error) (void)(error)
#else
#define FASTSEQ_DEVICE_GUARD(t) const c10::cuda::OptionalCUDAGuard fastseq_device_guard((t).device())
#define FASTSEQ_CURRENT_STREAM() cudaStream_t(c10::cuda::getCurrentCUDAStream())
#define FASTSEQ_LAUNCH_CHECK(error) C10_CUDA_CHECK(error)
#endif

namespace fastseq {
namespace attn {
namespace {

// Head sizes (E and Ev) the kernels take: a tile row spans the whole head, padded to 64, 128 or 256.
constexpr int kMaxHeadSize = 256;
// Query rows up to which a call with many keys may take the split-key decode path (as the Triton launcher).
constexpr int kDecodeMaxRows = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

int head_class(int64_t E, int64_t Ev) {
  const int64_t d = std::max(E, Ev);
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
#ifdef FASTSEQ_CUDA_EMULATION
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor in the emulation build, got ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
#endif
  TORCH_CHECK(t.device() == like.device(), name, " must be on the device of query (", like.device(), "), got ",
              t.device());
}

// q (B, H, L, E), k (B, Hk, S, E), v (B, Hv, S, Ev): the shapes, dtypes and devices the kernels take.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
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

void check_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& q, int64_t S) {
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

void check_seed(const c10::optional<at::Tensor>& seed, const at::Tensor& q) {
  if (!seed.has_value()) return;
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2 && seed->is_contiguous(),
              "seed must be a contiguous int64 tensor of 2 elements (seed, stream), got ", seed->scalar_type(),
              " of shape ", shape_of(*seed));
  check_device(*seed, "seed", q);
}

void check_probability(double p_drop) {
  TORCH_CHECK(p_drop >= 0.0 && p_drop <= 1.0, "p_drop must be in [0, 1], got ", p_drop);
}

// The strides as the kernels read them: a size-1 dimension as stride 0.
Operand operand(const at::Tensor& t) {
  Operand op;
  op.ptr = t.data_ptr();
  for (int i = 0; i < 4; ++i) op.stride[i] = t.size(i) == 1 ? 0 : t.stride(i);
  const int64_t vec = 16 / int64_t(t.element_size());
  op.vec = t.size(3) % vec == 0 && op.stride[3] == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
           op.stride[0] % vec == 0 && op.stride[1] % vec == 0 && op.stride[2] % vec == 0;
  return op;
}

int mask_kind(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return kMaskNone;
  if (mask->scalar_type() == at::kBool) return kMaskBool;
  return mask->scalar_type() == at::kFloat ? kMaskFloat32 : kMaskInputDtype;
}

// The arguments every kernel shares: sizes, heads, strides of q, k, v and the mask, scalars of the call.
AttnArgs common_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& seed, double p_drop,
                     bool is_causal, int64_t diag, double scale) {
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
int device_attribute(cudaDeviceAttr attribute, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}
#endif

// The device's multiprocessors (the decode path sizes its key splits by them); 4 on the emulator, as the
// Triton launcher assumes for its interpreter, so modest test shapes take the decode path.
int num_sms(const at::Tensor& like) {
#ifdef FASTSEQ_CUDA_EMULATION
  (void)like;
  return 4;
#else
  return device_attribute(cudaDevAttrMultiProcessorCount, like.device().index());
#endif
}

// Before a launch: the device is sm_80 or newer, and allows a block the kernel's `bytes` of dynamic shared memory
// (the launch function opts the kernel in above 48 KiB).
void check_launch(size_t bytes, const char* name) {
#ifdef FASTSEQ_CUDA_EMULATION
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
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// As kernels/attention.py's decode_splits: 1 (the general kernel) unless there are few query rows, at least 4
// key tiles, and fewer (row block, head) blocks than SMs; then enough splits to give every SM about two blocks,
// each at least two tiles.
int64_t decode_splits(int64_t BH, int64_t L, int64_t S, int block_m, int block_n, int sms) {
  if (L > kDecodeMaxRows) return 1;
  const int64_t tiles = ceil_div(S, block_n), blocks = BH * ceil_div(L, block_m);
  if (tiles < 4 || blocks >= sms) return 1;
  const int64_t splits = std::max<int64_t>(1, std::min(ceil_div(2 * sms, blocks), tiles / 2));
  return ceil_div(tiles, ceil_div(tiles, splits));
}

template <typename T, int D>
void forward(AttnArgs a, const at::Tensor& q, int64_t num_splits, at::Tensor& out, at::Tensor& lse) {
  const KernelShape shape = fwd_shape<T, D>();
  const int64_t BH = int64_t(a.B) * a.H, m_blocks = ceil_div(a.L, shape.block_m);
  if (num_splits <= 0) num_splits = decode_splits(BH, a.L, a.S, shape.block_m, shape.block_n, num_sms(q));
  const int64_t tiles = ceil_div(a.S, shape.block_n);
  num_splits = std::max<int64_t>(1, std::min(num_splits, tiles));
  const int64_t per_split = tiles > 0 ? ceil_div(tiles, num_splits) : 0;
  num_splits = tiles > 0 ? ceil_div(tiles, per_split) : 1;
  TORCH_CHECK(BH * m_blocks < (int64_t(1) << 31) && num_splits < 65536, "sdpa_fwd: grid too large (B·H = ", BH,
              ", row blocks ", m_blocks, ", splits ", num_splits, ")");
  a.num_splits = int(num_splits);
  a.tiles_per_split = int(per_split);
  a.o = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  at::Tensor part, part_ml;
  if (num_splits > 1) {
    part = at::empty({BH, num_splits, a.L, a.Ev}, q.options().dtype(at::kFloat));
    part_ml = at::empty({BH, num_splits, 2, a.L}, q.options().dtype(at::kFloat));
    a.part = part.data_ptr<float>();
    a.part_ml = part_ml.data_ptr<float>();
  }
  check_launch(shape.smem_bytes, "sdpa_fwd");
  const cudaError_t error = launch_fwd<T, D>(a, FASTSEQ_CURRENT_STREAM());
  FASTSEQ_LAUNCH_CHECK(error);
}

std::tuple<at::Tensor, at::Tensor> sdpa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& seed, double p_drop, bool is_causal,
                                            int64_t diag, double scale, int64_t num_splits) {
  check_qkv(q, k, v);
  check_mask(mask, q, k.size(2));
  check_seed(seed, q);
  check_probability(p_drop);
  FASTSEQ_DEVICE_GUARD(q);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), Ev = v.size(3);
  at::Tensor out = at::empty({B, H, L, Ev}, q.options());
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  if (B * H * L == 0) return {out, lse};
  const AttnArgs a = common_args(q, k, v, mask, seed, p_drop, is_causal, diag, scale);
  dispatch(q.scalar_type(), head_class(a.E, a.Ev), [&](auto zero, auto head) {
    forward<decltype(zero), decltype(head)::value>(a, q, num_splits, out, lse);
  });
  return {out, lse};
}

at::Tensor sdpa_dropout_mask(const at::Tensor& seed, int64_t B, int64_t H, int64_t L, int64_t S, double p_drop) {
  check_seed(seed, seed);
  check_probability(p_drop);
  TORCH_CHECK(B >= 0 && H >= 0 && L >= 0 && S >= 0, "sdpa_dropout_mask: sizes must be >= 0, got B=", B, ", H=", H,
              ", L=", L, ", S=", S);
  FASTSEQ_DEVICE_GUARD(seed);
  at::Tensor out = at::empty({B * H, L, S}, seed.options().dtype(at::kByte));
  const int64_t threads = B * H * L * ceil_div(S, 4);
  if (threads > 0) {
    TORCH_CHECK(ceil_div(threads, kKeepThreads) < (int64_t(1) << 31), "sdpa_dropout_mask: too many elements");
    FASTSEQ_LAUNCH_CHECK(launch_dropout_keep(seed.data_ptr<int64_t>(), out.data_ptr<uint8_t>(), B * H, L, S,
                                             float(p_drop), FASTSEQ_CURRENT_STREAM()));
  }
  return out.view(at::kBool).reshape({B, H, L, S});
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

template <typename T, int D>
void backward(const AttnArgs& a, int64_t Hk, int64_t Hv) {
  const BwdShape shape = bwd_shape<T, D>();
  // the dK/dV pass: one launch over the key heads, or (Hk ≠ Hv, or the head class 256) one over each
  for (const int64_t kv_heads : {Hk, Hv}) {
    const int64_t blocks = ceil_div(a.S, shape.dkdv.block_n) * a.B * kv_heads;
    TORCH_CHECK(blocks < (int64_t(1) << 31), "sdpa_bwd: grid too large (", blocks, " blocks)");
    check_launch(shape.dkdv.smem_bytes, "sdpa_bwd (dK, dV)");
  }
  const int64_t blocks = ceil_div(a.L, shape.dq.block_m) * a.B * a.H;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "sdpa_bwd: grid too large (", blocks, " blocks)");
  check_launch(shape.dq.smem_bytes, "sdpa_bwd (dQ)");
  const cudaError_t error = launch_bwd<T, D>(a, int(Hk), int(Hv), FASTSEQ_CURRENT_STREAM());
  FASTSEQ_LAUNCH_CHECK(error);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sdpa_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mask, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& seed, double p_drop, bool is_causal, int64_t diag, double scale,
    bool mask_grad) {
  check_qkv(q, k, v);
  check_mask(mask, q, k.size(2));
  check_seed(seed, q);
  check_probability(p_drop);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), S = k.size(2), Ev = v.size(3);
  const auto check_like_out = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == L && t.size(3) == Ev, name,
                " must have shape (B, H, L, Ev) = ", c10::IntArrayRef({B, H, L, Ev}), ", got ", shape_of(t));
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), name, " must have query's dtype (", q.scalar_type(), "), got ",
                t.scalar_type());
    check_device(t, name, q);
  };
  check_like_out(grad_out, "grad_out");
  check_like_out(out, "out");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == B &&
                  lse.size(1) == H && lse.size(2) == L,
              "lse must be a contiguous float32 tensor of shape (B, H, L) = ", c10::IntArrayRef({B, H, L}),
              ", got ", lse.scalar_type(), " of shape ", shape_of(lse));
  check_device(lse, "lse", q);
  TORCH_CHECK(!mask_grad || (mask.has_value() && mask->is_floating_point()),
              "mask_grad needs a floating-point mask, got ", mask.has_value() ? c10::str(mask->scalar_type()) : "none");
  FASTSEQ_DEVICE_GUARD(q);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor dmask = mask_grad ? at::zeros({B, H, L, S}, q.options().dtype(at::kFloat))
                               : at::empty({0}, q.options().dtype(at::kFloat));
  if (B * H == 0) return {dq, dk, dv, dmask};
  if (L == 0 || S == 0) {  // nothing attends: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask};
  }
  AttnArgs a = common_args(q, k, v, mask, seed, p_drop, is_causal, diag, scale);
  a.dout = operand(grad_out);
  a.out = operand(out);
  at::Tensor delta = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  a.delta = delta.data_ptr<float>();
  a.lse = lse.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.want_dmask = mask_grad;
  a.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  dispatch(q.scalar_type(), head_class(a.E, a.Ev), [&](auto zero, auto head) {
    backward<decltype(zero), decltype(head)::value>(a, k.size(1), v.size(1));
  });
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace attn
}  // namespace fastseq

FASTSEQ_ATTN_IMPL(FASTSEQ_ATTN_NAMESPACE, FASTSEQ_ATTN_DISPATCH_KEY, m) {
  m.impl("sdpa_fwd", &fastseq::attn::sdpa_fwd);
  m.impl("sdpa_bwd", &fastseq::attn::sdpa_bwd);
  m.impl("sdpa_dropout_mask", &fastseq::attn::sdpa_dropout_mask);
}
