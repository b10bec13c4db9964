// The persistent whole-sequence recurrence of one LSTM, GRU or Elman layer (both directions in one launch),
// forward and backward: one cooperative launch per layer, W_hh sharded across the blocks and kept in shared
// memory for every time step, one grid-wide barrier per step (two with an LSTM projection).
//
// Math (fastseq.reference; csrc/cpu/rnn_layers.cpp has the same in plain loops): per direction d and step t,
// a = gates_x[t] + b_hh + h·W_hhᵀ, then the cell update (rnn_cuda.cuh); LSTM with a projection h' = m·W_hrᵀ.
// Packed sequences: only the n = batch_sizes[t] first rows advance at t; the others keep their state.
//
// Blocking. The grid is D·nb blocks of 256 threads (at most 128 registers each, so that two blocks fit an SM where
// their shared memory does); block (d, k) owns `units` hidden units [k·units, …) of every
// gate of direction d (and, with a projection, `pu` of the P output columns). For the forward it keeps, for the
// whole sequence:
//   - in shared memory: its W_hh rows (G·units × H_out, input dtype, k-contiguous, zero-padded), with a projection
//     its W_hr rows (pu × H); the float32 state of its own columns, h (B × units, or B × pu) and c (B × units):
//     no other block reads them, so they never leave the chip;
//   - in global memory (L2): the state every block needs, h rounded to the product dtype, in two buffers
//     h_ex[2][D][B][H_out] ping-ponged between steps (step s reads one and writes the other, so a block that is
//     ahead never overwrites what a slower one still reads; the barrier of step s orders the writes of step s
//     before the reads of step s + 1), and with a projection m_ex[D][B][H].
// Per step and per pass of 16 rows: h_ex rows are streamed through shared memory in chunks of ≤ 256 columns into
// the block product against the resident W_hh slice (rnn_cuda.cuh: WMMA for float16/bfloat16, FMA for float32,
// float32 accumulators), then the pointwise update of the block's units for those rows: out[t], the workspace,
// h_ex[next]. Rows that do not advance copy their state into h_ex[next]. Then grid.sync(). With a projection the
// update writes m to m_ex, a grid barrier, then each block makes its pu columns of h' = m·W_hrᵀ from its W_hr
// rows, and the step's barrier.
//
// Backward (reverse time per direction), block (d, k) owns the same units for the gate gradients and the columns
// [k·units, …) of dh (with a projection the pu columns of dh over P): its W_hh *columns* (own columns × G·H) stay
// in shared memory, dh and dc of its own columns in float32 shared memory. Per step: the gate gradients of its
// units from the workspace (dgates out, and the hidden-side ones into dA_ex[2][D][B][G], rounded to the product
// dtype as the Triton kernels do, ping-ponged), a grid barrier, then dh = dA·W_hh for its columns (+ GRU's direct
// dh·z). With a projection: dh_t = dh + grad_out[t] of its P columns into dht (the caller's dW_hr) and dht_ex, a
// barrier, dm = dh_t·W_hr for its units from its W_hr columns, the gate gradients, a barrier, dh = dA·W_hh.
//
// Barriers: cooperative_groups' grid.sync(), which includes the memory fences that make the writes before it
// visible to every block after it; the exchange buffers are read with ld.global.cg (never the non-coherent
// read-only path). The launch is cooperative (cudaLaunchCooperativeKernel): the driver refuses a grid larger than
// what can be co-resident, so a barrier can never wait for a block that has not started; the host checks the
// occupancy first (rnn_layers_ops.cpp, plan_layer) and falls back to per-step products where it does not fit. Every
// block runs the same number of steps and barriers (no early exit anywhere).

#include "rnn_cuda.cuh"

#include <cooperative_groups.h>

