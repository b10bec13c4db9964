// The torch operators of the CUDA layers: the recurrence of one LSTM, GRU or Elman RNN (tanh / relu) layer over a
// whole sequence on CUDA tensors, both directions, forward and backward, padded or packed, the CUDA implementations of
// torch.ops.fastseq_cpp.{lstm,gru,rnn}_layer_{fwd,bwd} (schemas in csrc/cpu/library.cpp), with the arguments,
// returns and float32 workspace of the CPU kernels (csrc/cpu/rnn_layers.cpp) and the Triton launchers
// (kernels/rnn_seq.py): per (direction, row) LSTM [a_i, a_f, a_g, a_o, c', c, m (with a projection), h],
// GRU [a_r, a_z, a_n, hn, h], RNN [a, h].
//
// Two paths, chosen per call by plan_layer (the choice and its reason are readable from Python:
// fastseq._C.cuda_layer_plan, fastseq._C.cuda_last_layer_path):
//
// - persistent (rnn_persistent.cu): one cooperative launch for all steps and both directions, W_hh sharded across
//   the blocks and resident in shared memory, one grid barrier per step. Taken when the device supports
//   cooperative launches and some slicing of W_hh (units per block) fits the shared memory of a block and needs no
//   more blocks than can be co-resident (cudaOccupancyMaxActiveBlocksPerMultiprocessor × SMs).
// - per-step (here, with the pointwise kernels of rnn_steps.cu): for sizes that do not fit on chip. Each step of each
//   direction is a cuBLAS product of the rows that advance (h[:n]·W_hhᵀ, float32 output from half-precision
//   operands, at::mm with out_dtype) and one fused pointwise kernel (gates, update, out, workspace; the state stays
//   float32 in global memory, with a copy rounded to the product dtype for the next product). Backward likewise, in
//   reverse time: the pointwise gate gradients, then dh = dA·W_hh. With a projection two more: h' = m·W_hrᵀ (and
//   dm = dh_t·W_hr) and a small commit kernel.
//
// Host code only, compiled once by the host compiler (rnn_kernels.h says why the kernels live apart).
//
// Precision as in the Triton kernels: products on operands in the input dtype (the state rounded to it; tensor
// cores for half precision), float32 accumulation, float32 state and gate math, outputs rounded to nearest even.

#include "layer_path.h"
#include "rnn_ops.h"

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace fastseq {
namespace cuda {

// ---------------------------------------------------------------------------------------------------------
// The plan: persistent or per-step, and how W_hh is sliced
// ---------------------------------------------------------------------------------------------------------

// Which implementation runs a layer call, and why.
struct LayerPlan {
  bool persistent = false;
  Slicing sl;
  int blocks = 0;     // D·nb
  int capacity = 0;   // co-resident blocks of that size on the device
  size_t smem = 0;    // dynamic shared memory per block (bytes)
  std::string reason;
};

// What the plan needs to know of the device, and the occupancy of a persistent kernel: blocks per SM at a given
// dynamic shared-memory size (cudaOccupancyMaxActiveBlocksPerMultiprocessor on a GPU; a model in the tests).
struct DeviceLimits {
  bool cooperative = false;
  int sms = 0;
  size_t smem_optin = 0;  // the most dynamic shared memory one block may ask for
  std::function<int(size_t smem)> blocks_per_sm;
};

// Sets a persistent kernel's dynamic shared-memory limit to `smem` bytes (the device's most: never lowered, so that
// concurrent launches of other sizes cannot invalidate one another) and its carveout to the most shared memory,
// before the occupancy query and so before any launch.
void prepare_persistent_kernel(const void* kernel, size_t smem) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      cudaSharedmemCarveoutMaxShared));
}

namespace {

std::atomic<int> g_path{0};  // 0 auto, 1 persistent, 2 fallback
std::mutex g_last_mutex;
std::string g_last_path;

void record_path(const std::string& what) {
  const std::lock_guard<std::mutex> lock(g_last_mutex);
  g_last_path = what;
}

SeqSmem seq_smem_of(at::ScalarType dtype, Kind kind, bool backward, int B, int H, int P, const Slicing& sl) {
  return dtype == at::kFloat ? seq_smem<float>(kind, backward, B, H, P, sl)
                             : seq_smem<__half>(kind, backward, B, H, P, sl);
}

// Units per block the persistent kernels may take, and the one preferred: the forward's product has G·units
// columns (32 preferred: two column tiles, G·units·H_out weights per block), the backward's units columns (16: one
// tile). Smaller slices mean more blocks (all SMs busy at large H), larger ones fewer (a cheaper barrier, less of
// h read by every block at small H): the plan takes the feasible candidate nearest the preferred one.
std::vector<int> unit_candidates(Kind kind, bool backward, int& preferred) {
  if (backward) {
    preferred = 16;
    return {16, 32, 64, 128};
  }
  if (kind == Kind::rnn) {
    preferred = 32;
    return {16, 32, 64, 128};
  }
  preferred = 8;
  return {4, 8, 16, 32};  // G·units ≤ kMaxCols = 128
}

std::string kib(size_t bytes) { return std::to_string((bytes + 1023) / 1024) + " KiB"; }

}  // namespace

