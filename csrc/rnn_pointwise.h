// The gate math of the recurrent cells, in float32, shared by the C++ CPU kernels (csrc/cpu/) and the CUDA kernels
// (csrc/cuda/): the same functions compiled for the host (vectorised by GCC in the CPU kernels' per-unit loops) and
// for the device (nvcc), so that both backends round alike and a workspace written by one reads the same in the
// other.
//
// Every gate nonlinearity and its slope is computed from the float32 *pre-activation*, as the Triton kernels do
// (kernels/rnn_cell.py): σ(a) and σ'(a) = e/(1 + e)² with e = exp(−|a|), tanh'(a) = 4e/(1 + e)² with
// e = exp(−2|a|), so there is no cancellation of 1 − y² or σ(1 − σ) near saturation; tanh is Cephes' odd
// polynomial for |x| < 0.625 and 1 − 2/(e^{2|x|} + 1) beyond (the Triton kernels' formula). exp is Cephes' expf
// (range reduction by ln 2, a degree-5 polynomial, ~1 ulp), written without calls or branches (selects only: with
// -fno-trapping-math, see setup.py, they stay selects on the host) so that the CPU per-unit loops vectorise; it
// flushes results below 2⁻¹²⁶ to 0 and keeps NaN and ±inf. Measured against float64 (host): exp ≤ 1.4 ulp,
// tanh ≤ 2.3 ulp, σ ≤ 3.3 ulp, σ' and tanh' ≤ 5.3 ulp. The device code is compiled without --use_fast_math, so
// these are the same IEEE float32 operations there (nvcc contracts a·b + c into FMAs, as GCC may on the host:
// the results may differ in the last bit, not more).

#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// FASTSEQ_HD: callable from host and device code. FASTSEQ_INLINE: must inline into the CPU kernels' per-unit
// loops, or they do not vectorise.
#if defined(__CUDACC__)
#define FASTSEQ_HD __host__ __device__
#else
#define FASTSEQ_HD
#endif
#if defined(__GNUC__) || defined(__clang__)
#define FASTSEQ_INLINE inline __attribute__((always_inline))
#else
#define FASTSEQ_INLINE __forceinline
#endif

namespace fastseq {

FASTSEQ_HD FASTSEQ_INLINE float bits_as_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

FASTSEQ_HD FASTSEQ_INLINE float abs_f32(float x) {
#if defined(__CUDA_ARCH__)
  return fabsf(x);
#else
  return std::fabs(x);
#endif
}

// e^x. Cephes' expf: x = n·ln2 + r with |r| ≤ ln2/2, e^r ≈ 1 + r + r²·p(r), times 2^n built in the exponent
// bits. Below ln(2⁻¹²⁶) the result is 0; above ln(FLT_MAX) it is +inf; NaN stays NaN.
FASTSEQ_HD FASTSEQ_INLINE float exp_f32(float x) {
  const float hi = 88.72283935546875f;
  const float lo = -87.33654785156250f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  xc = x == x ? xc : 0.0f;  // NaN: a harmless argument here, NaN restored below
  float fx = xc * 1.44269504088896341f;
  fx = (fx + 12582912.0f) - 12582912.0f;  // round to nearest integer (|fx| < 2²²)
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t n = static_cast<int32_t>(fx);  // in [-126, 128]; 128 gives the bits of +inf
  const float y = p * bits_as_float(static_cast<uint32_t>(n + 127) << 23);
  float out = x < lo ? 0.0f : y;
  out = x > hi ? bits_as_float(0x7f800000u) : out;  // +inf
  return x == x ? out : x;
}

// σ(a) and σ'(a) = e/(1 + e)², e = exp(−|a|): no overflow, no cancellation near saturation.
FASTSEQ_HD FASTSEQ_INLINE void sigmoid_and_grad(float a, float& s, float& ds) {
  const float e = exp_f32(-abs_f32(a));
  const float d = 1.0f / (1.0f + e);
  const float ed = e * d;  // both sides computed: a select, not a branch, so the loops vectorise
  s = a >= 0.0f ? d : ed;
  ds = ed * d;
}

FASTSEQ_HD FASTSEQ_INLINE float sigmoid_f32(float a) {
  const float e = exp_f32(-abs_f32(a));
  const float d = 1.0f / (1.0f + e);
  const float ed = e * d;
  return a >= 0.0f ? d : ed;
}

// tanh'(a) = 4e/(1 + e)², e = exp(−2|a|): exact to rounding even where tanh(a) ≈ ±1.
FASTSEQ_HD FASTSEQ_INLINE float tanh_grad_f32(float a) {
  const float e = exp_f32(-2.0f * abs_f32(a));
  const float d = 1.0f / (1.0f + e);
  return 4.0f * e * d * d;
}

// tanh: |x| < 0.625 an odd minimax polynomial (Cephes' tanhf, ~1 ulp); beyond 1 − 2/(e^{2|x|} + 1), which
// neither overflows nor cancels badly. NaN falls through both branches.
FASTSEQ_HD FASTSEQ_INLINE float tanh_f32(float x) {
  const float ax = abs_f32(x);
  const float z = ax * ax;
  const float p = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
                    1.33314422036e-1f) * z - 3.33332819422e-1f);
  const float small = ax + ax * z * p;
  const float big = 1.0f - 2.0f / (exp_f32(2.0f * ax) + 1.0f);
  const float t = ax < 0.625f ? small : big;
  return x < 0.0f ? -t : t;
}

// torch.relu: NaN propagates (not std::max).
FASTSEQ_HD FASTSEQ_INLINE float relu_f32(float a) { return a < 0.0f ? 0.0f : a; }

}  // namespace fastseq
