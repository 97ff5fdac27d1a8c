// The PLIF math, written once for every backend.
//
// The scans below process LANES neurons at a time (LANES is a compile-time width): the
// CPU kernel uses a wide block so that each per-step loop vectorises, the GPU kernels use
// one neuron per thread. Each step is written as a few loops over the lanes with the
// option branches outside the loops, so that a compiler can vectorise every loop.
//
// The arithmetic order follows plif_cuda/reference.py exactly, and every backend is built
// without floating-point contraction, so spikes equal the reference's bit for bit.
#pragma once

#include "plif_params.h"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PLIF_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#include <cstdint>
#include <cstring>
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
#if defined(__CUDA_ARCH__) || defined(__CUDACC_RTC__)
PLIF_HD float exp_(float x) { return ::expf(x); }
#else
// expf that a compiler can vectorise (libm's expf is a call, and GCC maps it to a vector
// version only under -ffast-math, which would also reorder the spike arithmetic). Cephes'
// range reduction and polynomial: relative error below 2e-7 over the whole range, overflow to
// inf, gradual underflow to 0, NaN propagated. Used only in surrogate derivatives and smooth
// firing, never in the spiking forward, so spikes stay bit-exact.
PLIF_HD float exp_(float x) {
  // A NaN x stays NaN through r and p; it is kept out of the integer conversion only.
  const float clamped = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);
  const float rounded = clamped * 1.44269504088896341f + (clamped < 0.0f ? -0.5f : 0.5f);
  const int32_t n_int = static_cast<int32_t>(rounded == rounded ? rounded : 0.0f);
  const float n = static_cast<float>(n_int);
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n as two factors so that n from -150 to 129 stays inside the normal exponent range.
  const int32_t half = n_int / 2;
  const uint32_t bits_a = static_cast<uint32_t>(half + 127) << 23;
  const uint32_t bits_b = static_cast<uint32_t>(n_int - half + 127) << 23;
  float scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(float));
  std::memcpy(&scale_b, &bits_b, sizeof(float));
  return p * scale_a * scale_b;
}
#endif
PLIF_HD double exp_(double x) { return ::exp(x); }
PLIF_HD float atan_(float x) { return ::atanf(x); }
PLIF_HD double atan_(double x) { return ::atan(x); }
PLIF_HD float erfc_(float x) { return ::erfcf(x); }
PLIF_HD double erfc_(double x) { return ::erfc(x); }
PLIF_HD float abs_(float x) { return ::fabsf(x); }
PLIF_HD double abs_(double x) { return ::fabs(x); }

template <typename acc_t>
struct Constants {
  static constexpr acc_t pi = acc_t(3.14159265358979323846);
  static constexpr acc_t inv_sqrt_pi = acc_t(0.56418958354775628695);
};

// ---- surrogates (x = H - V_th) -----------------------------------------------------------
// Derivative column of the spec table, for LANES values at once.
template <int LANES, typename acc_t>
PLIF_HD void surrogate_grad(const acc_t (&x)[LANES], acc_t (&sg)[LANES], const Options<acc_t>& o) {
  const acc_t a = o.alpha;
  switch (o.surrogate) {
    case kSigmoid:
      for (int j = 0; j < LANES; ++j) {
        const acc_t s = acc_t(1) / (acc_t(1) + exp_(-a * x[j]));
        sg[j] = a * s * (acc_t(1) - s);
      }
      break;
    case kAtan:
      for (int j = 0; j < LANES; ++j) {
        const acc_t u = Constants<acc_t>::pi / acc_t(2) * a * x[j];
        sg[j] = (a / acc_t(2)) / (acc_t(1) + u * u);
      }
      break;
    case kPiecewiseQuadratic:
      for (int j = 0; j < LANES; ++j) {
        const acc_t g = a - a * a * abs_(x[j]);
        sg[j] = g > acc_t(0) ? g : acc_t(0);
      }
      break;
    case kPiecewiseExp:
      for (int j = 0; j < LANES; ++j) sg[j] = (a / acc_t(2)) * exp_(-a * abs_(x[j]));
      break;
    case kSoftSign:
      for (int j = 0; j < LANES; ++j) {
        const acc_t d = acc_t(1) / a + abs_(x[j]);
        sg[j] = acc_t(1) / (acc_t(2) * a * d * d);
      }
      break;
    case kSuperSpike:
      for (int j = 0; j < LANES; ++j) {
        const acc_t d = acc_t(1) + abs_(x[j]);
        sg[j] = a / (d * d);
      }
      break;
    default:  // kErf
      for (int j = 0; j < LANES; ++j) {
        const acc_t u = a * x[j];
        sg[j] = a * Constants<acc_t>::inv_sqrt_pi * exp_(-(u * u));
      }
      break;
  }
}

