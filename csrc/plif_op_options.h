// The neuron's parameters and options as the ops take them, for the binding layers (plif_ops.cpp's
// neuron ops, plif_bn_cpu.cpp's fused BatchNorm + PLIF ops): their schema text, the surrogates'
// names, and their check into the kernels' Options.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "plif_params.h"

// The neuron's parameters and options in an op's schema, after `*`: keyword-only, so that autograd
// expects a gradient for the tensors alone. v_reset None means a soft reset (subtract the threshold).
#define PLIF_NEURON_OPTIONS                                                                              \
  "float v_threshold, float? v_reset, bool decay_input, bool detach_reset, str surrogate, float alpha, " \
  "bool spiking"

namespace plif {

// The ops' surrogate names, in the order of SurrogateId (plif_params.h).
constexpr const char* kSurrogateNames[] = {"sigmoid",     "atan", "piecewise_quadratic", "piecewise_exp", "soft_sign",
                                           "super_spike", "erf"};
static_assert(sizeof(kSurrogateNames) / sizeof(kSurrogateNames[0]) == kErf + 1, "one name per SurrogateId");

inline std::string surrogate_choices() {
  std::string names;
  for (const char* name : kSurrogateNames) names += std::string(names.empty() ? "" : ", ") + name;
  return names;
}

inline int surrogate_id(c10::string_view name) {
  int id = 0;
  while (id <= kErf && name != kSurrogateNames[id]) ++id;
  TORCH_CHECK(id <= kErf, "surrogate must be one of ", surrogate_choices(), ", got '", std::string(name), "'");
  return id;
}

// The neuron's parameters and options as the ops take them, checked.
struct Neuron {
  double v_threshold;
  std::optional<double> v_reset;  // none: soft reset (subtract the threshold)
  bool decay_input;
  bool detach_reset;
  int surrogate;
  double alpha;
  bool spiking;
};

inline Neuron neuron_of(double v_threshold, std::optional<double> v_reset, bool decay_input, bool detach_reset,
                        c10::string_view surrogate, double alpha, bool spiking) {
  const int id = surrogate_id(surrogate);
  TORCH_CHECK(spiking || id != kSuperSpike, "super_spike has no primitive: spiking=False is unavailable");
  return {v_threshold, v_reset, decay_input, detach_reset, id, alpha, spiking};
}

template <typename acc_t>
Options<acc_t> make_options(const Neuron& n, bool h_checkpoints) {
  Options<acc_t> o;
  o.v_threshold = static_cast<acc_t>(n.v_threshold);
  o.v_reset = n.v_reset ? static_cast<acc_t>(*n.v_reset) : acc_t(0);
  o.alpha = static_cast<acc_t>(n.alpha);
  o.surrogate = n.surrogate;
  o.soft_reset = !n.v_reset;
  o.decay_input = n.decay_input;
  o.detach_reset = n.detach_reset;
  o.spiking = n.spiking;
  o.h_checkpoints = h_checkpoints;
  return o;
}

}  // namespace plif
