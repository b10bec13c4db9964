// csrc/cuda/attention_bwd.cu as host C++ on the fiber emulator (cuda_emulator.h), registered for CPU tensors
// as torch.ops.fastseq_emu.* (see test_attention_cuda_emulated.py).
#define FASTSEQ_CUDA_EMULATION 1
#define FASTSEQ_ATTN_NAMESPACE fastseq_emu
#define FASTSEQ_ATTN_DISPATCH_KEY CPU
#include "attention_bwd.cu"
