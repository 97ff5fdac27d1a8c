// The PLIF math, written once for every backend.
//
// The per-neuron functions (charge, fire, reset, surrogates) are scalar. The scans apply them
// to LANES neurons at a time (a compile-time width): the CPU kernel uses a wide block whose
// per-step loop vectorises, the GPU kernels one neuron per thread.
//
// A scan's SURROGATE parameter says what is fixed at compile time. kRuntime reads `spiking`
// and the surrogate from Options at every neuron: uniform branches, right for a GPU warp and
// the only mode the GPU kernels use. 0..6 (a SurrogateId) fixes spiking mode with that
// surrogate, and kSpikingForward fixes spiking mode for a forward (which needs no surrogate):
// branch-free loops that a CPU compiler vectorises. Every mode computes the same expressions.
//
// The arithmetic order follows plif_cuda/reference.py exactly, and every backend is built
// without floating-point contraction, so spikes equal the reference's bit for bit.
#pragma once

#include "plif_params.h"

// For the host branches below, which nvcc's host pass compiles too; NVRTC has no standard
// headers and takes the device branches only.
#if !defined(__CUDACC_RTC__)
#include <cmath>
#include <cstdint>
#include <cstring>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PLIF_HD __host__ __device__ __forceinline__
#else
// Forced inlining on the host: the CPU kernel compiles one copy of each scan per instruction
// set (target_clones), and the scans must be inlined into those copies to be vectorised for them.
#if defined(__GNUC__)
#define PLIF_HD inline __attribute__((always_inline))
#else
#define PLIF_HD inline
#endif
#endif

namespace plif {

// ---- scalar helpers, one overload per compute type -------------------------------------
// exp_nonpositive_(x) is exp(x) for x <= 0 (or NaN), the only arguments the PLIF math has: the
// surrogate derivatives and the smooth firing functions are written in exp(-|.|).
#if defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__)
PLIF_HD float exp_nonpositive_(float x) { return ::expf(x); }
PLIF_HD float exp_of_negative_product_(float a, float y) { return ::expf(-a * y); }
#else
// expf that a compiler can vectorise (libm's expf is a call, and GCC maps it to a vector
// version only under -ffast-math, which would also reorder the spike arithmetic). Cephes'
// range reduction and a degree-6 polynomial: relative error within 1.2e-7 over the whole
// range, gradual underflow to 0, NaN propagated. Never used in the spiking forward, so spikes
// stay bit-exact. Written with one compare and select, at the end, off the chain of dependent
// operations that the backward waits on: below -104 (where the result rounds to 0) n + 151
// leaves its bits and the scale is garbage, so such lanes are replaced by 0 after the product.
// Its multiply-adds are explicit fused ones (std::fma: one rounding, so the same bits on every
// CPU; a call on one without FMA instructions), which shortens the chain too.
// n = x / ln 2 rounded to nearest comes from the sum x / ln 2 + 1.5 * 2^23 + 151 (the shifter),
// which holds n + 151 (1 to 151 for x >= -104) in its low mantissa bits; shifted into the
// exponent field they make 2^(n + 24), a normal number for every n from -150 to 0.
constexpr float kExpShifter = 12583063.0f;
constexpr float kLog2e = 1.44269504088896341f;

// exp(x) from x and that sum. A NaN stays NaN through n, r and p, and fails the final comparison.
PLIF_HD float exp_from_shifted_(float x, float shifted) {
  const float n = shifted - kExpShifter;
  const float r = std::fma(n, 2.12194440e-4f, std::fma(n, -0.693359375f, x));
  // exp(r) on |r| <= ln 2 / 2 as 1 + r + r^2 q(r), q a minimax quartic (relative error 3e-9
  // before rounding; benchmarks/NOTES.md), in Estrin's order. Every coefficient is
  // times 2^-24 (exact: a power of two, far from underflow), so that one product with
  // 2^(n + 24) gives the result, rounded once where it is subnormal. Measured over every
  // x <= 0: relative error <= 1.2e-7 (Cephes' degree-7 polynomial: 8.7e-8, two operations
  // more), subnormal results within 0.81 ulp.
  constexpr float two_to_minus_24 = 5.9604644775390625e-8f;
  const float r2 = r * r;
  const float lower = std::fma(1.6666520689e-01f * two_to_minus_24, r, 4.9999993452e-01f * two_to_minus_24);
  const float upper = std::fma(8.3687099613e-03f * two_to_minus_24, r, 4.1668387374e-02f * two_to_minus_24);
  const float q = std::fma(std::fma(1.3814613093e-03f * two_to_minus_24, r2, upper), r2, lower);
  const float p = std::fma(q, r2, std::fma(r, two_to_minus_24, two_to_minus_24));
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &shifted, sizeof(float));
  scale_bits <<= 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(float));
  const float e = p * scale;
  return x < -104.0f ? 0.0f : e;
}
PLIF_HD float exp_nonpositive_(float x) { return exp_from_shifted_(x, std::fma(x, kLog2e, kExpShifter)); }
// exp(-(a y)), a y >= 0 (or NaN), the product rounded first as everywhere else. The sum is
// taken from y and -a / ln 2 (uniform, so computed once per loop), beside the product rather
// than after it: a multiply's latency off the longest chain of the CPU backward, which that
// chain's length bounds (benchmarks/NOTES.md, "What bounds the backward's lanes loop"). n may
// differ by one where -a y / ln 2 is within a rounding of a half-integer; |r| then exceeds
// ln 2 / 2 by about that rounding, where the polynomial is as exact, and below -104 the result is
// 0 either way.
PLIF_HD float exp_of_negative_product_(float a, float y) {
  return exp_from_shifted_(-a * y, std::fma(y, -a * kLog2e, kExpShifter));
}
#endif
PLIF_HD double exp_nonpositive_(double x) { return ::exp(x); }
PLIF_HD double exp_of_negative_product_(double a, double y) { return ::exp(-a * y); }
PLIF_HD float atan_(float x) { return ::atanf(x); }
PLIF_HD double atan_(double x) { return ::atan(x); }
PLIF_HD float erfc_(float x) { return ::erfcf(x); }
PLIF_HD double erfc_(double x) { return ::erfc(x); }
PLIF_HD float abs_(float x) { return ::fabsf(x); }
PLIF_HD double abs_(double x) { return ::fabs(x); }
// a * b + c rounded once. The backward's sums are written with it: fewer operations per
// neuron-step, and no less exact; the forward never uses it (spikes follow the reference's
// separately rounded operations).
PLIF_HD float fma_(float a, float b, float c) { return ::fmaf(a, b, c); }
PLIF_HD double fma_(double a, double b, double c) { return ::fma(a, b, c); }

