// A part of the CPU kernels (plif_cpu_parts.h says why they are split).
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_FORWARD(kSpikingForward, c10::Half, float)
PLIF_INSTANTIATE_CPU_FORWARD(kRuntime, c10::Half, float)
}  // namespace plif
