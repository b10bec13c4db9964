// torch.ops.fastseq_cpp.small_gemm_nt: the small-M kernel of small_gemm.h as an operator, on a chosen code path, so
// that tests can hold every path this CPU runs (and the 16-lane logic of the AVX-512 path, on AVX2 machines)
// against torch.mm in float64. The kernels use it through rnn_common.h, not through this operator.

#include "rnn_common.h"

#include <torch/library.h>

#include <optional>
#include <string>

namespace fastseq {
namespace cpu {
namespace {

small_gemm::Isa isa_named(const std::string& name) {
  using small_gemm::Isa;
  Isa isa;
  if (name == "best") return small_gemm::best_isa();
  if (name == "baseline") {
    isa = Isa::baseline;
  } else if (name == "avx2") {
    isa = Isa::avx2;
  } else if (name == "avx2_w16") {
    isa = Isa::avx2_w16;
  } else if (name == "avx512") {
    isa = Isa::avx512;
  } else {
    TORCH_CHECK(false, "small_gemm_nt: isa must be 'best', 'baseline', 'avx2', 'avx2_w16' or 'avx512', got '", name,
                "'");
  }
  TORCH_CHECK(small_gemm::isa_supported(isa), "small_gemm_nt: this CPU does not run the '", name, "' path");
  return isa;
}

void check_operand(const at::Tensor& a, const at::Tensor& w, const char* which) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && a.device().is_cpu() &&
                  w.device().is_cpu(),
              "small_gemm_nt: ", which, " operands must be float32 CPU tensors");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.size(1) == w.size(1), "small_gemm_nt: ", which,
              " operands must be (M, K) and (N, K), got ", a.sizes(), " and ", w.sizes());
}

// a·wᵀ (+ a2·w2ᵀ): (M, N) float32.
at::Tensor small_gemm_nt(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& a2,
                         const std::optional<at::Tensor>& w2, const std::string& isa_name) {
  const small_gemm::Isa isa = isa_named(isa_name);
  check_operand(a, w, "first");
  const bool second = a2.has_value() && a2->defined();
  TORCH_CHECK(second == (w2.has_value() && w2->defined()), "small_gemm_nt: a2 and w2 go together");
  const at::Tensor a1u = unit_column_stride(a), w1u = unit_column_stride(w);
  at::Tensor a2u, w2u;
  if (second) {
    check_operand(*a2, *w2, "second");
    TORCH_CHECK(a2->size(0) == a.size(0) && w2->size(0) == w.size(0), "small_gemm_nt: a2·w2ᵀ must be ",
                a.size(0), " × ", w.size(0));
    a2u = unit_column_stride(*a2);
    w2u = unit_column_stride(*w2);
  }
  const int64_t M = a.size(0), N = w.size(0);
  at::Tensor out = at::empty({M, N}, a.options());
  NtOperand ops[2] = {nt_operand(a1u, w1u), second ? nt_operand(a2u, w2u) : NtOperand{}};
  small_gemm::gemm_nt(isa, M, 0, N, ops, second ? 2 : 1, out.data_ptr<float>(), N, false);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace fastseq

TORCH_LIBRARY_FRAGMENT(fastseq_cpp, m) {
  m.def("small_gemm_nt(Tensor a, Tensor w, Tensor? a2, Tensor? w2, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastseq_cpp, CPU, m) { m.impl("small_gemm_nt", &fastseq::cpu::small_gemm_nt); }