// A select on a uniform flag (an option). On the host it is written as bit operations: GCC 12
// does not vectorise `flag ? a : b` with a scalar bool condition inside a loop, while this form
// vectorises and picks the same bits.
#if defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__)
template <typename acc_t>
PLIF_HD acc_t pick(bool flag, acc_t a, acc_t b) {
  return flag ? a : b;
}
#else
template <typename acc_t, typename bits_t>
PLIF_HD acc_t pick_bits(bool flag, acc_t a, acc_t b) {
  static_assert(sizeof(acc_t) == sizeof(bits_t), "pick_bits needs a same-size integer");
  const bits_t mask = flag ? ~bits_t(0) : bits_t(0);
  bits_t bits_a, bits_b;
  std::memcpy(&bits_a, &a, sizeof(acc_t));
  std::memcpy(&bits_b, &b, sizeof(acc_t));
  const bits_t picked = (bits_a & mask) | (bits_b & ~mask);
  acc_t out;
  std::memcpy(&out, &picked, sizeof(acc_t));
  return out;
}
PLIF_HD float pick(bool flag, float a, float b) { return pick_bits<float, uint32_t>(flag, a, b); }
PLIF_HD double pick(bool flag, double a, double b) { return pick_bits<double, uint64_t>(flag, a, b); }
#endif

template <typename acc_t>
struct Constants {
  static constexpr acc_t pi = acc_t(3.14159265358979323846);
  static constexpr acc_t inv_sqrt_pi = acc_t(0.56418958354775628695);
};

// ---- compile-time modes of a scan ---------------------------------------------------------
// Enumerators, not constexpr variables: a namespace-scope variable is emitted into the device
// code under a per-compilation hashed name, which would make NVRTC's output differ run to run.
enum ScanMode : int { kRuntime = -1, kSpikingForward = 7 };

