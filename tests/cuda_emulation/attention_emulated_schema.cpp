// The attention operators' schemas (csrc/attention_schema.h) in the emulation build's own namespace.
#include "attention_schema.h"

TORCH_LIBRARY(fastseq_emu, m) { fastseq::attn::define_attention_ops(m); }
