// A part of the CPU kernels (plif_cpu_parts.h says why they are split).
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_BACKWARD(kPiecewiseExp, c10::BFloat16, float)
}  // namespace plif
