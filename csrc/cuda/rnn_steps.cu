// The per-step path of the CUDA layers (rnn_layers_ops.cpp runs it where the persistent kernel cannot): the fused
// pointwise kernels of one step of one direction, between the cuBLAS products the host issues.
//
// Forward (step_fwd_kernel): one thread per (row, unit) of the rows that advance: the pre-activations from gates_x,
// b_hh and the product h[:n]·W_hhᵀ (float32, from cuBLAS), the cell math (rnn_cuda.cuh, the persistent kernel's own
// per-unit function), the workspace row, out[t], the float32 state in place and its copy rounded to the product dtype
// (the next product's operand). With a projection it writes m (rounded) instead, and step_proj_kernel commits
// h' = m·W_hrᵀ after the host's product. Backward (step_bwd_kernel): the gate gradients from the workspace, dgates,
// the hidden-side ones rounded for the product dh = dA·W_hh, dc in place, GRU's direct dh·z; step_dht_kernel makes
// dh_t = dh + grad_out[t] for a projection. Every load and store is bounds-checked by the grid-stride loops.

#include "rnn_cuda.cuh"

namespace fastseq {
namespace cuda {
namespace {

int grid_for(int64_t elements) {
  return static_cast<int>(std::min<int64_t>((elements + kThreads - 1) / kThreads, 65535));
}

// ---------------------------------------------------------------------------------------------------------
// The per-step path: pointwise kernels of one step of one direction
// ---------------------------------------------------------------------------------------------------------

template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads) step_fwd_kernel(const StepFwd<T> p) {
  const int64_t total = static_cast<int64_t>(p.n) * p.H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / p.H;
    const int j = static_cast<int>(idx % p.H), H = p.H;
    constexpr int NG = K == Kind::lstm ? 4 : K == Kind::gru ? 3 : 1;
    const float* gh = p.gh + b * NG * H;
    float x[4], prod[4];
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      const float bias = p.b_hh != nullptr ? to_f32(p.b_hh[(g * H + j) * p.s_bc]) : 0.0f;
      const float gate_x = to_f32(p.gx[b * p.s_gb + (g * H + j) * p.s_gc]);
      const bool gru_n = K == Kind::gru && g == 2;  // b_hn belongs to the hidden side: the reset gate scales it
      x[g] = gru_n ? gate_x : gate_x + bias;
      prod[g] = gh[g * H + j] + (gru_n ? bias : 0.0f);
    }
    float* w = p.ws != nullptr ? p.ws + b * p.W : nullptr;
    const float h_prev = p.proj ? 0.0f : p.h32[b * p.HO + j];
    float c = K == Kind::lstm ? p.c32[b * H + j] : 0.0f;
    const float h_new = layer_unit_fwd<K>(x, prod, c, h_prev, p.relu, w, H, j, p.proj);
    if (K == Kind::lstm) p.c32[b * H + j] = c;
    if (p.proj) {  // h' = m·W_hrᵀ: the next product, then step_proj_kernel
      p.m_dot[b * H + j] = from_f32<T>(h_new);
      continue;
    }
    if (w != nullptr) w[p.W - p.HO + j] = h_prev;
    p.h32[b * p.HO + j] = h_new;
    if (p.h_dot != nullptr) p.h_dot[b * p.HO + j] = from_f32<T>(h_new);
    p.out[b * p.s_out + j] = from_f32<T>(h_new);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) step_proj_kernel(const StepFwd<T> p, const float* hp) {
  const int64_t total = static_cast<int64_t>(p.n) * p.HO;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / p.HO;
    const int q = static_cast<int>(idx % p.HO);
    const float h_new = hp[idx];
    if (p.ws != nullptr) p.ws[b * p.W + (p.W - p.HO) + q] = p.h32[b * p.HO + q];
    p.h32[b * p.HO + q] = h_new;
    if (p.h_dot != nullptr) p.h_dot[b * p.HO + q] = from_f32<T>(h_new);
    p.out[b * p.s_out + q] = from_f32<T>(h_new);
  }
}