// ---- surrogates (x = H - V_th) -----------------------------------------------------------
// Derivative column of the spec table.
template <int SURROGATE, typename acc_t>
PLIF_HD acc_t surrogate_grad_of(acc_t x, acc_t a) {
  if constexpr (SURROGATE == kSigmoid) {
    // alpha s (1 - s) with s = sigmoid(alpha x) equals alpha e / (1 + e)^2 with e = exp(-alpha |x|)
    // (the derivative is even), which does not cancel in 1 - s where |x| is large.
    const acc_t e = exp_of_negative_product_(a, abs_(x));
    const acc_t one_plus_e = acc_t(1) + e;
    return a * e / (one_plus_e * one_plus_e);
  } else if constexpr (SURROGATE == kAtan) {
    const acc_t u = Constants<acc_t>::pi / acc_t(2) * a * x;
    return (a / acc_t(2)) / (acc_t(1) + u * u);
  } else if constexpr (SURROGATE == kPiecewiseQuadratic) {
    // max(0, g) that keeps a NaN (as the reference's clamp does): NaN < 0 is false.
    const acc_t g = a - a * a * abs_(x);
    return g < acc_t(0) ? acc_t(0) : g;
  } else if constexpr (SURROGATE == kPiecewiseExp) {
    return (a / acc_t(2)) * exp_of_negative_product_(a, abs_(x));
  } else if constexpr (SURROGATE == kSoftSign) {
    const acc_t d = acc_t(1) / a + abs_(x);
    return acc_t(1) / (acc_t(2) * a * d * d);
  } else if constexpr (SURROGATE == kSuperSpike) {
    const acc_t d = acc_t(1) + abs_(x);
    return a / (d * d);
  } else {
    static_assert(SURROGATE == kErf, "surrogate_grad_of needs a SurrogateId");
    const acc_t u = a * x;
    return a * Constants<acc_t>::inv_sqrt_pi * exp_nonpositive_(-(u * u));
  }
}

template <int SURROGATE, typename acc_t>
PLIF_HD acc_t surrogate_grad(acc_t x, const Options<acc_t>& o) {
  if constexpr (SURROGATE != kRuntime) {
    return surrogate_grad_of<SURROGATE>(x, o.alpha);
  } else {
    switch (o.surrogate) {
      case kSigmoid: return surrogate_grad_of<kSigmoid>(x, o.alpha);
      case kAtan: return surrogate_grad_of<kAtan>(x, o.alpha);
      case kPiecewiseQuadratic: return surrogate_grad_of<kPiecewiseQuadratic>(x, o.alpha);
      case kPiecewiseExp: return surrogate_grad_of<kPiecewiseExp>(x, o.alpha);
      case kSoftSign: return surrogate_grad_of<kSoftSign>(x, o.alpha);
      case kSuperSpike: return surrogate_grad_of<kSuperSpike>(x, o.alpha);
      default: return surrogate_grad_of<kErf>(x, o.alpha);
    }
  }
}

// Smooth firing function (spiking=False): the primitive of the derivative. SuperSpike has
// none; the Python layer refuses it before any kernel runs.
template <typename acc_t>
PLIF_HD acc_t surrogate_primitive(acc_t x, const Options<acc_t>& o) {
  const acc_t a = o.alpha;
  switch (o.surrogate) {
    case kSigmoid: {
      // 1 / (1 + exp(-a x)), written with exp(-a |x|) <= 1 on both sides of 0.
      const acc_t e = exp_of_negative_product_(a, abs_(x));
      return x < acc_t(0) ? e / (acc_t(1) + e) : acc_t(1) / (acc_t(1) + e);
    }
    case kAtan: return atan_(Constants<acc_t>::pi / acc_t(2) * a * x) / Constants<acc_t>::pi + acc_t(0.5);
    case kPiecewiseQuadratic: {
      const acc_t bound = acc_t(1) / a;
      const acc_t inner = acc_t(-0.5) * a * a * x * abs_(x) + a * x + acc_t(0.5);
      return x > bound ? acc_t(1) : (x < -bound ? acc_t(0) : inner);
    }
    case kPiecewiseExp: {
      const acc_t e = acc_t(0.5) * exp_of_negative_product_(a, abs_(x));
      return x < acc_t(0) ? e : acc_t(1) - e;
    }
    case kSoftSign: {
      const acc_t u = a * x;
      return acc_t(0.5) * (u / (acc_t(1) + abs_(u)) + acc_t(1));
    }
    default:  // kErf (kSuperSpike is refused before launch)
      return acc_t(0.5) * erfc_(-a * x);
  }
}

// ---- one neuron, one time step ----------------------------------------------------------------
// The charge options are selects, not branches: both sides are cheap, and a select keeps the
// CPU loop vectorisable.
template <typename acc_t>
PLIF_HD acc_t charge(acc_t v_prev, acc_t x, acc_t k, const Options<acc_t>& o) {
  const acc_t vr = o.v_reset;
  const acc_t decayed_input = v_prev + k * (x - (v_prev - vr));
  const acc_t plain_input = v_prev - k * (v_prev - vr) + x;
  return pick(o.decay_input, decayed_input, plain_input);
}

template <int SURROGATE, typename acc_t>
PLIF_HD acc_t fire(acc_t h, const Options<acc_t>& o) {
  const acc_t centred = h - o.v_threshold;
  const acc_t step = centred >= acc_t(0) ? acc_t(1) : acc_t(0);
  if constexpr (SURROGATE == kRuntime) {
    return o.spiking ? step : surrogate_primitive(centred, o);
  } else {
    return step;
  }
}

