// Adds the attention operators' schemas (attention_schema.h) to torch.ops.fastseq_cpp, whose library is
// defined in csrc/cpu/library.cpp. Always compiled: the CUDA implementations (csrc/cuda/attention_*.cu) are
// registered where the extension is built with CUDA; there is no CPU implementation (attention on CPU stays
// with the "torch" and "triton" backends), so a call on CPU tensors raises torch's "no kernel" error.

#include "attention_schema.h"

TORCH_LIBRARY_FRAGMENT(fastseq_cpp, m) { fastseq::attn::define_attention_ops(m); }
