// csrc/cuda/attention_cuda_ops.cpp, the CUDA attention operators, registered for CPU tensors as
// torch.ops.fastseq_emu.* (see test_attention_cuda_emulated.py): the same checks, outputs, workspaces and choice of
// splits, calling the launch functions of attention_emulated_fwd.cpp and attention_emulated_bwd.cpp.
#define FASTSEQ_CUDA_EMULATION 1
#define FASTSEQ_ATTN_NAMESPACE fastseq_emu
#define FASTSEQ_ATTN_DISPATCH_KEY CPU
#include "attention_cuda_ops.cpp"