// Literal arithmetic (not a select on the spike), so that inf and NaN propagate as in the
// reference.
template <typename acc_t>
PLIF_HD acc_t reset(acc_t h, acc_t s, const Options<acc_t>& o) {
  const acc_t soft = h - s * o.v_threshold;
  const acc_t hard = s * o.v_reset + (acc_t(1) - s) * h;
  return pick(o.soft_reset, soft, hard);
}

// dV[t]/dH[t] through the reset, from not_spiked = 1 - S[t].
template <typename acc_t>
PLIF_HD acc_t reset_grad(acc_t h, acc_t not_spiked, acc_t sg, const Options<acc_t>& o) {
  const acc_t soft = pick(o.detach_reset, acc_t(1), acc_t(1) - o.v_threshold * sg);
  const acc_t hard = pick(o.detach_reset, not_spiked, fma_(o.v_reset - h, sg, not_spiked));
  return pick(o.soft_reset, soft, hard);
}

// One forward step of one neuron: H[t] into h, V[t-1] in v becomes V[t]; returns S[t].
template <int SURROGATE, typename acc_t>
PLIF_HD acc_t forward_neuron(acc_t& v, acc_t x, acc_t k, const Options<acc_t>& o, acc_t& h) {
  h = charge(v, x, k, o);
  const acc_t s = fire<SURROGATE>(h, o);
  v = reset(h, s, o);
  return s;
}

// dH[t]/dk from V[t-1]: X[t] - (V[t-1] - V_r) under decay_input, else -(V[t-1] - V_r), each exact
// for every k; FROM_X says X[t] is at hand (checkpoints). From every H alone (no X), decay_input's
// term is H[t] - V[t-1] = k (X[t] - (V[t-1] - V_r)) instead (see grad_k_of_lane). The recompute
// computes it beside H (charge's own inner term, so the same bits), and the backward's steps
// read it rather than rebuild V[t-1].
template <bool FROM_X, typename acc_t>
PLIF_HD acc_t dh_dk_of(acc_t v_prev, acc_t x_or_h, const Options<acc_t>& o) {
  const acc_t leak = v_prev - o.v_reset;
  return pick(o.decay_input, FROM_X ? x_or_h - leak : x_or_h - v_prev, -leak);
}

// One reverse-time step of one neuron (the recursion of the spec) from H[t], 1 - S[t], dH[t]/dk and
// the gradients arriving on S[t] and V[t]: updates dL/dH (grad_h_next becomes dL/dH[t]) and the
// running sum for dL/dk; returns dL/dX[t].
// sg: the surrogate derivative at H[t] (surrogate_grad of H[t] - V_th).
template <typename acc_t>
PLIF_HD acc_t backward_neuron_given_surrogate(acc_t h, acc_t not_spiked, acc_t sg, acc_t dh_dk, acc_t k, acc_t grad_v,
                                              acc_t grad_s, bool through_spike, bool through_membrane,
                                              const Options<acc_t>& o, acc_t& grad_h_next, acc_t& grad_k_sum) {
  const acc_t r = reset_grad(h, not_spiked, sg, o);
  const acc_t via_membrane = pick(through_membrane, fma_(grad_h_next, acc_t(1) - k, grad_v) * r, acc_t(0));
  const acc_t grad_h = pick(through_spike, fma_(grad_s, sg, via_membrane), via_membrane);
  grad_k_sum = fma_(grad_h, dh_dk, grad_k_sum);
  grad_h_next = grad_h;
  return pick(o.decay_input, k * grad_h, grad_h);
}

// ---- loads and stores -----------------------------------------------------------------------
// static_cast covers float, double and c10's Half/BFloat16; the GPU paths add overloads for
// CUDA's half types in plif_kernels.cuh.
template <typename acc_t, typename in_t>
PLIF_HD acc_t load_as(const in_t& v) {
  return static_cast<acc_t>(v);
}
template <typename out_t, typename acc_t>
PLIF_HD out_t store_as(acc_t v) {
  return static_cast<out_t>(v);
}

// ---- checkpoints (kSaveCheckpoints) -----------------------------------------------------------
// Step t's H is a checkpoint where it ends a chunk of kCheckpointSteps steps other than the last.
PLIF_HD bool is_checkpoint_step(index_t t, index_t T) { return (t + 1) % kCheckpointSteps == 0 && t + 1 < T; }
// Its row among the checkpoints: H[K-1] is row 0, H[2K-1] row 1, ...
PLIF_HD index_t checkpoint_row(index_t t) { return (t + 1) / kCheckpointSteps - 1; }

