// The schemas of the CUDA attention kernels' operators, torch.ops.fastseq_cpp.sdpa_*: the launcher contract of
// kernels/attention.py (launch_attention_fwd, launch_attention_bwd, dropout_keep_mask), which
// fastseq/cuda_kernels.py wraps as the "cuda" backend's launchers (with their fake implementations).
// csrc/attention_ops.cpp adds them to the fastseq_cpp library; the CPU emulation test build
// (tests/cuda_emulation) defines them in a namespace of its own.
//
// - sdpa_fwd: q (B, H, L, E), k (B, Hk, S, E), v (B, Hv, S, Ev), any strides; mask None or 4-D (1 or B, 1 or H,
//   1 or L, 1 or S), bool or float32 or the inputs' dtype; seed None or int64 (2,) = (Philox seed, stream) on
//   the device; keys j <= i + diag take part when is_causal. num_splits: key splits of the decode path, <= 0
//   picks. Returns out (B, H, L, Ev) in q's dtype and lse (B, H, L) float32 in base 2 (+inf: no key).
// - sdpa_bwd: the gradients (dq, dk, dv) contiguous in the inputs' shapes and dtype, and dmask, float32
//   (B, H, L, S) when mask_grad (zero where a tile was skipped), else an empty tensor.
// - sdpa_dropout_mask: the keep-mask (bool (B, H, L, S), True = kept) the kernels draw for seed and p.

#pragma once

#include <torch/library.h>

namespace fastseq {
namespace attn {

inline void define_attention_ops(torch::Library& m) {
  m.def("sdpa_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? seed, float p_drop, bool is_causal, "
        "int diag, float scale, int num_splits) -> (Tensor out, Tensor lse)");
  m.def("sdpa_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor out, Tensor lse, "
        "Tensor? seed, float p_drop, bool is_causal, int diag, float scale, bool mask_grad) "
        "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  m.def("sdpa_dropout_mask(Tensor seed, int B, int H, int L, int S, float p_drop) -> Tensor");
}

}  // namespace attn
}  // namespace fastseq
