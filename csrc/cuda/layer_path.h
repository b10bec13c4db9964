// The C++ face of the CUDA layers' path choice (persistent cooperative kernel or per-step products), for the Python
// module in csrc/extension.cpp: plain C++ types, no CUDA headers, so that the host compiler can include it.

#pragma once

#include <cstdint>
#include <string>

namespace fastseq {
namespace cuda {

struct PlanInfo {
  bool persistent = false;
  int units = 0, pu = 0, nb = 0, blocks = 0, capacity = 0;
  int64_t smem = 0;
  std::string reason;
};

// Which path a layer call of these sizes takes on CUDA device `device`, and why. kind: "lstm", "gru" or "rnn";
// dtype: "float32", "float16" or "bfloat16"; backward: the reverse-time pass. Raises without a GPU.
PlanInfo layer_plan_info(const std::string& kind, const std::string& dtype, bool backward, int D, int B, int H,
                         int P, int device);

// The same choice on a described device: `sms` multiprocessors, `smem_optin` bytes of shared memory a block may ask
// for, `smem_per_sm` per multiprocessor, cooperative launches or not; the occupancy is modelled from shared memory
// and the 2048 threads of an SM alone (registers are assumed not to be the limit). For tests without a GPU.
PlanInfo layer_plan_model(const std::string& kind, const std::string& dtype, bool backward, int D, int B, int H,
                          int P, int sms, int64_t smem_optin, int64_t smem_per_sm, bool cooperative);

// "auto" (default), "persistent" (raise where it cannot run) or "fallback" (always per-step products): for tests
// and benchmarks. Process-wide.
void set_layer_path(const std::string& path);
std::string layer_path();

// The path the last CUDA layer call took and why (e.g. "persistent: …" or "fallback: …"); empty before any.
std::string last_layer_path();

}  // namespace cuda
}  // namespace fastseq