LayerPlan plan_layer(Kind kind, at::ScalarType dtype, bool backward, int D, int B, int H, int P,
                     const DeviceLimits& dev) {
  LayerPlan plan;
  if (!dev.cooperative) {
    plan.reason = "the device does not support cooperative launches";
    return plan;
  }
  int preferred = 0;
  const std::vector<int> candidates = unit_candidates(kind, backward, preferred);
  int best = -1, best_distance = 1 << 30;
  std::string preferred_why;
  for (int i = 0; i < static_cast<int>(candidates.size()); ++i) {
    Slicing sl;
    sl.units = candidates[i];
    sl.nb = ceil_div(H, sl.units);
    sl.pu = P > 0 ? ceil_div(P, sl.nb) : 0;
    const size_t smem = seq_smem_of(dtype, kind, backward, B, H, P, sl).bytes;
    std::string why;
    int capacity = 0;
    if (smem > dev.smem_optin) {
      why = "a block would need " + kib(smem) + " of shared memory (W_hh slice, state), over the device's " +
            kib(dev.smem_optin);
    } else {
      capacity = dev.blocks_per_sm(smem) * dev.sms;
      if (D * sl.nb > capacity) {
        why = std::to_string(D * sl.nb) + " blocks of " + kib(smem) + " would have to be co-resident, the device holds " +
              std::to_string(capacity);
      }
    }
    if (candidates[i] == preferred) preferred_why = why;
    if (!why.empty()) continue;
    // nearest to the preferred in the candidate list; on a tie the larger slice (fewer blocks)
    const int distance = std::abs(static_cast<int>(std::log2(static_cast<double>(candidates[i]) / preferred)));
    if (distance <= best_distance) {
      best_distance = distance;
      best = i;
      plan.sl = sl;
      plan.smem = smem;
      plan.capacity = capacity;
    }
  }
  if (best < 0) {
    plan.reason = "W_hh does not fit on chip: with " + std::to_string(preferred) + " units per block " + preferred_why +
                  ", and no other slicing fits";
    return plan;
  }
  plan.persistent = true;
  plan.blocks = D * plan.sl.nb;
  plan.reason = std::to_string(plan.blocks) + " blocks of " + std::to_string(plan.sl.units) +
                " units (" + kib(plan.smem) + " of shared memory each; " + std::to_string(plan.capacity) +
                " can be co-resident)";
  return plan;
}

DeviceLimits device_limits(Kind kind, at::ScalarType dtype, bool backward, int device) {
  DeviceLimits lim;
  int coop = 0, sms = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const void* kernel = dtype == at::kFloat      ? persistent_kernel<float>(kind, backward)
                       : dtype == at::kHalf     ? persistent_kernel<__half>(kind, backward)
                                                : persistent_kernel<__nv_bfloat16>(kind, backward);
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  lim.cooperative = coop != 0;
  lim.sms = sms;
  // What a block may take dynamically: the opt-in limit less the kernel's static shared memory (the grid barrier's).
  lim.smem_optin = static_cast<size_t>(optin) - std::min(static_cast<size_t>(optin), attr.sharedSizeBytes);
  // The occupancy query honours the kernel's dynamic shared-memory limit and carveout: raise both to what the device
  // allows, as the launch does, so that the capacity computed here is the one the launch gets.
  prepare_persistent_kernel(kernel, lim.smem_optin);
  lim.blocks_per_sm = [kernel](size_t smem) {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
    return n;
  };
  return lim;
}

namespace {

LayerPlan choose_path(Kind kind, at::ScalarType dtype, bool backward, int D, int B, int H, int P, int device) {
  const int forced = g_path.load();
  if (forced == 2) {
    LayerPlan plan;
    plan.reason = "forced by fastseq._C.set_cuda_layer_path('fallback')";
    return plan;
  }
  LayerPlan plan = plan_layer(kind, dtype, backward, D, B, H, P, device_limits(kind, dtype, backward, device));
  TORCH_CHECK(plan.persistent || forced != 1, "fastseq: set_cuda_layer_path('persistent') but this layer cannot run "
              "persistent: ", plan.reason);
  return plan;
}

Kind kind_of(const std::string& kind) {
  if (kind == "lstm") return Kind::lstm;
  if (kind == "gru") return Kind::gru;
  TORCH_CHECK(kind == "rnn", "kind must be 'lstm', 'gru' or 'rnn', got '", kind, "'");
  return Kind::rnn;
}

at::ScalarType dtype_of(const std::string& dtype) {
  if (dtype == "float32") return at::kFloat;
  if (dtype == "float16") return at::kHalf;
  TORCH_CHECK(dtype == "bfloat16", "dtype must be 'float32', 'float16' or 'bfloat16', got '", dtype, "'");
  return at::kBFloat16;
}

PlanInfo info_of(const LayerPlan& plan) {
  PlanInfo info;
  info.persistent = plan.persistent;
  info.units = plan.sl.units;
  info.pu = plan.sl.pu;
  info.nb = plan.sl.nb;
  info.blocks = plan.blocks;
  info.capacity = plan.capacity;
  info.smem = static_cast<int64_t>(plan.smem);
  info.reason = plan.reason;
  return info;
}

void check_plan_sizes(int D, int B, int H, int P) {
  TORCH_CHECK(D == 1 || D == 2, "D (directions) must be 1 or 2, got ", D);
  TORCH_CHECK(B >= 1 && H >= 1 && P >= 0 && P < H, "sizes must satisfy B >= 1, H >= 1, 0 <= P < H; got B=", B,
              ", H=", H, ", P=", P);
}

}  // namespace