// Smooth firing function (spiking=False): the primitive of surrogate_grad. SuperSpike has
// none; the Python layer refuses it before any kernel runs.
template <int LANES, typename acc_t>
PLIF_HD void surrogate_primitive(const acc_t (&x)[LANES], acc_t (&s)[LANES], const Options<acc_t>& o) {
  const acc_t a = o.alpha;
  switch (o.surrogate) {
    case kSigmoid:
      for (int j = 0; j < LANES; ++j) s[j] = acc_t(1) / (acc_t(1) + exp_(-a * x[j]));
      break;
    case kAtan:
      for (int j = 0; j < LANES; ++j)
        s[j] = atan_(Constants<acc_t>::pi / acc_t(2) * a * x[j]) / Constants<acc_t>::pi + acc_t(0.5);
      break;
    case kPiecewiseQuadratic:
      for (int j = 0; j < LANES; ++j) {
        const acc_t bound = acc_t(1) / a;
        const acc_t inner = acc_t(-0.5) * a * a * x[j] * abs_(x[j]) + a * x[j] + acc_t(0.5);
        s[j] = x[j] > bound ? acc_t(1) : (x[j] < -bound ? acc_t(0) : inner);
      }
      break;
    case kPiecewiseExp:
      for (int j = 0; j < LANES; ++j) {
        const acc_t e = acc_t(0.5) * exp_(-a * abs_(x[j]));
        s[j] = x[j] < acc_t(0) ? e : acc_t(1) - e;
      }
      break;
    case kSoftSign:
      for (int j = 0; j < LANES; ++j) {
        const acc_t u = a * x[j];
        s[j] = acc_t(0.5) * (u / (acc_t(1) + abs_(u)) + acc_t(1));
      }
      break;
    default:  // kErf (kSuperSpike is refused before launch)
      for (int j = 0; j < LANES; ++j) s[j] = acc_t(0.5) * erfc_(-a * x[j]);
      break;
  }
}

// ---- one time step ------------------------------------------------------------------------
template <int LANES, typename acc_t>
PLIF_HD void charge(const acc_t (&v_prev)[LANES], const acc_t (&x)[LANES], const acc_t (&k)[LANES],
                    acc_t (&h)[LANES], const Options<acc_t>& o) {
  const acc_t vr = o.v_reset;
  if (o.decay_input) {
    for (int j = 0; j < LANES; ++j) h[j] = v_prev[j] + k[j] * (x[j] - (v_prev[j] - vr));
  } else {
    for (int j = 0; j < LANES; ++j) h[j] = v_prev[j] - k[j] * (v_prev[j] - vr) + x[j];
  }
}

template <int LANES, typename acc_t>
PLIF_HD void fire(const acc_t (&h)[LANES], acc_t (&s)[LANES], const Options<acc_t>& o) {
  acc_t centred[LANES];
  for (int j = 0; j < LANES; ++j) centred[j] = h[j] - o.v_threshold;
  if (o.spiking) {
    for (int j = 0; j < LANES; ++j) s[j] = centred[j] >= acc_t(0) ? acc_t(1) : acc_t(0);
  } else {
    surrogate_primitive<LANES>(centred, s, o);
  }
}

// Literal arithmetic (not a select), so that inf and NaN propagate as in the reference.
template <int LANES, typename acc_t>
PLIF_HD void reset(const acc_t (&h)[LANES], const acc_t (&s)[LANES], acc_t (&v)[LANES], const Options<acc_t>& o) {
  if (o.soft_reset) {
    for (int j = 0; j < LANES; ++j) v[j] = h[j] - s[j] * o.v_threshold;
  } else {
    for (int j = 0; j < LANES; ++j) v[j] = s[j] * o.v_reset + (acc_t(1) - s[j]) * h[j];
  }
}

