// csrc/cuda/attention_bwd.cu (kernels and launch function) as host C++ on the fiber emulator (cuda_emulator.h);
// the operators that call them are attention_emulated_ops.cpp (see test_attention_cuda_emulated.py).
#define FASTSEQ_CUDA_EMULATION 1
#include "attention_bwd.cu"