// ---- the gradient of a shared parameter ----------------------------------------------------------
// Where k (v_init) is one value for the layer, its gradient is the sum of every neuron's share.
// Every backend sums them with this one routine, in two levels: each part of the work (a CPU
// block of neurons, a GPU thread block) sums its shares, then the parts' sums are summed, so the
// bits depend only on the shape and the partition, never on the number of threads or on timing.
// kShareSumLanes running sums in float64 across the values, then added pairwise: a CPU compiler
// vectorises it, and a GPU thread keeps the running sums in registers.
enum ShareSum : int { kShareSumLanes = 8 };

template <typename T>
PLIF_HD double sum_in_fixed_order(const T* values, index_t count) {
  double running[kShareSumLanes] = {};
  const index_t whole = count / kShareSumLanes * kShareSumLanes;
  for (index_t i = 0; i < whole; i += kShareSumLanes) {
    for (int l = 0; l < kShareSumLanes; ++l) running[l] += static_cast<double>(values[i + l]);
  }
  for (int l = 0; l < kShareSumLanes; ++l) {
    if (whole + l < count) running[l] += static_cast<double>(values[whole + l]);
  }
  for (int width = kShareSumLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) running[l] += running[l + width];
  }
  return running[0];
}

// ---- the scans ------------------------------------------------------------------------------
// Each scan is split into begin / step / end over an explicit state, so that a backend can
// interleave the steps of several groups of lanes (the CPU kernel walks a wide block of
// neurons time step by time step, which keeps its memory streams long and prefetchable);
// forward_scan / backward_scan run one group through all T steps.

// Forward state of LANES neurons: their k and membrane V[t-1].
template <int LANES, typename acc_t>
struct ForwardState {
  acc_t k[LANES];
  acc_t v[LANES];
};

template <int LANES, typename in_t, typename acc_t>
PLIF_HD void forward_begin(const ForwardParams<in_t, acc_t>& p, index_t n0, ForwardState<LANES, acc_t>& st) {
  for (int j = 0; j < LANES; ++j) {
    st.k[j] = p.k[(n0 + j) * p.k_stride];
    st.v[j] = p.v_init[(n0 + j) * p.v_init_stride];
  }
}

template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void forward_step(const ForwardParams<in_t, acc_t>& p, index_t t, index_t n0, ForwardState<LANES, acc_t>& st) {
  const Options<acc_t> o = p.opts;  // a local copy: stores through spikes cannot alias it
  const index_t row = t * p.N + n0;
  const in_t* const x_row = p.x + t * p.x_step + n0;
  in_t* const spikes_row = p.spikes + row;
  acc_t h[LANES];
  for (int j = 0; j < LANES; ++j) {
    spikes_row[j] = store_as<in_t>(forward_neuron<SURROGATE>(st.v[j], load_as<acc_t>(x_row[j]), st.k[j], o, h[j]));
  }
  if (p.h_seq != nullptr && (!o.h_checkpoints || is_checkpoint_step(t, p.T))) {
    acc_t* const h_row = p.h_seq + (o.h_checkpoints ? checkpoint_row(t) * p.N + n0 : row);
    for (int j = 0; j < LANES; ++j) h_row[j] = h[j];
  }
  if (p.v_seq != nullptr) {
    for (int j = 0; j < LANES; ++j) p.v_seq[row + j] = store_as<in_t>(st.v[j]);
  }
}

template <int LANES, typename in_t, typename acc_t>
PLIF_HD void forward_end(const ForwardParams<in_t, acc_t>& p, index_t n0, const ForwardState<LANES, acc_t>& st) {
  for (int j = 0; j < LANES; ++j) p.v_last[n0 + j] = st.v[j];
}

// Forward over all T steps for neurons n0 .. n0 + LANES - 1 (all in range).
template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void forward_scan(const ForwardParams<in_t, acc_t>& p, index_t n0) {
  ForwardState<LANES, acc_t> st;
  forward_begin<LANES>(p, n0, st);
  for (index_t t = 0; t < p.T; ++t) forward_step<LANES, SURROGATE>(p, t, n0, st);
  forward_end<LANES>(p, n0, st);
}

// Backward state of LANES neurons while walking back from t = T-1: H[t], 1 - S[t] and the surrogate
// derivative at H[t] (all computed one step ahead; the GPU kernels, which compute the derivative
// within the step, leave the last one unread), dL/dH[t+1], and the running sum for dL/dk.
template <int LANES, typename acc_t>
struct BackwardState {
  acc_t k[LANES];
  acc_t h[LANES];
  acc_t not_spiked[LANES];  // 1 - S[t]: what the reset's derivative takes
  acc_t surrogate_grad[LANES];
  acc_t grad_h_next[LANES];
  acc_t grad_k_sum[LANES];
};

// Whether dL/dV[t] arrives at step t: wherever grad_v_seq or grad_v_last is given, else below
// T-1 whenever dL/dS does (through the next step's membrane), never at T-1.
PLIF_HD bool through_membrane(bool last_step, bool through_spike, bool grad_v_seq_given, bool grad_v_last_given) {
  return grad_v_seq_given || grad_v_last_given || (!last_step && through_spike);
}