// ---- loads and stores -----------------------------------------------------------------------
// static_cast covers float, double and c10's Half/BFloat16; the GPU paths add overloads for
// CUDA's half types in plif_kernels.cuh.
template <typename acc_t, typename in_t>
PLIF_HD acc_t load_as(const in_t& v) { return static_cast<acc_t>(v); }
template <typename out_t, typename acc_t>
PLIF_HD out_t store_as(acc_t v) { return static_cast<out_t>(v); }

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

template <int LANES, typename in_t, typename acc_t>
PLIF_HD void forward_step(const ForwardParams<in_t, acc_t>& p, index_t t, index_t n0, ForwardState<LANES, acc_t>& st) {
  const Options<acc_t>& o = p.opts;
  acc_t x[LANES], h[LANES], s[LANES];
  const index_t row = t * p.N + n0;
  for (int j = 0; j < LANES; ++j) x[j] = load_as<acc_t>(p.x[row + j]);
  charge<LANES>(st.v, x, st.k, h, o);
  fire<LANES>(h, s, o);
  reset<LANES>(h, s, st.v, o);
  for (int j = 0; j < LANES; ++j) p.spikes[row + j] = store_as<in_t>(s[j]);
  if (p.h_seq != nullptr) {
    for (int j = 0; j < LANES; ++j) p.h_seq[row + j] = h[j];
  }
  if (p.v_seq != nullptr) {
    for (int j = 0; j < LANES; ++j) p.v_seq[row + j] = store_as<in_t>(st.v[j]);
  }
}

template <int LANES, typename in_t, typename acc_t>
PLIF_HD void forward_end(const ForwardParams<in_t, acc_t>& p, index_t n0, const ForwardState<LANES, acc_t>& st) {
  for (int j = 0; j < LANES; ++j) p.v_last[n0 + j] = store_as<in_t>(st.v[j]);
}

// Forward over all T steps for neurons n0 .. n0 + LANES - 1 (all in range).
template <int LANES, typename in_t, typename acc_t>
PLIF_HD void forward_scan(const ForwardParams<in_t, acc_t>& p, index_t n0) {
  ForwardState<LANES, acc_t> st;
  forward_begin<LANES>(p, n0, st);
  for (index_t t = 0; t < p.T; ++t) forward_step<LANES>(p, t, n0, st);
  forward_end<LANES>(p, n0, st);
}

// Backward state of LANES neurons while walking back from t = T-1: H[t] and S[t] (loaded one
// step ahead), dL/dH[t+1], and the running sum for dL/dk.
template <int LANES, typename acc_t>
struct BackwardState {
  acc_t k[LANES];
  acc_t h[LANES];
  acc_t s[LANES];
  acc_t grad_h_next[LANES];
  acc_t grad_k_sum[LANES];
};

template <int LANES, typename in_t, typename acc_t>
PLIF_HD void backward_begin(const BackwardParams<in_t, acc_t>& p, index_t n0, BackwardState<LANES, acc_t>& st) {
  const index_t last = (p.T - 1) * p.N + n0;
  for (int j = 0; j < LANES; ++j) {
    st.k[j] = p.k[(n0 + j) * p.k_stride];
    st.grad_h_next[j] = acc_t(0);
    st.grad_k_sum[j] = acc_t(0);
    st.h[j] = p.h_seq[last + j];
  }
  fire<LANES>(st.h, st.s, p.opts);
}

