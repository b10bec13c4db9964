// csrc/cuda/attention_fwd.cu (kernels and launch functions) as host C++ on the fiber emulator (cuda_emulator.h);
// the operators that call them are attention_emulated_ops.cpp (see test_attention_cuda_emulated.py).
#define FASTSEQ_CUDA_EMULATION 1
#include "attention_fwd.cu"
