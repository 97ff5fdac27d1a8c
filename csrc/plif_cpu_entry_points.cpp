// The CPU kernels' entry points for every dtype: the forward, and the backward's choice of surrogate.
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_ENTRY_POINTS(float, float)
PLIF_INSTANTIATE_CPU_ENTRY_POINTS(double, double)
PLIF_INSTANTIATE_CPU_ENTRY_POINTS(c10::Half, float)
PLIF_INSTANTIATE_CPU_ENTRY_POINTS(c10::BFloat16, float)
}  // namespace plif