namespace fastseq {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

template <Kind K>
constexpr int gates() {
  return K == Kind::lstm ? 4 : K == Kind::gru ? 3 : 1;
}

// dst[c][k] = src(c, k) for c < cols, k < K; zero in the padding up to cols_p × K_p (the products read it).
template <typename T, typename Src>
__device__ void load_slice(T* dst, int ld, int cols, int cols_p, int K, int K_p, const Src& src) {
  const int64_t total = static_cast<int64_t>(cols_p) * K_p;
  for (int64_t idx = threadIdx.x; idx < total; idx += kThreads) {
    const int c = static_cast<int>(idx / K_p), k = static_cast<int>(idx % K_p);
    dst[c * ld + k] = c < cols && k < K ? src(c, k) : from_f32<T>(0.0f);
  }
}

// The block product of rows [r0, r0 + nr) of a global exchange buffer (row stride ld_src, K columns) against a
// resident slice Wt_s; the partial sums end in part_s, ready after the final barrier.
template <typename T>
__device__ void rows_product(const T* src, int64_t ld_src, int r0, int nr, int K, int K_p, const T* Wt_s, int ldw,
                             int cols_p, T* A_s, int lda, int kc_max, float* part_s) {
  BlockProduct<T> prod;
  prod.init(cols_p);
  for (int k0 = 0; k0 < K_p; k0 += kc_max) {
    const int kc = min(kc_max, K_p - k0);
    __syncthreads();  // A_s and part_s are free
    fill_rows(A_s, lda, nr, k0, kc, K,
              [&](int r, int k) { return load_shared_global(src + static_cast<int64_t>(r0 + r) * ld_src + k); });
    __syncthreads();
    prod.chunk(A_s, lda, Wt_s + k0, ldw, kc, nr);
  }
  prod.store(part_s, cols_p);
  __syncthreads();
}

// The pieces of the dynamic shared memory.
template <typename T>
struct SmemViews {
  T *w, *wr, *a;
  float *part, *h, *c;

  __device__ SmemViews(unsigned char* base, const SeqSmem& s)
      : w(reinterpret_cast<T*>(base + s.w)),
        wr(reinterpret_cast<T*>(base + s.wr)),
        a(reinterpret_cast<T*>(base + s.a)),
        part(reinterpret_cast<float*>(base + s.part)),
        h(reinterpret_cast<float*>(base + s.h)),
        c(reinterpret_cast<float*>(base + s.c)) {}
};

// What one block owns.
struct Owned {
  int d, j0, nu, q0, nq, hc0, nh;

  __device__ Owned(const Slicing& sl, int H, int P) {
    d = blockIdx.x / sl.nb;
    const int blk = blockIdx.x % sl.nb;
    j0 = blk * sl.units;
    nu = min(sl.units, H - j0);
    q0 = blk * sl.pu;
    nq = P > 0 ? max(0, min(sl.pu, P - q0)) : 0;
    hc0 = P > 0 ? q0 : j0;  // own columns of h (dh): units, or projection columns
    nh = P > 0 ? nq : nu;
  }
};

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// The update of row b (of step t), unit u of the block: pre-activations from gates_x, b_hh and the product, the
// cell math, out/workspace/h_ex (m_ex with a projection) written, the own state updated.
template <typename T, Kind K>
__device__ __forceinline__ void fwd_update(const SeqFwdArgs<T>& p, const SeqSmem& S, const SmemViews<T>& v,
                                           const Owned& o, const T* gx_t, float* ws_t, T* out_t, T* h_dst, int r,
                                           int b, int u) {
  constexpr int NG = gates<K>();
  const int H = p.H, U = p.sl.units, j = o.j0 + u;
  const T* gx_b = gx_t + b * p.s_gb;
  float x[4], prod[4];
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    const float bias =
        p.b_hh != nullptr ? to_f32(p.b_hh[o.d * p.s_bd + static_cast<int64_t>(g * H + j) * p.s_bc]) : 0.0f;
    const float gate_x = to_f32(gx_b[static_cast<int64_t>(g * H + j) * p.s_gc]);
    const bool gru_n = K == Kind::gru && g == 2;  // b_hn belongs to the hidden side: the reset gate scales it
    x[g] = gru_n ? gate_x : gate_x + bias;
    prod[g] = product_sum<T>(v.part, S.cols_p, r, g * U + u) + (gru_n ? bias : 0.0f);
  }
  float* w = p.save ? ws_t + static_cast<int64_t>(b) * p.W : nullptr;
  const float h_prev = p.P > 0 ? 0.0f : v.h[b * S.hcols + u];
  float c = K == Kind::lstm ? v.c[b * U + u] : 0.0f;
  const float h_new = layer_unit_fwd<K>(x, prod, c, h_prev, p.relu, w, H, j, p.P > 0);
  if (K == Kind::lstm) v.c[b * U + u] = c;
  if (p.P > 0) {  // h' = m·W_hrᵀ needs every unit of m: the second phase
    p.m_ex[(static_cast<int64_t>(o.d) * p.geo.B + b) * H + j] = from_f32<T>(h_new);
    return;
  }
  if (w != nullptr) w[p.W - p.HO + j] = h_prev;
  v.h[b * S.hcols + u] = h_new;
  const T rounded = from_f32<T>(h_new);
  out_t[static_cast<int64_t>(b) * p.D * p.HO + j] = rounded;
  h_dst[static_cast<int64_t>(b) * p.HO + j] = rounded;
}

