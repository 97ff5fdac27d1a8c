// A part of the CPU kernels (plif_cpu_parts.h says why they are split).
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_FORWARD(kSpikingForward, float, float)
PLIF_INSTANTIATE_CPU_FORWARD(kRuntime, float, float)
}  // namespace plif