template <typename T, Kind K>
__global__ void __launch_bounds__(kThreads) step_bwd_kernel(const StepBwd<T> p) {
  const int64_t total = static_cast<int64_t>(p.n) * p.H;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / p.H;
    const int j = static_cast<int>(idx % p.H), H = p.H;
    constexpr int NG = K == Kind::lstm ? 4 : K == Kind::gru ? 3 : 1;
    const float dm = p.dm != nullptr ? p.dm[b * H + j] : p.dh32[b * p.HO + j] + to_f32(p.go[b * p.s_ob + j * p.s_oc]);
    float da[4], dah[4];
    float dc = K == Kind::lstm ? p.dc32[b * H + j] : 0.0f;
    const float direct = layer_unit_bwd<K>(p.ws + b * p.W, H, j, dm, dc, p.relu, da, dah);
    if (K == Kind::lstm) p.dc32[b * H + j] = dc;
    if (K == Kind::gru) p.dh32[b * p.HO + j] = direct;  // the product adds dA_h·W_hh to it
#pragma unroll
    for (int g = 0; g < NG; ++g) {
      p.dgx[b * p.s_dg + g * H + j] = from_f32<T>(da[g]);
      if (K == Kind::gru) p.dgh[b * p.s_dg + g * H + j] = from_f32<T>(dah[g]);
      p.dA[b * NG * H + g * H + j] = from_f32<T>(dah[g]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) step_dht_kernel(int n, int P, const T* go, int64_t s_ob, int64_t s_oc,
                                                            const float* dh32, float* dht, T* dht_dot) {
  const int64_t total = static_cast<int64_t>(n) * P;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = idx / P;
    const int q = static_cast<int>(idx % P);
    const float v = dh32[idx] + to_f32(go[b * s_ob + q * s_oc]);
    dht[idx] = v;
    if (dht_dot != nullptr) dht_dot[idx] = from_f32<T>(v);
  }
}

}  // namespace

template <typename T>
void launch_step_fwd(Kind kind, const StepFwd<T>& p, cudaStream_t stream) {
  const int grid = grid_for(static_cast<int64_t>(p.n) * p.H);
  with_kind(kind, [&](auto k) { step_fwd_kernel<T, decltype(k)::value><<<grid, kThreads, 0, stream>>>(p); });
  check_launch("step_fwd_kernel");
}

template <typename T>
void launch_step_proj(const StepFwd<T>& p, const float* hp, cudaStream_t stream) {
  step_proj_kernel<T><<<grid_for(static_cast<int64_t>(p.n) * p.HO), kThreads, 0, stream>>>(p, hp);
  check_launch("step_proj_kernel");
}

template <typename T>
void launch_step_bwd(Kind kind, const StepBwd<T>& p, cudaStream_t stream) {
  const int grid = grid_for(static_cast<int64_t>(p.n) * p.H);
  with_kind(kind, [&](auto k) { step_bwd_kernel<T, decltype(k)::value><<<grid, kThreads, 0, stream>>>(p); });
  check_launch("step_bwd_kernel");
}

template <typename T>
void launch_step_dht(int n, int P, const T* go, int64_t s_ob, int64_t s_oc, const float* dh32, float* dht, T* dht_dot,
                     cudaStream_t stream) {
  step_dht_kernel<T><<<grid_for(static_cast<int64_t>(n) * P), kThreads, 0, stream>>>(n, P, go, s_ob, s_oc, dh32, dht,
                                                                                      dht_dot);
  check_launch("step_dht_kernel");
}

#define FASTSEQ_INSTANTIATE(T)                                                                                  \
  template void launch_step_fwd<T>(Kind, const StepFwd<T>&, cudaStream_t);                                     \
  template void launch_step_proj<T>(const StepFwd<T>&, const float*, cudaStream_t);                            \
  template void launch_step_bwd<T>(Kind, const StepBwd<T>&, cudaStream_t);                                     \
  template void launch_step_dht<T>(int, int, const T*, int64_t, int64_t, const float*, float*, T*, cudaStream_t);
FASTSEQ_FOR_EACH_DTYPE(FASTSEQ_INSTANTIATE)
#undef FASTSEQ_INSTANTIATE

}  // namespace cuda
}  // namespace fastseq
