// What the two implementations of a CUDA layer recurrence share (rnn_persistent.cu: one cooperative launch for the
// whole sequence; rnn_layers.cu: the operators, the choice between the two, and the per-step fallback): the
// arguments of a launch, the shared-memory layout of the persistent kernels, and the plan.

#pragma once

#include "rnn_cuda.cuh"

#include <functional>
#include <string>

namespace fastseq {
namespace cuda {

// The time steps of a launch as the kernels see them: step s of direction d is time t (forward: direction 0
// ascending, direction 1 descending; backward: the reverse), n rows advance at t, and t's rows start at row0 of
// the row-major outputs (t·B padded; the exclusive cumulative sum of batch_sizes packed).
struct SeqGeometry {
  int T = 0, B = 0;
  bool packed = false;
  const int64_t* sizes = nullptr;    // device, packed only
  const int64_t* offsets = nullptr;  // device, packed only

  __device__ __forceinline__ void step(int s, int d, bool backward, int& t, int& n, int64_t& row0) const {
    const bool ascending = (d == 0) != backward;
    t = ascending ? s : T - 1 - s;
    n = packed ? static_cast<int>(sizes[t]) : B;
    row0 = packed ? offsets[t] : static_cast<int64_t>(t) * B;
  }
};

// One unit j of one row of a layer step, forward (both paths): a_g = x[g] + p[g] with x the gates_x side (with b_hh;
// GRU's n: gates_x alone) and p the product side (GRU's n: b_hn + W_hn·h), then the cell math; the workspace columns
// of the unit are written when w (the row's workspace) is given. c: LSTM's cell state, updated. Returns h' (LSTM: m).
template <Kind K>
__device__ __forceinline__ float layer_unit_fwd(const float x[4], const float p[4], float& c, float h_prev, bool relu,
                                                float* w, int H, int j, bool proj) {
  if constexpr (K == Kind::lstm) {
    float a[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) a[g] = x[g] + p[g];
    float c_new, m;
    lstm_update(a[0], a[1], a[2], a[3], c, c_new, m);
    if (w != nullptr) {
#pragma unroll
      for (int g = 0; g < 4; ++g) w[g * H + j] = a[g];
      w[4 * H + j] = c_new;
      w[5 * H + j] = c;
      if (proj) w[6 * H + j] = m;
    }
    c = c_new;
    return m;
  } else if constexpr (K == Kind::gru) {
    const float a_r = x[0] + p[0], a_z = x[1] + p[1], hn = p[2];
    float a_n;
    const float h_new = gru_update(a_r, a_z, x[2], hn, h_prev, a_n);
    if (w != nullptr) {
      w[j] = a_r;
      w[H + j] = a_z;
      w[2 * H + j] = a_n;
      w[3 * H + j] = hn;
    }
    return h_new;
  } else {
    const float a = x[0] + p[0];
    if (w != nullptr) w[j] = a;
    return rnn_activation(a, relu);
  }
}

// One unit j of one row of a layer step, backward (both paths), from the row's workspace w: da (input side) and dah
// (hidden side; they differ in GRU's n) given dm = dL/dm (LSTM) or dL/dh of the step. dc: LSTM's carried dL/dc',
// replaced by dL/dc. Returns GRU's direct part dm·z of dL/dh (h' = … + z·h), else 0.
template <Kind K>
__device__ __forceinline__ float layer_unit_bwd(const float* w, int H, int j, float dm, float& dc, bool relu,
                                                float da[4], float dah[4]) {
  w += j;
  if constexpr (K == Kind::lstm) {
    dc = lstm_gate_grads(w[0], w[H], w[2 * H], w[3 * H], w[4 * H], w[5 * H], dm, dc, da);
#pragma unroll
    for (int g = 0; g < 4; ++g) dah[g] = da[g];
    return 0.0f;
  } else if constexpr (K == Kind::gru) {
    float da_hn;
    const float z = gru_gate_grads(w[0], w[H], w[2 * H], w[3 * H], w[4 * H], dm, da, da_hn);
    dah[0] = da[0];
    dah[1] = da[1];
    dah[2] = da_hn;
    return dm * z;
  } else {
    da[0] = dah[0] = rnn_gate_grad(w[0], dm, relu);
    return 0.0f;
  }
}

// The slice of a layer one block of a persistent launch owns: `units` hidden units of every gate (and their c), and,
// with a projection, `pu` of the P output columns; nb blocks per direction.
struct Slicing {
  int units = 0, pu = 0, nb = 0;
};

template <typename T>
struct SeqFwdArgs {
  SeqGeometry geo;
  Slicing sl;
  int H = 0, HO = 0, P = 0, D = 0;
  bool save = false, relu = false;
  const T* gx = nullptr;  // (T, B, D·G) any strides, or packed (N, D·G): s_gb is then the row stride
  int64_t s_gt = 0, s_gb = 0, s_gc = 0;
  const T *h0 = nullptr, *c0 = nullptr;  // contiguous (D, B, HO), (D, B, H)
  const T* w_hh = nullptr;               // (D, G, HO)
  int64_t s_wd = 0, s_wr = 0, s_wc = 0;
  const T* b_hh = nullptr;  // (D, G) or null
  int64_t s_bd = 0, s_bc = 0;
  const T* w_hr = nullptr;  // (D, P, H) or null
  int64_t s_rd = 0, s_rr = 0, s_rc = 0;
  T *out = nullptr, *h_n = nullptr, *c_n = nullptr;  // contiguous (rows, D·HO), (D, B, HO), (D, B, H)
  float* ws = nullptr;                               // (D, rows, W) float32 when saving
  int64_t rows = 0;
  int W = 0;
  T* h_ex = nullptr;  // the state every block reads: [2][D][B][HO], ping-pong between steps
  T* m_ex = nullptr;  // with a projection: m = o·tanh(c') [D][B][H]
};

template <typename T>
struct SeqBwdArgs {
  SeqGeometry geo;
  Slicing sl;
  int H = 0, HO = 0, P = 0, D = 0;
  bool relu = false;
  const T* go = nullptr;  // grad_out: (T, B, D·HO) any strides, or packed (N, D·HO)
  int64_t s_ot = 0, s_ob = 0, s_oc = 0;
  const T *ghn = nullptr, *gcn = nullptr;  // contiguous (D, B, HO), (D, B, H)
  const float* ws = nullptr;               // contiguous (D, rows, W)
  int64_t rows = 0;
  int W = 0;
  const T* w_hh = nullptr;  // (D, G, HO)
  int64_t s_wd = 0, s_wr = 0, s_wc = 0;
  const T* w_hr = nullptr;  // (D, P, H)
  int64_t s_rd = 0, s_rr = 0, s_rc = 0;
  T *dgx = nullptr, *dgh = nullptr;   // contiguous (rows, D·G); dgh == dgx except for GRU
  T *dh0 = nullptr, *dc0 = nullptr;   // contiguous (D, B, HO), (D, B, H)
  float* dht = nullptr;               // with a projection: (D, rows, P) float32
  T* dA_ex = nullptr;                 // hidden-side gate gradients every block reads: [2][D][B][G]
  T* dht_ex = nullptr;                // with a projection: dL/dh of the step [D][B][P]
};

// Shared memory of one block of a persistent launch (bytes from the start of the dynamic buffer), computed the same
// way by the host (plan, launch) and the kernels. Forward: the main slice is W_hh's rows of the block's units
// (G·units × HO), the second W_hr's rows of its projection columns (pu × H). Backward: the main slice is W_hh's
// columns of the block's output columns of dh (units or pu of them, × G·H), the second W_hr's columns of its units
// (units × P). Both stored k-contiguous ([column][k]), zero-padded to whole column tiles and k multiples of 16.
struct SeqSmem {
  int cols = 0, cols_p = 0, kw = 0, kw_p = 0, ldw = 0;  // main slice
  int rcols = 0, rcols_p = 0, kr = 0, kr_p = 0, ldr = 0;  // second slice (projection), absent: 0
  int kc = 0, lda = 0;                                    // the streamed chunk of A
  int hcols = 0, ccols = 0;                               // state columns per row (h or dh; c or dc)
  size_t w = 0, wr = 0, a = 0, part = 0, h = 0, c = 0, bytes = 0;
};

constexpr int kMaxChunk = 256;

template <typename T>
__host__ __device__ inline SeqSmem seq_smem(Kind kind, bool backward, int B, int H, int P, const Slicing& sl) {
  const int ng = kind == Kind::lstm ? 4 : kind == Kind::gru ? 3 : 1;
  const int HO = P > 0 ? P : H;
  SeqSmem s;
  if (!backward) {
    s.cols = ng * sl.units;
    s.kw = HO;
    s.rcols = P > 0 ? sl.pu : 0;
    s.kr = P > 0 ? H : 0;
  } else {
    s.cols = P > 0 ? sl.pu : sl.units;
    s.kw = ng * H;
    s.rcols = P > 0 ? sl.units : 0;
    s.kr = P;
  }
  s.cols_p = padded_cols(s.cols);
  s.kw_p = round_up(s.kw, 16);
  s.ldw = smem_ld<T>(s.kw_p);
  s.rcols_p = padded_cols(s.rcols);
  s.kr_p = round_up(s.kr, 16);
  s.ldr = smem_ld<T>(s.kr_p);
  const int kmax = s.kw_p > s.kr_p ? s.kw_p : s.kr_p;
  s.kc = kmax < kMaxChunk ? kmax : kMaxChunk;
  s.lda = smem_ld<T>(s.kc);
  s.hcols = P > 0 ? sl.pu : sl.units;
  s.ccols = kind == Kind::lstm ? sl.units : 0;
  SmemLayout L;
  s.w = L.take(sizeof(T) * static_cast<size_t>(s.cols_p) * s.ldw);
  s.wr = L.take(sizeof(T) * static_cast<size_t>(s.rcols_p) * s.ldr);
  s.a = L.take(sizeof(T) * static_cast<size_t>(kRows) * s.lda);
  const int part_main = partial_floats<T>(s.cols_p);
  const int part_proj = s.rcols_p > 0 ? partial_floats<T>(s.rcols_p) : 0;
  s.part = L.take(sizeof(float) * static_cast<size_t>(part_main > part_proj ? part_main : part_proj));
  s.h = L.take(sizeof(float) * static_cast<size_t>(B) * s.hcols);
  s.c = L.take(sizeof(float) * static_cast<size_t>(B) * s.ccols);
  s.bytes = L.bytes;
  return s;
}

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

LayerPlan plan_layer(Kind kind, at::ScalarType dtype, bool backward, int D, int B, int H, int P,
                     const DeviceLimits& dev);

// The device's limits for the persistent kernel of (kind, dtype, direction of the pass).
DeviceLimits device_limits(Kind kind, at::ScalarType dtype, bool backward, int device);

// Launch the persistent kernels (rnn_persistent.cu). Return false, with the CUDA error's text in `why`, when the
// cooperative launch is refused (e.g. too many blocks for the device at this moment): the caller falls back.
template <typename T>
bool launch_persistent_fwd(Kind kind, const SeqFwdArgs<T>& args, const LayerPlan& plan, std::string& why);
template <typename T>
bool launch_persistent_bwd(Kind kind, const SeqBwdArgs<T>& args, const LayerPlan& plan, std::string& why);

// The kernel functions, for the occupancy query.
template <typename T>
const void* persistent_kernel(Kind kind, bool backward);

// Sets a persistent kernel's dynamic shared-memory limit to `smem` bytes (the device's most) and its carveout to the
// most shared memory, before the occupancy query and so before any launch.
void prepare_persistent_kernel(const void* kernel, size_t smem);

}  // namespace cuda
}  // namespace fastseq