// With a projection: h' = m·W_hrᵀ for the block's pu columns, rows < n; the rows that do not advance carry h.
template <typename T>
__device__ void fwd_projection(const SeqFwdArgs<T>& p, const SeqSmem& S, const SmemViews<T>& v, const Owned& o,
                               int n, float* ws_t, T* out_t, T* h_dst) {
  const int B = p.geo.B, HO = p.HO;
  const T* m_src = p.m_ex + static_cast<int64_t>(o.d) * B * p.H;
  if (o.nq > 0) {
    for (int r0 = 0; r0 < n; r0 += kRows) {
      const int nr = min(kRows, n - r0);
      rows_product(m_src, p.H, r0, nr, p.H, S.kr_p, v.wr, S.ldr, S.rcols_p, v.a, S.lda, S.kc, v.part);
      for (int idx = threadIdx.x; idx < kRows * p.sl.pu; idx += kThreads) {
        const int r = idx / p.sl.pu, q = idx % p.sl.pu;
        if (r >= nr || q >= o.nq) continue;
        const int b = r0 + r, col = o.q0 + q;
        const float h_new = product_sum<T>(v.part, S.rcols_p, r, q);
        if (p.save) ws_t[static_cast<int64_t>(b) * p.W + (p.W - HO) + col] = v.h[b * S.hcols + q];
        v.h[b * S.hcols + q] = h_new;
        const T rounded = from_f32<T>(h_new);
        out_t[static_cast<int64_t>(b) * p.D * HO + col] = rounded;
        h_dst[static_cast<int64_t>(b) * HO + col] = rounded;
      }
    }
  }
}