PlanInfo layer_plan_info(const std::string& kind, const std::string& dtype, bool backward, int D, int B, int H,
                         int P, int device) {
  check_plan_sizes(D, B, H, P);
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "device ", device, " is not a visible CUDA device (",
              c10::cuda::device_count(), " visible)");
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const Kind k = kind_of(kind);
  const at::ScalarType dt = dtype_of(dtype);
  if (g_path.load() == 2) return info_of(choose_path(k, dt, backward, D, B, H, P, device));
  return info_of(plan_layer(k, dt, backward, D, B, H, P, device_limits(k, dt, backward, device)));
}

PlanInfo layer_plan_model(const std::string& kind, const std::string& dtype, bool backward, int D, int B, int H,
                          int P, int sms, int64_t smem_optin, int64_t smem_per_sm, bool cooperative) {
  check_plan_sizes(D, B, H, P);
  DeviceLimits dev;
  dev.cooperative = cooperative;
  dev.sms = sms;
  dev.smem_optin = static_cast<size_t>(smem_optin);
  dev.blocks_per_sm = [smem_per_sm](size_t smem) {
    const int64_t by_threads = 2048 / kThreads;
    const int64_t by_smem = smem_per_sm / (static_cast<int64_t>(smem) + 1024);  // 1 KiB reserved per block
    return static_cast<int>(std::min(by_threads, by_smem));
  };
  return info_of(plan_layer(kind_of(kind), dtype_of(dtype), backward, D, B, H, P, dev));
}

void set_layer_path(const std::string& path) {
  TORCH_CHECK(path == "auto" || path == "persistent" || path == "fallback",
              "path must be 'auto', 'persistent' or 'fallback', got '", path, "'");
  g_path.store(path == "auto" ? 0 : path == "persistent" ? 1 : 2);
}

std::string layer_path() {
  const int p = g_path.load();
  return p == 0 ? "auto" : p == 1 ? "persistent" : "fallback";
}

std::string last_layer_path() {
  const std::lock_guard<std::mutex> lock(g_last_mutex);
  return g_last_path;
}

// ---------------------------------------------------------------------------------------------------------
// The per-step path
// ---------------------------------------------------------------------------------------------------------

