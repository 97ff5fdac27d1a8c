// The CPU kernels come in parts that compile in parallel: one forward per mode and one backward
// per surrogate variant, for each dtype. Each part is defined in plif_cpu_kernels.h and
// instantiated by exactly one plif_cpu_forward_*.cpp / plif_cpu_backward_*.cpp file;
// plif_cpu_entry_points.cpp sees only these declarations and picks a part at run time
// (plif_dispatch.h), so it instantiates none of the kernels itself.
#pragma once

#include "plif_params.h"

namespace plif {

// MODE: kSpikingForward or kRuntime (the smooth mode); see plif_math.h's ScanMode.
template <int MODE, typename in_t, typename acc_t>
void forward_with_mode(const ForwardParams<in_t, acc_t>& p);

// SURROGATE: a SurrogateId (spiking mode) or kRuntime (the smooth mode).
template <int SURROGATE, typename in_t, typename acc_t>
void backward_with_surrogate(const BackwardParams<in_t, acc_t>& p);

#define PLIF_INSTANTIATE_CPU_FORWARD(MODE, in_t, acc_t) \
  template void forward_with_mode<MODE, in_t, acc_t>(const ForwardParams<in_t, acc_t>&);
#define PLIF_INSTANTIATE_CPU_BACKWARD(SURROGATE, in_t, acc_t) \
  template void backward_with_surrogate<SURROGATE, in_t, acc_t>(const BackwardParams<in_t, acc_t>&);

}  // namespace plif
