// What the CUDA kernels of the recurrent cells and layers share with the host code that launches them: launch
// arguments (plain structs of pointers, sizes and strides), the shapes of the kernels' tiles and shared memory, and
// the launch functions. No ATen here: the .cu files that include it compile in a fraction of the time a .cu file
// including torch's tensor headers takes (nvcc parses every header once per architecture), while the operators
// (*_ops.cpp, compiled once by the host compiler) hold the tensor code.
//
// Files: rnn_cuda.cuh (device code shared by the kernels), rnn_cells.cu, rnn_persistent.cu, rnn_steps.cu (kernels
// and their launch functions), rnn_ops.h, rnn_cells_ops.cpp, rnn_layers_ops.cpp (the torch operators).

#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTSEQ_CUDA_HD __host__ __device__
#define FASTSEQ_CUDA_DEVICE __device__ __forceinline__
#else
#define FASTSEQ_CUDA_HD
#define FASTSEQ_CUDA_DEVICE inline
#endif

namespace fastseq {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16;       // rows of one row pass
constexpr int kMaxFrags = 1;    // accumulator fragments per warp (half): kMaxCols / 16 tiles over 8 warps
constexpr int kMaxCols = 128;   // columns of one block product (float32: a half-warp per 16 columns, 8 warps)
constexpr int kCellCols = 32;   // product columns of a cell block (forward: U units × slots; backward: dx/dh columns)

enum class Kind { lstm, gru, rnn };

FASTSEQ_CUDA_HD constexpr int num_gates(Kind k) { return k == Kind::lstm ? 4 : k == Kind::gru ? 3 : 1; }
inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }
FASTSEQ_CUDA_HD constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// ---------------------------------------------------------------------------------------------------------
// Tiles and shared memory (rnn_cuda.cuh's block product)
// ---------------------------------------------------------------------------------------------------------

// Padded leading dimension (elements) of a shared-memory operand holding `k` columns of T.
template <typename T>
FASTSEQ_CUDA_HD constexpr int smem_ld(int k) {
  return sizeof(T) == 4 ? k + 4 : k + 8;
}

// Columns a product covers: whole column tiles of 16 (half: a WMMA tile; float: a half-warp of lanes).
FASTSEQ_CUDA_HD constexpr int padded_cols(int c) { return (c + 15) / 16 * 16; }

// The k-slices a chunk is split into (see the header comment): a function of the column count alone. float32
// splits each warp's slice between its two half-warps.
template <typename T>
FASTSEQ_CUDA_HD constexpr int k_slices(int cols_padded) {
  const int tiles = cols_padded / 16;
  const int warp_slices = tiles >= kWarps ? 1 : kWarps / tiles;
  return sizeof(T) == 4 ? 2 * warp_slices : warp_slices;
}

// Floats of the partial-sum buffer of a product over `cols_padded` columns.
template <typename T>
FASTSEQ_CUDA_HD constexpr int partial_floats(int cols_padded) {
  return k_slices<T>(cols_padded) * kRows * cols_padded;
}