// One reverse-time step t of lane j, the one step function of every backward driver, given
// dH[t]/dk (dh_dk_of) and H[t-1] where has_prev (t > 0; else h_prev is 0, the state's H after
// step 0); returns dL/dX[t] and moves the lane's state one step back. The surrogate derivative the previous step
// will need is computed here, a step ahead: its exp and division are a long chain of dependent
// operations that depends on nothing of this step, so it runs beside this step's chain instead
// of before it (benchmarks/NOTES.md, "Fifth pass"). The same expression, so the same bits.
template <int SURROGATE, int LANES, typename acc_t>
PLIF_HD acc_t backward_neuron_step(bool has_prev, acc_t h_prev, acc_t dh_dk, acc_t grad_s, acc_t grad_v,
                                   bool through_spike, bool through_membrane, const Options<acc_t>& o,
                                   BackwardState<LANES, acc_t>& st, int j) {
  const acc_t grad_x =
      backward_neuron_given_surrogate(st.h[j], st.not_spiked[j], st.surrogate_grad[j], dh_dk, st.k[j], grad_v, grad_s,
                                      through_spike, through_membrane, o, st.grad_h_next[j], st.grad_k_sum[j]);
  st.h[j] = h_prev;
  st.not_spiked[j] = has_prev ? acc_t(1) - fire<SURROGATE>(h_prev, o) : acc_t(1);
  if (has_prev) st.surrogate_grad[j] = surrogate_grad<SURROGATE>(h_prev - o.v_threshold, o);
  return grad_x;
}

// h_last: H[T-1] of these lanes.
template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void backward_begin(const BackwardParams<in_t, acc_t>& p, index_t n0, const acc_t* h_last,
                            BackwardState<LANES, acc_t>& st) {
  for (int j = 0; j < LANES; ++j) {
    st.k[j] = p.k[(n0 + j) * p.k_stride];
    st.grad_h_next[j] = acc_t(0);
    st.grad_k_sum[j] = acc_t(0);
    st.h[j] = h_last[j];
    st.not_spiked[j] = acc_t(1) - fire<SURROGATE>(st.h[j], p.opts);
    st.surrogate_grad[j] = surrogate_grad<SURROGATE>(st.h[j] - p.opts.v_threshold, p.opts);
  }
}

// The reverse-time recursion of the spec over LANES neurons, given each step's dH/dk row
// (dh_dk_of: from the recompute, or from H alone where every H was saved).
// An absent incoming gradient (a null pointer) contributes nothing, as in autograd: its term is
// dropped, not multiplied as a zero, since 0 * surrogate'(NaN) or 0 * dV/dH(inf) is NaN.
// `through_spike` says whether dL/dS[t] arrives (grad_spikes present), `through_membrane` whether
// dL/dV[t] does (always below T-1 once anything arrives; at T-1 only from v_seq or v_last).
// h_prev_row: H[t-1] of these lanes (where HAS_PREV).
// The rows and the state are declared unaliased (grad_x is a fresh output, the state lives on the
// caller's stack, the input rows are only read): without it GCC checks the pointers for overlap
// before every group's loop, with a scalar copy of the loop to fall back on (-5% backward time
// from cache on the CPU of benchmarks/NOTES.md).
template <bool HAS_PREV, int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void backward_lanes(const BackwardParams<in_t, acc_t>& p, index_t row, const acc_t* __restrict__ h_prev_row,
                            const acc_t* __restrict__ dh_dk_row, const acc_t* __restrict__ grad_v,
                            const acc_t* __restrict__ grad_s, bool through_spike, bool through_membrane,
                            BackwardState<LANES, acc_t>& __restrict__ st) {
  const Options<acc_t> o = p.opts;  // a local copy: stores through grad_x cannot alias it
  in_t* __restrict__ const grad_x_row = p.grad_x + row;
  for (int j = 0; j < LANES; ++j) {
    const acc_t h_prev = HAS_PREV ? h_prev_row[j] : acc_t(0);
    grad_x_row[j] = store_as<in_t>(backward_neuron_step<SURROGATE>(HAS_PREV, h_prev, dh_dk_row[j], grad_s[j], grad_v[j],
                                                                   through_spike, through_membrane, o, st, j));
  }
}

// A step's row of an incoming gradient as the compute type: read in place where it already is,
// else converted into `staged` (saves a copy per step in float32 and float64).
template <int LANES, typename acc_t>
PLIF_HD const acc_t* gradient_row(const acc_t* row, acc_t (&)[LANES]) {
  return row;
}
template <int LANES, typename in_t, typename acc_t>
PLIF_HD const acc_t* gradient_row(const in_t* row, acc_t (&staged)[LANES]) {
  for (int j = 0; j < LANES; ++j) staged[j] = load_as<acc_t>(row[j]);
  return staged;
}