// The reverse-time recursion of the spec, from H alone. V[t-1] is recomputed from H[t-1]
// (reset is a function of H), and for decay_input dH/dk = X - (V[t-1] - V_r) is recovered as
// (H[t] - V[t-1]) / k, with the division done once per neuron in backward_end.
template <int LANES, typename in_t, typename acc_t>
PLIF_HD void backward_step(const BackwardParams<in_t, acc_t>& p, index_t t, index_t n0,
                           BackwardState<LANES, acc_t>& st) {
  const Options<acc_t>& o = p.opts;
  acc_t h_prev[LANES], s_prev[LANES], v_prev[LANES];
  acc_t centred[LANES], sg[LANES], r[LANES], grad_v[LANES], grad_h[LANES];
  const index_t row = t * p.N + n0;
  if (t > 0) {
    for (int j = 0; j < LANES; ++j) h_prev[j] = p.h_seq[row - p.N + j];
    fire<LANES>(h_prev, s_prev, o);
    reset<LANES>(h_prev, s_prev, v_prev, o);
  } else {
    for (int j = 0; j < LANES; ++j) {
      v_prev[j] = p.v_init[(n0 + j) * p.v_init_stride];
      h_prev[j] = s_prev[j] = acc_t(0);
    }
  }
  for (int j = 0; j < LANES; ++j) centred[j] = st.h[j] - o.v_threshold;
  surrogate_grad<LANES>(centred, sg, o);
  if (o.soft_reset) {
    if (o.detach_reset) {
      for (int j = 0; j < LANES; ++j) r[j] = acc_t(1);
    } else {
      for (int j = 0; j < LANES; ++j) r[j] = acc_t(1) - o.v_threshold * sg[j];
    }
  } else {
    if (o.detach_reset) {
      for (int j = 0; j < LANES; ++j) r[j] = acc_t(1) - st.s[j];
    } else {
      for (int j = 0; j < LANES; ++j) r[j] = (acc_t(1) - st.s[j]) + (o.v_reset - st.h[j]) * sg[j];
    }
  }
  for (int j = 0; j < LANES; ++j) grad_v[j] = acc_t(0);
  if (p.grad_v_seq != nullptr) {
    for (int j = 0; j < LANES; ++j) grad_v[j] = load_as<acc_t>(p.grad_v_seq[row + j]);
  }
  if (t == p.T - 1 && p.grad_v_last != nullptr) {
    for (int j = 0; j < LANES; ++j) grad_v[j] += load_as<acc_t>(p.grad_v_last[n0 + j]);
  }
  for (int j = 0; j < LANES; ++j) grad_h[j] = (grad_v[j] + st.grad_h_next[j] * (acc_t(1) - st.k[j])) * r[j];
  if (p.grad_spikes != nullptr) {
    for (int j = 0; j < LANES; ++j) grad_h[j] += load_as<acc_t>(p.grad_spikes[row + j]) * sg[j];
  }
  if (o.decay_input) {
    for (int j = 0; j < LANES; ++j) {
      p.grad_x[row + j] = store_as<in_t>(st.k[j] * grad_h[j]);
      st.grad_k_sum[j] += grad_h[j] * (st.h[j] - v_prev[j]);
    }
  } else {
    for (int j = 0; j < LANES; ++j) {
      p.grad_x[row + j] = store_as<in_t>(grad_h[j]);
      st.grad_k_sum[j] -= grad_h[j] * (v_prev[j] - o.v_reset);
    }
  }
  for (int j = 0; j < LANES; ++j) {
    st.grad_h_next[j] = grad_h[j];
    st.h[j] = h_prev[j];
    st.s[j] = s_prev[j];
  }
}

template <int LANES, typename in_t, typename acc_t>
PLIF_HD void backward_end(const BackwardParams<in_t, acc_t>& p, index_t n0, const BackwardState<LANES, acc_t>& st) {
  for (int j = 0; j < LANES; ++j) {
    p.grad_v_init[n0 + j] = (acc_t(1) - st.k[j]) * st.grad_h_next[j];
    p.grad_k[n0 + j] = p.opts.decay_input ? st.grad_k_sum[j] / st.k[j] : st.grad_k_sum[j];
  }
}

// Backward over all T steps (T >= 1) for neurons n0 .. n0 + LANES - 1 (all in range).
template <int LANES, typename in_t, typename acc_t>
PLIF_HD void backward_scan(const BackwardParams<in_t, acc_t>& p, index_t n0) {
  BackwardState<LANES, acc_t> st;
  backward_begin<LANES>(p, n0, st);
  for (index_t t = p.T - 1; t >= 0; --t) backward_step<LANES>(p, t, n0, st);
  backward_end<LANES>(p, n0, st);
}

}  // namespace plif