// Byte offsets of a shared-memory carve-up, each piece aligned to 128 bytes.
struct SmemLayout {
  size_t bytes = 0;
  FASTSEQ_CUDA_HD size_t take(size_t n) {
    const size_t at = bytes;
    bytes = (bytes + n + 127) / 128 * 128;
    return at;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Cells (rnn_cells.cu)
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct CellFwdArgs {
  const T *x, *h, *c, *w_ih, *w_hh, *b_ih, *b_hh;
  T *h_out, *c_out;
  float* ws;
  int B, I, H;
  int64_t s_xb, s_xk, s_hb, s_hk, s_cb, s_ck, s_wir, s_wic, s_whr, s_whc, s_bi, s_bh;
  bool has_state, save, relu;
};

template <typename T>
struct CellBwdArgs {
  const T *dh, *dc, *h, *c, *w_ih, *w_hh;
  const float* ws;
  T *dgx, *dgh, *dx, *dh_prev, *dc_prev;
  int B, I, H, n_x_blocks, n_h_blocks;
  int64_t s_dhb, s_dhk, s_dcb, s_dck, s_hb, s_hk, s_cb, s_ck, s_wir, s_wic, s_whr, s_whc;
  bool has_state, relu;
};

template <typename T>
void launch_cell_fwd(Kind kind, const CellFwdArgs<T>& args, cudaStream_t stream);
template <typename T>
void launch_cell_bwd(Kind kind, const CellBwdArgs<T>& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// Layers: the persistent recurrence (rnn_persistent.cu)
// ---------------------------------------------------------------------------------------------------------

// The time steps of a launch as the kernels see them: step s of direction d is time t (forward: direction 0
// ascending, direction 1 descending; backward: the reverse), n rows advance at t, and t's rows start at row0 of
// the row-major outputs (t·B padded; the exclusive cumulative sum of batch_sizes packed).
struct SeqGeometry {
  int T = 0, B = 0;
  bool packed = false;
  const int64_t* sizes = nullptr;    // device, packed only
  const int64_t* offsets = nullptr;  // device, packed only

  FASTSEQ_CUDA_DEVICE void step(int s, int d, bool backward, int& t, int& n, int64_t& row0) const {
    const bool ascending = (d == 0) != backward;
    t = ascending ? s : T - 1 - s;
    n = packed ? static_cast<int>(sizes[t]) : B;
    row0 = packed ? offsets[t] : static_cast<int64_t>(t) * B;
  }
};

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
FASTSEQ_CUDA_HD inline SeqSmem seq_smem(Kind kind, bool backward, int B, int H, int P, const Slicing& sl) {
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

// The persistent kernels (for the occupancy query), and their cooperative launch: cudaSuccess, or the launch's error
// (cudaErrorCooperativeLaunchTooLarge where the grid cannot be co-resident now).
template <typename T>
const void* persistent_kernel(Kind kind, bool backward);
template <typename T>
cudaError_t launch_persistent_fwd(Kind kind, const SeqFwdArgs<T>& args, int blocks, size_t smem, cudaStream_t stream);
template <typename T>
cudaError_t launch_persistent_bwd(Kind kind, const SeqBwdArgs<T>& args, int blocks, size_t smem, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// Layers: the per-step path's pointwise kernels (rnn_steps.cu)
// ---------------------------------------------------------------------------------------------------------

// One step of one direction, forward: rows b < n, units j < H.
template <typename T>
struct StepFwd {
  int n, H, HO, W;
  int64_t s_out;                // row stride of out (D·HO)
  const float* gh;              // h·W_hhᵀ of the rows that advance, float32 (n, G)
  const T* gx;                  // gates_x of the step and direction: row b at gx + b·s_gb, column c at c·s_gc
  int64_t s_gb, s_gc;
  const T* b_hh;                // this direction's b_hh, stride s_bc, or null
  int64_t s_bc;
  float *h32, *c32;             // float32 state of the direction (B, HO), (B, H)
  T* h_dot;                     // the state rounded to T (the next product's operand), or null for float32
  T* m_dot;                     // with a projection: m rounded to T (float32: the m buffer itself)
  float* ws;                    // the step's workspace rows (W floats each), or null
  T* out;                       // out rows of the step, this direction's columns
  bool relu, proj;
};

// One step of one direction, backward.
template <typename T>
struct StepBwd {
  int n, H, HO, W;
  int64_t s_dg;                 // row stride of dgates (D·G)
  const T* go;                  // grad_out of the step and direction: row b at go + b·s_ob, column c at c·s_oc
  int64_t s_ob, s_oc;
  const float* ws;              // the step's workspace rows
  const float* dm;              // with a projection: dL/dm of the rows, float32 (n, H); else null
  float *dh32, *dc32;           // carried dL/dh (B, HO), dL/dc (B, H)
  T *dgx, *dgh;                 // the step's dgates rows, this direction's columns
  T* dA;                        // hidden-side gate gradients rounded to T (n, G): the product's operand
  bool relu;
};

template <typename T>
void launch_step_fwd(Kind kind, const StepFwd<T>& p, cudaStream_t stream);
// With a projection: h' = m·W_hrᵀ (hp, float32 (n, P)) committed: workspace h_prev, state, its rounded copy, out.
template <typename T>
void launch_step_proj(const StepFwd<T>& p, const float* hp, cudaStream_t stream);
template <typename T>
void launch_step_bwd(Kind kind, const StepBwd<T>& p, cudaStream_t stream);
// With a projection, backward: dh_t = dh + grad_out[t] of the P columns, into dht (float32) and its rounded copy.
template <typename T>
void launch_step_dht(int n, int P, const T* go, int64_t s_ob, int64_t s_oc, const float* dh32, float* dht, T* dht_dot,
                     cudaStream_t stream);

}  // namespace cuda
}  // namespace fastseq
