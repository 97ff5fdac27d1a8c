// Forward kernels of every dtype (the lighter direction: one file).
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_FORWARD(float, float)
PLIF_INSTANTIATE_CPU_FORWARD(double, double)
PLIF_INSTANTIATE_CPU_FORWARD(c10::Half, float)
PLIF_INSTANTIATE_CPU_FORWARD(c10::BFloat16, float)
}  // namespace plif