// dH/dk of step t's lanes from every H (no X, kSaveH): V[t-1] rebuilt from H[t-1] (reset is a
// function of H), or v_init at t = 0; st.h holds H[t].
template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void dh_dk_from_every_h(const BackwardParams<in_t, acc_t>& p, index_t t, index_t n0, const acc_t* h_prev_row,
                                const BackwardState<LANES, acc_t>& st, acc_t (&dh_dk)[LANES]) {
  const Options<acc_t> o = p.opts;
  if (t > 0) {
    for (int j = 0; j < LANES; ++j) {
      dh_dk[j] = dh_dk_of<false>(reset(h_prev_row[j], fire<SURROGATE>(h_prev_row[j], o), o), st.h[j], o);
    }
  } else {
    for (int j = 0; j < LANES; ++j) dh_dk[j] = dh_dk_of<false>(p.v_init[(n0 + j) * p.v_init_stride], st.h[j], o);
  }
}

// One step t back in time; h_prev_row: H[t-1] of these lanes (unused at t = 0); dh_dk_row: the
// step's dH/dk from the recompute, or null where every H was saved.
template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void backward_step(const BackwardParams<in_t, acc_t>& p, index_t t, index_t n0, const acc_t* h_prev_row,
                           const acc_t* dh_dk_row, BackwardState<LANES, acc_t>& st) {
  // An absent gradient reads a constant row of zeros: a local row zero-filled every step
  // compiled to a `rep stos` per group and step (7% of the backward's time in cache).
  static const acc_t zeros[LANES] = {};
  const index_t row = t * p.N + n0;
  acc_t grad_v_staged[LANES], grad_s_staged[LANES], dh_dk_staged[LANES];
  const acc_t* grad_v = zeros;
  if (p.grad_v_seq != nullptr) grad_v = gradient_row<LANES>(p.grad_v_seq + row, grad_v_staged);
  if (t == p.T - 1 && p.grad_v_last != nullptr) {
    for (int j = 0; j < LANES; ++j) grad_v_staged[j] = grad_v[j] + p.grad_v_last[n0 + j];
    grad_v = grad_v_staged;
  }
  const acc_t* const grad_s =
      p.grad_spikes != nullptr ? gradient_row<LANES>(p.grad_spikes + row, grad_s_staged) : zeros;
  if (dh_dk_row == nullptr) {
    dh_dk_from_every_h<LANES, SURROGATE>(p, t, n0, h_prev_row, st, dh_dk_staged);
    dh_dk_row = dh_dk_staged;
  }
  const bool through_spike = p.grad_spikes != nullptr;
  const bool membrane =
      through_membrane(t == p.T - 1, through_spike, p.grad_v_seq != nullptr, p.grad_v_last != nullptr);
  if (t > 0) {
    backward_lanes<true, LANES, SURROGATE>(p, row, h_prev_row, dh_dk_row, grad_v, grad_s, through_spike, membrane, st);
  } else {
    backward_lanes<false, LANES, SURROGATE>(p, row, h_prev_row, dh_dk_row, grad_v, grad_s, through_spike, membrane, st);
  }
}

// The forward state entering chunk `chunk` (kSaveCheckpoints): k, and v_init or the membrane
// after the checkpoint H[t0 - 1], which goes to h_before as well (the H the chunk's first step
// reads as H[t-1]); h_before is left alone for chunk 0.
template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void recompute_chunk_begin(const BackwardParams<in_t, acc_t>& p, index_t chunk, index_t n0,
                                   ForwardState<LANES, acc_t>& st, acc_t* h_before) {
  const Options<acc_t> o = p.opts;
  for (int j = 0; j < LANES; ++j) st.k[j] = p.k[(n0 + j) * p.k_stride];
  if (chunk == 0) {
    for (int j = 0; j < LANES; ++j) st.v[j] = p.v_init[(n0 + j) * p.v_init_stride];
  } else {
    const acc_t* const checkpoint = p.h_seq + (chunk - 1) * p.N + n0;
    for (int j = 0; j < LANES; ++j) {
      h_before[j] = checkpoint[j];
      st.v[j] = reset(h_before[j], fire<SURROGATE>(h_before[j], o), o);
    }
  }
}

// One forward step recomputed for the backward: H into h_row and dH/dk into dh_dk_row, nothing
// stored elsewhere. The same expressions as forward_step, so the same bits.
template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void recompute_step(const in_t* x_row, const Options<acc_t>& o, ForwardState<LANES, acc_t>& st, acc_t* h_row,
                            acc_t* dh_dk_row) {
  for (int j = 0; j < LANES; ++j) {
    const acc_t x = load_as<acc_t>(x_row[j]);
    dh_dk_row[j] = dh_dk_of<true>(st.v[j], x, o);
    forward_neuron<SURROGATE>(st.v[j], x, st.k[j], o, h_row[j]);
  }
}