namespace {

// out (float32, contiguous rows) = a · w; a in the product dtype (half precision: float32 output from cuBLAS).
void mm_f32(const Tensor& out, const Tensor& a, const Tensor& w) {
  Tensor o = out;
  if (a.scalar_type() == at::kFloat) {
    at::mm_out(o, a, w);
  } else {
    at::mm_out(o, a, w, at::kFloat);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Layers: validation, allocation, and the two paths
// ---------------------------------------------------------------------------------------------------------

// The time steps on the host (the per-step path's loop, the persistent kernels' device copy).
struct HostSteps {
  int64_t T = 0, B = 0, rows = 0;
  bool packed = false;
  std::vector<int64_t> sizes, offsets;

  int64_t n(int64_t t) const { return packed ? sizes[t] : B; }
  int64_t row0(int64_t t) const { return packed ? offsets[t] : t * B; }
};

HostSteps steps_of(const Tensor& seq, const OptTensor& batch_sizes, int64_t B, const char* what) {
  HostSteps s;
  s.B = B;
  if (given(batch_sizes)) {
    TORCH_CHECK(seq.dim() == 2, what, ": packed data must be 2-D (N, ·), got ", seq.sizes());
    const Tensor bs = batch_sizes->to(at::kCPU, at::kLong).contiguous();
    s.packed = true;
    s.T = bs.numel();
    s.rows = seq.size(0);
    const int64_t* p = bs.data_ptr<int64_t>();
    s.sizes.assign(p, p + s.T);
    s.offsets.resize(s.T);
    int64_t total = 0;
    for (int64_t t = 0; t < s.T; ++t) {
      TORCH_CHECK(s.sizes[t] >= 0 && s.sizes[t] <= B, what, ": batch_sizes[", t, "] = ", s.sizes[t],
                  " is not in [0, ", B, "]");
      s.offsets[t] = total;
      total += s.sizes[t];
    }
    TORCH_CHECK(total == s.rows, what, ": batch_sizes sum to ", total, " but the packed data has ", s.rows, " rows");
  } else {
    TORCH_CHECK(seq.dim() == 3 && seq.size(1) == B, what, ": a padded sequence must be (T, ", B, ", ·), got ",
                seq.sizes());
    s.T = seq.size(0);
    s.rows = s.T * B;
  }
  return s;
}

int64_t time_of(int64_t s, int64_t T, int64_t d, bool backward) {
  const bool ascending = (d == 0) != backward;
  return ascending ? s : T - 1 - s;
}

struct Layer {
  Kind kind;
  int64_t D, B, H, HO, P, G, W;
  HostSteps steps;
};

int64_t ws_width(Kind k, int64_t H, int64_t P) {
  if (k == Kind::lstm) return 6 * H + (P ? H : 0) + (P ? P : H);
  return k == Kind::gru ? 5 * H : 2 * H;
}

Layer layer_of(Kind kind, const Tensor& seq, const Tensor& state, const Tensor& w_hh, const OptTensor& w_hr,
               const OptTensor& batch_sizes, const char* what, const char* seq_name) {
  check_cuda_tensor(w_hh, "w_hh", w_hh);
  dispatch_dtype(w_hh.scalar_type(), "w_hh", [](auto) {});
  check_same_dtype(seq, seq_name, w_hh, "w_hh");
  check_same_dtype(state, "the initial state", w_hh, "w_hh");
  TORCH_CHECK(state.dim() == 3 && w_hh.dim() == 3, what, ": states must be (D, B, ·) and w_hh (D, G, Hout)");
  Layer L;
  L.kind = kind;
  L.D = state.size(0);
  L.B = state.size(1);
  L.HO = state.size(2);
  const int64_t ng = num_gates(kind);
  TORCH_CHECK(L.D == 1 || L.D == 2, what, ": D (directions) must be 1 or 2, got ", L.D);
  TORCH_CHECK(w_hh.size(0) == L.D && w_hh.size(1) % ng == 0 && w_hh.size(2) == L.HO, what, ": w_hh ", w_hh.sizes(),
              " does not match the states ", state.sizes());
  L.H = w_hh.size(1) / ng;
  L.G = ng * L.H;
  L.P = 0;
  if (given(w_hr)) {
    check_same_dtype(*w_hr, "w_hr", w_hh, "w_hh");
    TORCH_CHECK(kind == Kind::lstm && w_hr->dim() == 3 && w_hr->size(0) == L.D && w_hr->size(1) == L.HO &&
                    w_hr->size(2) == L.H,
                what, ": w_hr must be (", L.D, ", ", L.HO, ", ", L.H, "), got ", w_hr->sizes());
    L.P = w_hr->size(1);
  } else {
    TORCH_CHECK(L.HO == L.H, what, ": without a projection the hidden state has H = ", L.H, " units, got ", L.HO);
  }
  TORCH_CHECK(L.B <= INT32_MAX && L.H <= INT32_MAX / 8, what, ": sizes over the CUDA kernels' limits");
  L.W = ws_width(kind, L.H, L.P);
  L.steps = steps_of(seq, batch_sizes, L.B, what);
  TORCH_CHECK(L.steps.T <= INT32_MAX, what, ": too many time steps");
  return L;
}

// The sequence geometry on the device (packed: batch sizes and step offsets copied once per call).
SeqGeometry device_geometry(const HostSteps& S, const Tensor& like, Tensor& keep_alive) {
  SeqGeometry g;
  g.T = static_cast<int>(S.T);
  g.B = static_cast<int>(S.B);
  g.packed = S.packed;
  if (S.packed) {
    Tensor host = at::empty({2, S.T}, at::TensorOptions().dtype(at::kLong));
    std::copy(S.sizes.begin(), S.sizes.end(), host.data_ptr<int64_t>());
    std::copy(S.offsets.begin(), S.offsets.end(), host.data_ptr<int64_t>() + S.T);
    keep_alive = host.to(like.device());
    g.sizes = keep_alive.data_ptr<int64_t>();
    g.offsets = g.sizes + S.T;
  }
  return g;
}

// Whether a cooperative launch went: false, with the reason, where the driver refused the grid's size (not
// co-resident now, or no cooperative launch) and the caller falls back; any other error raises.
bool accepted(cudaError_t err, const LayerPlan& plan, std::string& why) {
  if (err == cudaSuccess) return true;
  if (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported) {
    (void)cudaGetLastError();  // not sticky: clear it
    why = cudaGetErrorString(err);
    return false;
  }
  TORCH_CHECK(false, "fastseq: the persistent CUDA layer kernel failed to launch (", plan.blocks, " blocks, ",
              plan.smem, " B of shared memory): ", cudaGetErrorString(err));
}

// Runs `persistent(why)` where the plan says so and the driver accepts the cooperative launch, else `per_step()`;
// records which ran and why.
template <typename Persistent, typename PerStep>
void run_path(LayerPlan plan, const Persistent& persistent, const PerStep& per_step) {
  if (plan.persistent) {
    std::string why;
    if (persistent(why)) {
      record_path("persistent: " + plan.reason);
      return;
    }
    plan.reason = "the cooperative launch was refused (" + why + ")";
  }
  record_path("fallback: " + plan.reason);
  per_step();
}

// Forward, per-step path. gx: the caller's gates_x (any strides); out: contiguous.
template <typename T>
void forward_per_step(const Layer& L, const Tensor& gx, const Tensor& h0, const OptTensor& c0, const Tensor& w_hh,
                      const OptTensor& b_hh, const OptTensor& w_hr, bool save, bool relu, Tensor& out, Tensor& h_n,
                      Tensor& c_n, Tensor& ws) {
  const HostSteps& S = L.steps;
  const auto f32 = gx.options().dtype(at::kFloat);
  const bool f32_io = gx.scalar_type() == at::kFloat;
  Tensor h32 = h0.to(at::kFloat).contiguous().clone();
  Tensor c32 = L.kind == Kind::lstm ? c0->to(at::kFloat).contiguous().clone() : Tensor();
  Tensor h_dot = f32_io ? h32 : h0.contiguous().clone();
  Tensor gh = at::empty({L.B, L.G}, f32);
  Tensor m_dot = L.P ? at::empty({L.B, L.H}, gx.options()) : Tensor();
  Tensor hp = L.P ? at::empty({L.B, L.P}, f32) : Tensor();
  const bool packed = S.packed;
  const int64_t s_gt = packed ? 0 : gx.stride(0), s_gb = packed ? gx.stride(0) : gx.stride(1), s_gc = gx.stride(-1);
  for (int64_t s = 0; s < S.T; ++s) {
    for (int64_t d = 0; d < L.D; ++d) {
      const int64_t t = time_of(s, S.T, d, false), n = S.n(t), row0 = S.row0(t);
      if (n == 0) continue;
      mm_f32(gh.narrow(0, 0, n), h_dot.select(0, d).narrow(0, 0, n), w_hh.select(0, d).t());
      StepFwd<T> p{};
      p.n = static_cast<int>(n);
      p.H = static_cast<int>(L.H);
      p.HO = static_cast<int>(L.HO);
      p.W = static_cast<int>(L.W);
      p.s_out = L.D * L.HO;
      p.gh = gh.data_ptr<float>();
      p.gx = ptr<T>(gx) + (packed ? row0 * s_gb : t * s_gt) + d * L.G * s_gc;
      p.s_gb = s_gb;
      p.s_gc = s_gc;
      p.b_hh = given(b_hh) ? ptr<T>(*b_hh) + d * b_hh->stride(0) : nullptr;
      p.s_bc = given(b_hh) ? b_hh->stride(1) : 0;
      p.h32 = h32.data_ptr<float>() + d * L.B * L.HO;
      p.c32 = c32.defined() ? c32.data_ptr<float>() + d * L.B * L.H : nullptr;
      p.h_dot = f32_io ? nullptr : ptr<T>(h_dot) + d * L.B * L.HO;
      p.m_dot = L.P ? ptr<T>(m_dot) : nullptr;
      p.ws = save ? ws.data_ptr<float>() + (d * S.rows + row0) * L.W : nullptr;
      p.out = ptr<T>(out) + row0 * L.D * L.HO + d * L.HO;
      p.relu = relu;
      p.proj = L.P > 0;
      launch_step_fwd<T>(L.kind, p, current_stream());
      if (L.P) {
        mm_f32(hp.narrow(0, 0, n), m_dot.narrow(0, 0, n), w_hr->select(0, d).t());
        launch_step_proj<T>(p, hp.data_ptr<float>(), current_stream());
      }
    }
  }
  h_n.copy_(h32);  // rounds to nearest even
  if (L.kind == Kind::lstm) c_n.copy_(c32);
}

// Backward, per-step path. go: the caller's grad_out (any strides); dgx, dgh: contiguous.
template <typename T>
void backward_per_step(const Layer& L, const Tensor& go, const Tensor& grad_hn, const OptTensor& grad_cn,
                       const Tensor& ws, const Tensor& w_hh, const OptTensor& w_hr, bool relu, Tensor& dgx,
                       Tensor& dgh, Tensor& dh0, Tensor& dc0, Tensor& dht) {
  const HostSteps& S = L.steps;
  const auto f32 = go.options().dtype(at::kFloat);
  const bool f32_io = go.scalar_type() == at::kFloat;
  Tensor dh32 = grad_hn.to(at::kFloat).contiguous().clone();
  Tensor dc32 = L.kind == Kind::lstm ? grad_cn->to(at::kFloat).contiguous().clone() : Tensor();
  Tensor dA = at::empty({L.B, L.G}, go.options());
  Tensor dm = L.P ? at::empty({L.B, L.H}, f32) : Tensor();
  Tensor dht_dot = L.P && !f32_io ? at::empty({L.B, L.P}, go.options()) : Tensor();
  Tensor direct = L.kind == Kind::gru && !f32_io ? at::empty({L.B, L.HO}, f32) : Tensor();
  const bool packed = S.packed;
  const int64_t s_ot = packed ? 0 : go.stride(0), s_ob = packed ? go.stride(0) : go.stride(1), s_oc = go.stride(-1);
  for (int64_t s = 0; s < S.T; ++s) {
    for (int64_t d = 0; d < L.D; ++d) {
      const int64_t t = time_of(s, S.T, d, true), n = S.n(t), row0 = S.row0(t);
      if (n == 0) continue;
      const T* go_t = ptr<T>(go) + (packed ? row0 * s_ob : t * s_ot) + d * L.HO * s_oc;
      float* dh_d = dh32.data_ptr<float>() + d * L.B * L.HO;
      if (L.P) {  // dh_t = dh + grad_out[t] (the caller's dW_hr reads it), then dm = dh_t·W_hr
        float* dht_t = dht.data_ptr<float>() + (d * S.rows + row0) * L.P;
        launch_step_dht<T>(static_cast<int>(n), static_cast<int>(L.P), go_t, s_ob, s_oc, dh_d, dht_t,
                           f32_io ? nullptr : ptr<T>(dht_dot), current_stream());
        const Tensor dht_rows = f32_io ? dht.select(0, d).narrow(0, row0, n) : dht_dot.narrow(0, 0, n);
        mm_f32(dm.narrow(0, 0, n), dht_rows, w_hr->select(0, d));
      }
      StepBwd<T> p{};
      p.n = static_cast<int>(n);
      p.H = static_cast<int>(L.H);
      p.HO = static_cast<int>(L.HO);
      p.W = static_cast<int>(L.W);
      p.s_dg = L.D * L.G;
      p.go = go_t;
      p.s_ob = s_ob;
      p.s_oc = s_oc;
      p.ws = ws.data_ptr<float>() + (d * S.rows + row0) * L.W;
      p.dm = L.P ? dm.data_ptr<float>() : nullptr;
      p.dh32 = dh_d;
      p.dc32 = dc32.defined() ? dc32.data_ptr<float>() + d * L.B * L.H : nullptr;
      p.dgx = ptr<T>(dgx) + row0 * L.D * L.G + d * L.G;
      p.dgh = ptr<T>(dgh) + row0 * L.D * L.G + d * L.G;
      p.dA = ptr<T>(dA);
      p.relu = relu;
      launch_step_bwd<T>(L.kind, p, current_stream());
      // dh ← dA_h·W_hh (GRU: added to the direct part dh·z the pointwise kernel left in dh)
      Tensor dh_rows = dh32.select(0, d).narrow(0, 0, n);
      const Tensor dA_rows = dA.narrow(0, 0, n), w = w_hh.select(0, d);
      if (L.kind != Kind::gru) {
        mm_f32(dh_rows, dA_rows, w);
      } else if (f32_io) {
        dh_rows.addmm_(dA_rows, w);
      } else {
        Tensor product = direct.narrow(0, 0, n);
        mm_f32(product, dA_rows, w);
        dh_rows.add_(product);
      }
    }
  }
  dh0.copy_(dh32);
  if (L.kind == Kind::lstm) dc0.copy_(dc32);
}

// ---------------------------------------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_fwd(Kind kind, const Tensor& gates_x, const Tensor& h0,
                                                     const OptTensor& c0, const Tensor& w_hh, const OptTensor& b_hh,
                                                     const OptTensor& w_hr, const OptTensor& batch_sizes, bool save,
                                                     bool relu, const char* what) {
  const Layer L = layer_of(kind, gates_x, h0, w_hh, w_hr, batch_sizes, what, "gates_x");
  TORCH_CHECK(gates_x.size(-1) == L.D * L.G, what, ": gates_x must have D·G = ", L.D * L.G, " columns, got ",
              gates_x.size(-1));
  if (kind == Kind::lstm) {
    TORCH_CHECK(given(c0) && c0->dim() == 3 && c0->size(0) == L.D && c0->size(1) == L.B && c0->size(2) == L.H,
                what, ": c0 must be (", L.D, ", ", L.B, ", ", L.H, ")");
    check_same_dtype(*c0, "c0", w_hh, "w_hh");
  }
  if (given(b_hh)) {
    check_same_dtype(*b_hh, "b_hh", w_hh, "w_hh");
    TORCH_CHECK(b_hh->dim() == 2 && b_hh->size(0) == L.D && b_hh->size(1) == L.G, what, ": b_hh must be (", L.D,
                ", ", L.G, "), got ", b_hh->sizes());
  }
  const HostSteps& S = L.steps;
  auto shape = gates_x.sizes().vec();
  shape.back() = L.D * L.HO;
  const auto f32 = gates_x.options().dtype(at::kFloat);
  Tensor out = at::empty(shape, gates_x.options());
  Tensor h_n = at::empty({L.D, L.B, L.HO}, gates_x.options());
  Tensor c_n = kind == Kind::lstm ? at::empty({L.D, L.B, L.H}, gates_x.options()) : at::empty({0}, gates_x.options());
  Tensor ws = save ? at::empty({L.D, S.rows, L.W}, f32) : at::empty({0}, f32);
  if (S.T == 0 || L.B == 0 || S.rows == 0) {  // nothing advances: the final state is the initial one
    h_n.copy_(h0);
    if (kind == Kind::lstm) c_n.copy_(*c0);
    return {out, h_n, c_n, ws};
  }
  const c10::cuda::CUDAGuard guard(gates_x.device());
  const LayerPlan plan = choose_path(kind, gates_x.scalar_type(), false, static_cast<int>(L.D),
                                     static_cast<int>(L.B), static_cast<int>(L.H), static_cast<int>(L.P),
                                     gates_x.get_device());
  dispatch_dtype(gates_x.scalar_type(), what, [&](auto tag) {
    using T = decltype(tag);
    const auto persistent = [&](std::string& why) {
      const Tensor h0c = h0.contiguous(), c0c = kind == Kind::lstm ? c0->contiguous() : Tensor();
      Tensor h_ex = at::empty({2, L.D, L.B, L.HO}, gates_x.options());
      Tensor m_ex = L.P ? at::empty({L.D, L.B, L.H}, gates_x.options()) : Tensor();
      Tensor geometry;
      SeqFwdArgs<T> a;
      a.geo = device_geometry(S, gates_x, geometry);
      a.sl = plan.sl;
      a.H = static_cast<int>(L.H), a.HO = static_cast<int>(L.HO), a.P = static_cast<int>(L.P);
      a.D = static_cast<int>(L.D);
      a.save = save, a.relu = relu;
      a.gx = ptr<T>(gates_x);
      a.s_gt = S.packed ? 0 : gates_x.stride(0);
      a.s_gb = S.packed ? gates_x.stride(0) : gates_x.stride(1);
      a.s_gc = gates_x.stride(-1);
      a.h0 = ptr<T>(h0c);
      a.c0 = c0c.defined() ? ptr<T>(c0c) : nullptr;
      a.w_hh = ptr<T>(w_hh), a.s_wd = w_hh.stride(0), a.s_wr = w_hh.stride(1), a.s_wc = w_hh.stride(2);
      a.b_hh = ptr_or_null<T>(b_hh);
      a.s_bd = given(b_hh) ? b_hh->stride(0) : 0, a.s_bc = given(b_hh) ? b_hh->stride(1) : 0;
      a.w_hr = ptr_or_null<T>(w_hr);
      if (L.P) a.s_rd = w_hr->stride(0), a.s_rr = w_hr->stride(1), a.s_rc = w_hr->stride(2);
      a.out = ptr<T>(out), a.h_n = ptr<T>(h_n), a.c_n = kind == Kind::lstm ? ptr<T>(c_n) : nullptr;
      a.ws = save ? ws.data_ptr<float>() : nullptr;
      a.rows = S.rows, a.W = static_cast<int>(L.W);
      a.h_ex = ptr<T>(h_ex);
      a.m_ex = L.P ? ptr<T>(m_ex) : nullptr;
      return accepted(launch_persistent_fwd<T>(kind, a, plan.blocks, plan.smem, current_stream()), plan, why);
    };
    run_path(plan, persistent,
             [&] { forward_per_step<T>(L, gates_x, h0, c0, w_hh, b_hh, w_hr, save, relu, out, h_n, c_n, ws); });
  });
  return {out, h_n, c_n, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_bwd(Kind kind, const Tensor& grad_out, const Tensor& grad_hn,
                                                             const OptTensor& grad_cn, const Tensor& workspace,
                                                             const Tensor& w_hh, const OptTensor& w_hr,
                                                             const OptTensor& batch_sizes, bool relu,
                                                             const char* what) {
  const Layer L = layer_of(kind, grad_out, grad_hn, w_hh, w_hr, batch_sizes, what, "grad_out");
  TORCH_CHECK(grad_out.size(-1) == L.D * L.HO, what, ": grad_out must have D·Hout = ", L.D * L.HO,
              " columns, got ", grad_out.size(-1));
  if (kind == Kind::lstm) {
    TORCH_CHECK(given(grad_cn) && grad_cn->dim() == 3 && grad_cn->size(0) == L.D && grad_cn->size(1) == L.B &&
                    grad_cn->size(2) == L.H,
                what, ": grad_cn must be (", L.D, ", ", L.B, ", ", L.H, ")");
    check_same_dtype(*grad_cn, "grad_cn", w_hh, "w_hh");
  }
  const HostSteps& S = L.steps;
  const auto opts = w_hh.options();
  const auto f32 = opts.dtype(at::kFloat);
  auto shape = grad_out.sizes().vec();
  shape.back() = L.D * L.G;
  Tensor dgx = at::empty(shape, opts);
  Tensor dgh = kind == Kind::gru ? at::empty(shape, opts) : at::empty({0}, opts);
  Tensor dh0 = at::empty({L.D, L.B, L.HO}, opts);
  Tensor dc0 = kind == Kind::lstm ? at::empty({L.D, L.B, L.H}, opts) : at::empty({0}, opts);
  Tensor dht = at::empty(L.P ? std::vector<int64_t>{L.D, S.rows, L.P} : std::vector<int64_t>{0}, f32);
  if (S.T == 0 || L.B == 0 || S.rows == 0) {  // no step: the initial state's gradient is the final state's
    dh0.copy_(grad_hn);
    if (kind == Kind::lstm) dc0.copy_(*grad_cn);
    return {dgx, dgh, dh0, dc0, dht};
  }
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.dim() == 3 && workspace.size(0) == L.D &&
                  workspace.size(1) == S.rows && workspace.size(2) == L.W,
              what, ": the workspace must be float32 (", L.D, ", ", S.rows, ", ", L.W, "), got ",
              workspace.scalar_type(), " ", workspace.sizes());
  TORCH_CHECK(workspace.device() == w_hh.device(), what, ": the workspace must be on ", w_hh.device(), ", got ",
              workspace.device());
  const c10::cuda::CUDAGuard guard(w_hh.device());
  const Tensor ws = workspace.contiguous();
  Tensor& dgh_out = kind == Kind::gru ? dgh : dgx;
  const LayerPlan plan = choose_path(kind, w_hh.scalar_type(), true, static_cast<int>(L.D), static_cast<int>(L.B),
                                     static_cast<int>(L.H), static_cast<int>(L.P), w_hh.get_device());
  dispatch_dtype(w_hh.scalar_type(), what, [&](auto tag) {
    using T = decltype(tag);
    const auto persistent = [&](std::string& why) {
      const Tensor ghn = grad_hn.contiguous(), gcn = kind == Kind::lstm ? grad_cn->contiguous() : Tensor();
      Tensor dA_ex = at::empty({2, L.D, L.B, L.G}, opts);
      Tensor dht_ex = L.P ? at::empty({L.D, L.B, L.P}, opts) : Tensor();
      Tensor geometry;
      SeqBwdArgs<T> a;
      a.geo = device_geometry(S, grad_out, geometry);
      a.sl = plan.sl;
      a.H = static_cast<int>(L.H), a.HO = static_cast<int>(L.HO), a.P = static_cast<int>(L.P);
      a.D = static_cast<int>(L.D);
      a.relu = relu;
      a.go = ptr<T>(grad_out);
      a.s_ot = S.packed ? 0 : grad_out.stride(0);
      a.s_ob = S.packed ? grad_out.stride(0) : grad_out.stride(1);
      a.s_oc = grad_out.stride(-1);
      a.ghn = ptr<T>(ghn);
      a.gcn = gcn.defined() ? ptr<T>(gcn) : nullptr;
      a.ws = ws.data_ptr<float>();
      a.rows = S.rows, a.W = static_cast<int>(L.W);
      a.w_hh = ptr<T>(w_hh), a.s_wd = w_hh.stride(0), a.s_wr = w_hh.stride(1), a.s_wc = w_hh.stride(2);
      a.w_hr = ptr_or_null<T>(w_hr);
      if (L.P) a.s_rd = w_hr->stride(0), a.s_rr = w_hr->stride(1), a.s_rc = w_hr->stride(2);
      a.dgx = ptr<T>(dgx), a.dgh = ptr<T>(dgh_out);
      a.dh0 = ptr<T>(dh0), a.dc0 = kind == Kind::lstm ? ptr<T>(dc0) : nullptr;
      a.dht = L.P ? dht.data_ptr<float>() : nullptr;
      a.dA_ex = ptr<T>(dA_ex);
      a.dht_ex = L.P ? ptr<T>(dht_ex) : nullptr;
      return accepted(launch_persistent_bwd<T>(kind, a, plan.blocks, plan.smem, current_stream()), plan, why);
    };
    run_path(plan, persistent, [&] {
      backward_per_step<T>(L, grad_out, grad_hn, grad_cn, ws, w_hh, w_hr, relu, dgx, dgh_out, dh0, dc0, dht);
    });
  });
  return {dgx, dgh, dh0, dc0, dht};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_fwd(const Tensor& gates_x, const Tensor& h0, const Tensor& c0,
                                                          const Tensor& w_hh, const OptTensor& b_hh,
                                                          const OptTensor& w_hr, const OptTensor& batch_sizes,
                                                          bool save) {
  return layer_fwd(Kind::lstm, gates_x, h0, c0, w_hh, b_hh, w_hr, batch_sizes, save, false, "lstm_layer_fwd");
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_fwd(const Tensor& gates_x, const Tensor& h0, const Tensor& w_hh,
                                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool save) {
  auto r = layer_fwd(Kind::gru, gates_x, h0, std::nullopt, w_hh, b_hh, std::nullopt, batch_sizes, save, false,
                     "gru_layer_fwd");
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r)};
}

std::tuple<Tensor, Tensor, Tensor> rnn_layer_fwd(const Tensor& gates_x, const Tensor& h0, const Tensor& w_hh,
                                                 const OptTensor& b_hh, const OptTensor& batch_sizes, bool save,
                                                 std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  auto r = layer_fwd(Kind::rnn, gates_x, h0, std::nullopt, w_hh, b_hh, std::nullopt, batch_sizes, save, relu,
                     "rnn_layer_fwd");
  return {std::get<0>(r), std::get<1>(r), std::get<3>(r)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_layer_bwd(const Tensor& grad_out, const Tensor& grad_hn,
                                                          const Tensor& grad_cn, const Tensor& workspace,
                                                          const Tensor& w_hh, const OptTensor& w_hr,
                                                          const OptTensor& batch_sizes) {
  auto r = layer_bwd(Kind::lstm, grad_out, grad_hn, grad_cn, workspace, w_hh, w_hr, batch_sizes, false,
                     "lstm_layer_bwd");
  return {std::get<0>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
}

std::tuple<Tensor, Tensor, Tensor> gru_layer_bwd(const Tensor& grad_out, const Tensor& grad_hn,
                                                 const Tensor& workspace, const Tensor& w_hh,
                                                 const OptTensor& batch_sizes) {
  auto r = layer_bwd(Kind::gru, grad_out, grad_hn, std::nullopt, workspace, w_hh, std::nullopt, batch_sizes, false,
                     "gru_layer_bwd");
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<Tensor, Tensor> rnn_layer_bwd(const Tensor& grad_out, const Tensor& grad_hn, const Tensor& workspace,
                                         const Tensor& w_hh, const OptTensor& batch_sizes, std::string nonlinearity) {
  const bool relu = is_relu(nonlinearity);
  auto r = layer_bwd(Kind::rnn, grad_out, grad_hn, std::nullopt, workspace, w_hh, std::nullopt, batch_sizes, relu,
                     "rnn_layer_bwd");
  return {std::get<0>(r), std::get<2>(r)};
}

}  // namespace
}  // namespace cuda
}  // namespace fastseq

TORCH_LIBRARY_IMPL(fastseq_cpp, CUDA, m) {
  m.impl("lstm_layer_fwd", &fastseq::cuda::lstm_layer_fwd);
  m.impl("gru_layer_fwd", &fastseq::cuda::gru_layer_fwd);
  m.impl("rnn_layer_fwd", &fastseq::cuda::rnn_layer_fwd);
  m.impl("lstm_layer_bwd", &fastseq::cuda::lstm_layer_bwd);
  m.impl("gru_layer_bwd", &fastseq::cuda::gru_layer_bwd);
  m.impl("rnn_layer_bwd", &fastseq::cuda::rnn_layer_bwd);
}