template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads, 2) seq_fwd_persistent(const SeqFwdArgs<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int B = p.geo.B, H = p.H, HO = p.HO, P = p.P, U = p.sl.units;
  const int64_t G = static_cast<int64_t>(gates<K>()) * H;
  const SeqSmem S = seq_smem<T>(K, false, B, H, P, p.sl);
  const SmemViews<T> v(smem, S);
  const Owned o(p.sl, H, P);
  cg::grid_group grid = cg::this_grid();

  const T* w_hh = p.w_hh + o.d * p.s_wd;
  load_slice(v.w, S.ldw, S.cols, S.cols_p, S.kw, S.kw_p, [&](int c, int k) {
    const int g = c / U, u = c % U;
    return u < o.nu ? w_hh[static_cast<int64_t>(g * H + o.j0 + u) * p.s_wr + static_cast<int64_t>(k) * p.s_wc]
                    : from_f32<T>(0.0f);
  });
  if (P > 0) {
    const T* w_hr = p.w_hr + o.d * p.s_rd;
    load_slice(v.wr, S.ldr, S.rcols, S.rcols_p, S.kr, S.kr_p, [&](int c, int k) {
      return c < o.nq ? w_hr[static_cast<int64_t>(o.q0 + c) * p.s_rr + static_cast<int64_t>(k) * p.s_rc]
                      : from_f32<T>(0.0f);
    });
  }
  const int64_t ex_buf = static_cast<int64_t>(p.D) * B * HO;  // elements between the two h_ex buffers
  T* h_ex_d = p.h_ex + static_cast<int64_t>(o.d) * B * HO;
  for (int idx = threadIdx.x; idx < B * o.nh; idx += kThreads) {
    const int b = idx / o.nh, q = idx % o.nh;
    const T h0 = p.h0[(static_cast<int64_t>(o.d) * B + b) * HO + o.hc0 + q];
    v.h[b * S.hcols + q] = to_f32(h0);
    h_ex_d[static_cast<int64_t>(b) * HO + o.hc0 + q] = h0;
  }
  if (K == Kind::lstm) {
    for (int idx = threadIdx.x; idx < B * o.nu; idx += kThreads) {
      const int b = idx / o.nu, u = idx % o.nu;
      v.c[b * U + u] = to_f32(p.c0[(static_cast<int64_t>(o.d) * B + b) * H + o.j0 + u]);
    }
  }
  grid.sync();  // every block's share of h0 is in h_ex[0]; the slices are in shared memory

  for (int s = 0; s < p.geo.T; ++s) {
    int t, n;
    int64_t row0;
    p.geo.step(s, o.d, false, t, n, row0);
    const T* h_src = h_ex_d + (s & 1) * ex_buf;
    T* h_dst = h_ex_d + ((s + 1) & 1) * ex_buf;
    const T* gx_t = p.gx + (p.geo.packed ? row0 * p.s_gb : static_cast<int64_t>(t) * p.s_gt) + o.d * G * p.s_gc;
    float* ws_t = p.save ? p.ws + (static_cast<int64_t>(o.d) * p.rows + row0) * p.W : nullptr;
    T* out_t = p.out + row0 * p.D * HO + static_cast<int64_t>(o.d) * HO;
    for (int r0 = 0; r0 < n; r0 += kRows) {
      const int nr = min(kRows, n - r0);
      rows_product(h_src, HO, r0, nr, HO, S.kw_p, v.w, S.ldw, S.cols_p, v.a, S.lda, S.kc, v.part);
      for (int idx = threadIdx.x; idx < kRows * U; idx += kThreads) {
        const int r = idx / U, u = idx % U;
        if (r < nr && u < o.nu) fwd_update<T, K>(p, S, v, o, gx_t, ws_t, out_t, h_dst, r, r0 + r, u);
      }
    }
    if (P > 0) {
      grid.sync();  // m of every unit is in m_ex
      fwd_projection(p, S, v, o, n, ws_t, out_t, h_dst);
    }
    // Rows that do not advance at t carry their state into the next buffer (rows < n were written above).
    for (int idx = threadIdx.x; idx < (B - n) * o.nh; idx += kThreads) {
      const int b = n + idx / o.nh, q = idx % o.nh;
      h_dst[static_cast<int64_t>(b) * HO + o.hc0 + q] = from_f32<T>(v.h[b * S.hcols + q]);
    }
    grid.sync();  // h' of every block is in h_ex[next]
  }

  for (int idx = threadIdx.x; idx < B * o.nh; idx += kThreads) {
    const int b = idx / o.nh, q = idx % o.nh;
    p.h_n[(static_cast<int64_t>(o.d) * B + b) * HO + o.hc0 + q] = from_f32<T>(v.h[b * S.hcols + q]);
  }
  if (K == Kind::lstm) {
    for (int idx = threadIdx.x; idx < B * o.nu; idx += kThreads) {
      const int b = idx / o.nu, u = idx % o.nu;
      p.c_n[(static_cast<int64_t>(o.d) * B + b) * H + o.j0 + u] = from_f32<T>(v.c[b * U + u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

// The gate gradients of row b (step t), unit u, given dL/dm (LSTM) or dL/dh of the step (GRU, RNN): written to
// dgates (and GRU's dgates_h), their hidden-side values to dA_ex; dc updated; GRU's direct part dh·z into dh.
template <typename T, Kind K>
__device__ __forceinline__ void bwd_gate_grads(const SeqBwdArgs<T>& p, const SeqSmem& S, const SmemViews<T>& v,
                                               const Owned& o, const float* ws_t, T* dgx_t, T* dgh_t, T* dA_t,
                                               int b, int u, float dm) {
  constexpr int NG = gates<K>();
  const int H = p.H, U = p.sl.units, j = o.j0 + u;
  const int64_t G = static_cast<int64_t>(NG) * H, s_dg = p.D * G;
  float da[4], dah[4];
  float dc = K == Kind::lstm ? v.c[b * U + u] : 0.0f;
  const float direct = layer_unit_bwd<K>(ws_t + static_cast<int64_t>(b) * p.W, H, j, dm, dc, p.relu, da, dah);
  if (K == Kind::lstm) v.c[b * U + u] = dc;
  if (K == Kind::gru) v.h[b * S.hcols + u] = direct;  // the product adds dA_h·W_hh to it
#pragma unroll
  for (int g = 0; g < NG; ++g) {
    dgx_t[b * s_dg + g * H + j] = from_f32<T>(da[g]);
    const T hidden = from_f32<T>(dah[g]);
    if (K == Kind::gru) dgh_t[b * s_dg + g * H + j] = hidden;
    dA_t[b * G + g * H + j] = hidden;
  }
}

// dh = dA·W_hh for the block's columns of dh, rows < n (GRU: added to the direct part already there).
template <typename T, Kind K>
__device__ void bwd_hidden_product(const SeqBwdArgs<T>& p, const SeqSmem& S, const SmemViews<T>& v,
                                   const Owned& o, const T* dA_t, int n) {
  const int G = gates<K>() * p.H;
  for (int r0 = 0; r0 < n; r0 += kRows) {
    const int nr = min(kRows, n - r0);
    rows_product(dA_t, G, r0, nr, G, S.kw_p, v.w, S.ldw, S.cols_p, v.a, S.lda, S.kc, v.part);
    for (int idx = threadIdx.x; idx < kRows * S.hcols; idx += kThreads) {
      const int r = idx / S.hcols, q = idx % S.hcols;
      if (r >= nr || q >= o.nh) continue;
      const int b = r0 + r;
      const float dh = product_sum<T>(v.part, S.cols_p, r, q);
      v.h[b * S.hcols + q] = K == Kind::gru ? v.h[b * S.hcols + q] + dh : dh;
    }
  }
  __syncthreads();  // the next step's pointwise reads dh of every own column
}

template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads, 2) seq_bwd_persistent(const SeqBwdArgs<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int B = p.geo.B, H = p.H, HO = p.HO, P = p.P, U = p.sl.units;
  const int64_t G = static_cast<int64_t>(gates<K>()) * H;
  const SeqSmem S = seq_smem<T>(K, true, B, H, P, p.sl);
  const SmemViews<T> v(smem, S);
  const Owned o(p.sl, H, P);
  cg::grid_group grid = cg::this_grid();

  const T* w_hh = p.w_hh + o.d * p.s_wd;
  load_slice(v.w, S.ldw, S.cols, S.cols_p, S.kw, S.kw_p, [&](int c, int i) {  // W_hh[i][own column c]
    return c < o.nh ? w_hh[static_cast<int64_t>(i) * p.s_wr + static_cast<int64_t>(o.hc0 + c) * p.s_wc]
                    : from_f32<T>(0.0f);
  });
  if (P > 0) {
    const T* w_hr = p.w_hr + o.d * p.s_rd;
    load_slice(v.wr, S.ldr, S.rcols, S.rcols_p, S.kr, S.kr_p, [&](int u, int q) {  // W_hr[q][own unit u]
      return u < o.nu ? w_hr[static_cast<int64_t>(q) * p.s_rr + static_cast<int64_t>(o.j0 + u) * p.s_rc]
                      : from_f32<T>(0.0f);
    });
  }
  for (int idx = threadIdx.x; idx < B * o.nh; idx += kThreads) {
    const int b = idx / o.nh, q = idx % o.nh;
    v.h[b * S.hcols + q] = to_f32(p.ghn[(static_cast<int64_t>(o.d) * B + b) * HO + o.hc0 + q]);
  }
  if (K == Kind::lstm) {
    for (int idx = threadIdx.x; idx < B * o.nu; idx += kThreads) {
      const int b = idx / o.nu, u = idx % o.nu;
      v.c[b * U + u] = to_f32(p.gcn[(static_cast<int64_t>(o.d) * B + b) * H + o.j0 + u]);
    }
  }
  __syncthreads();

  const int64_t s_dg = p.D * G;
  for (int s = 0; s < p.geo.T; ++s) {
    int t, n;
    int64_t row0;
    p.geo.step(s, o.d, true, t, n, row0);
    T* dA_t = p.dA_ex + ((s & 1) * static_cast<int64_t>(p.D) + o.d) * B * G;
    const T* go_t = p.go + (p.geo.packed ? row0 * p.s_ob : static_cast<int64_t>(t) * p.s_ot) + o.d * HO * p.s_oc;
    const float* ws_t = p.ws + (static_cast<int64_t>(o.d) * p.rows + row0) * p.W;
    T* dgx_t = p.dgx + row0 * s_dg + o.d * G;
    T* dgh_t = p.dgh + row0 * s_dg + o.d * G;
    if (P == 0) {
      for (int idx = threadIdx.x; idx < n * o.nu; idx += kThreads) {
        const int b = idx / o.nu, u = idx % o.nu;
        const float dm = v.h[b * S.hcols + u] + to_f32(go_t[b * p.s_ob + static_cast<int64_t>(o.j0 + u) * p.s_oc]);
        bwd_gate_grads<T, K>(p, S, v, o, ws_t, dgx_t, dgh_t, dA_t, b, u, dm);
      }
      grid.sync();  // dA of every unit is in dA_ex
      bwd_hidden_product<T, K>(p, S, v, o, dA_t, n);
    } else {
      // dh_t = dh + grad_out[t] of the own P columns: the caller's dW_hr reads it; every block needs all of it.
      T* dht_ex = p.dht_ex + static_cast<int64_t>(o.d) * B * P;
      for (int idx = threadIdx.x; idx < n * o.nq; idx += kThreads) {
        const int b = idx / o.nq, q = idx % o.nq, col = o.q0 + q;
        const float dh_t = v.h[b * S.hcols + q] + to_f32(go_t[b * p.s_ob + static_cast<int64_t>(col) * p.s_oc]);
        p.dht[(static_cast<int64_t>(o.d) * p.rows + row0 + b) * P + col] = dh_t;
        dht_ex[static_cast<int64_t>(b) * P + col] = from_f32<T>(dh_t);
      }
      grid.sync();  // dh_t of every column is in dht_ex
      for (int r0 = 0; r0 < n; r0 += kRows) {  // dm = dh_t·W_hr for the own units, then the gate gradients
        const int nr = min(kRows, n - r0);
        rows_product(static_cast<const T*>(dht_ex), P, r0, nr, P, S.kr_p, v.wr, S.ldr, S.rcols_p, v.a, S.lda, S.kc,
                     v.part);
        for (int idx = threadIdx.x; idx < kRows * U; idx += kThreads) {
          const int r = idx / U, u = idx % U;
          if (r >= nr || u >= o.nu) continue;
          const float dm = product_sum<T>(v.part, S.rcols_p, r, u);
          bwd_gate_grads<T, K>(p, S, v, o, ws_t, dgx_t, dgh_t, dA_t, r0 + r, u, dm);
        }
      }
      grid.sync();  // dA of every unit is in dA_ex
      bwd_hidden_product<T, K>(p, S, v, o, dA_t, n);
    }
  }

  for (int idx = threadIdx.x; idx < B * o.nh; idx += kThreads) {
    const int b = idx / o.nh, q = idx % o.nh;
    p.dh0[(static_cast<int64_t>(o.d) * B + b) * HO + o.hc0 + q] = from_f32<T>(v.h[b * S.hcols + q]);
  }
  if (K == Kind::lstm) {
    for (int idx = threadIdx.x; idx < B * o.nu; idx += kThreads) {
      const int b = idx / o.nu, u = idx % o.nu;
      p.dc0[(static_cast<int64_t>(o.d) * B + b) * H + o.j0 + u] = from_f32<T>(v.c[b * U + u]);
    }
  }
}

}  // namespace

template <typename T>
const void* persistent_kernel(Kind kind, bool backward) {
  const void* kernel = nullptr;
  with_kind(kind, [&](auto k) {
    constexpr Kind K = decltype(k)::value;
    kernel = backward ? reinterpret_cast<const void*>(&seq_bwd_persistent<T, K>)
                      : reinterpret_cast<const void*>(&seq_fwd_persistent<T, K>);
  });
  return kernel;
}

// The plan (rnn_layers_ops.cpp) has raised the kernels' dynamic shared-memory limit to the device's, once.
template <typename T, typename Args>
cudaError_t cooperative_launch(const void* kernel, const Args& args, int blocks, size_t smem, cudaStream_t stream) {
  void* params[] = {const_cast<Args*>(&args)};
  return cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kThreads), params, smem, stream);
}

template <typename T>
cudaError_t launch_persistent_fwd(Kind kind, const SeqFwdArgs<T>& args, int blocks, size_t smem, cudaStream_t stream) {
  return cooperative_launch<T>(persistent_kernel<T>(kind, false), args, blocks, smem, stream);
}

template <typename T>
cudaError_t launch_persistent_bwd(Kind kind, const SeqBwdArgs<T>& args, int blocks, size_t smem, cudaStream_t stream) {
  return cooperative_launch<T>(persistent_kernel<T>(kind, true), args, blocks, smem, stream);
}

#define FASTSEQ_INSTANTIATE(T)                                                                                   \
  template const void* persistent_kernel<T>(Kind, bool);                                                        \
  template cudaError_t launch_persistent_fwd<T>(Kind, const SeqFwdArgs<T>&, int, size_t, cudaStream_t);         \
  template cudaError_t launch_persistent_bwd<T>(Kind, const SeqBwdArgs<T>&, int, size_t, cudaStream_t);
FASTSEQ_FOR_EACH_DTYPE(FASTSEQ_INSTANTIATE)
#undef FASTSEQ_INSTANTIATE

}  // namespace cuda
}  // namespace fastseq