// The gradient of one lane's k and of its v_init, once the lane has walked back to step 0.
// From H alone (no X: every H saved), decay_input's dH/dk = X - (V[t-1] - V_r) is recovered as
// (H[t] - V[t-1]) / k, the division done once here; it loses the digits H[t] - V[t-1] cancels as
// k shrinks (benchmarks/NOTES.md, "Exact dL/dk"), which is why a backward keeps X and checkpoints.
// Where k underflows to 0 (w below about -88.7 in float32), H = V[t-1] and that sum is 0 (or NaN
// from a NaN gradient); dividing by 1 there keeps dL/dw = 0 * sum = 0 (as in the reference)
// instead of 0/0. With no incoming gradient at all nothing reaches k, not even a NaN from dH/dk.
template <int LANES, typename in_t, typename acc_t>
PLIF_HD acc_t grad_k_of_lane(const BackwardParams<in_t, acc_t>& p, const BackwardState<LANES, acc_t>& st, int j) {
  const bool any_grad = p.grad_spikes != nullptr || p.grad_v_seq != nullptr || p.grad_v_last != nullptr;
  const acc_t k_divisor = st.k[j] == acc_t(0) ? acc_t(1) : st.k[j];
  const acc_t grad_k = p.opts.decay_input && !p.opts.h_checkpoints ? st.grad_k_sum[j] / k_divisor : st.grad_k_sum[j];
  return pick(any_grad, grad_k, acc_t(0));
}
template <int LANES, typename acc_t>
PLIF_HD acc_t grad_v_init_of_lane(const BackwardState<LANES, acc_t>& st, int j) {
  return (acc_t(1) - st.k[j]) * st.grad_h_next[j];
}

template <int LANES, typename in_t, typename acc_t>
PLIF_HD void backward_end(const BackwardParams<in_t, acc_t>& p, index_t n0, const BackwardState<LANES, acc_t>& st) {
  for (int j = 0; j < LANES; ++j) {
    p.grad_v_init[n0 + j] = grad_v_init_of_lane(st, j);
    p.grad_k[n0 + j] = grad_k_of_lane(p, st, j);
  }
}

// Backward over all T steps (T >= 1) for neurons n0 .. n0 + LANES - 1 (all in range).
// From every H (kSaveH), or from X and the checkpoints: then chunk by chunk from the last, each
// chunk's H recomputed first (recompute_chunk_begin, recompute_step) and walked back.
template <int LANES, int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void backward_scan(const BackwardParams<in_t, acc_t>& p, index_t n0) {
  BackwardState<LANES, acc_t> st;
  if (!p.opts.h_checkpoints) {
    backward_begin<LANES, SURROGATE>(p, n0, p.h_seq + (p.T - 1) * p.N + n0, st);
    for (index_t t = p.T - 1; t >= 0; --t) {
      const acc_t* const h_prev_row = t > 0 ? p.h_seq + (t - 1) * p.N + n0 : nullptr;
      backward_step<LANES, SURROGATE>(p, t, n0, h_prev_row, static_cast<const acc_t*>(nullptr), st);
    }
  } else {
    // h[i + 1]: H[t0 + i]; h[0]: H[t0 - 1], the checkpoint before the chunk; dh_dk[i]: dH/dk at t0 + i.
    acc_t h[kCheckpointSteps + 1][LANES], dh_dk[kCheckpointSteps][LANES];
    const index_t last_chunk = (p.T - 1) / kCheckpointSteps;
    for (index_t chunk = last_chunk; chunk >= 0; --chunk) {
      const index_t t0 = chunk * kCheckpointSteps;
      const int count = static_cast<int>(p.T - t0 < kCheckpointSteps ? p.T - t0 : kCheckpointSteps);
      ForwardState<LANES, acc_t> fst;
      recompute_chunk_begin<LANES, SURROGATE>(p, chunk, n0, fst, h[0]);
      for (int i = 0; i < count; ++i) {
        recompute_step<LANES, SURROGATE>(p.x + (t0 + i) * p.x_step + n0, p.opts, fst, h[i + 1], dh_dk[i]);
      }
      if (chunk == last_chunk) backward_begin<LANES, SURROGATE>(p, n0, h[count], st);
      for (int i = count - 1; i >= 0; --i) backward_step<LANES, SURROGATE>(p, t0 + i, n0, h[i], dh_dk[i], st);
    }
  }
  backward_end<LANES>(p, n0, st);
}

}  // namespace plif
