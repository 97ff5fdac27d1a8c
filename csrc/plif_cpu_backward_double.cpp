// A part of the CPU kernels (plif_cpu_parts.h says why they are split).
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_BACKWARD(kRuntime, double, double)
PLIF_INSTANTIATE_CPU_BACKWARD(kSigmoid, double, double)
PLIF_INSTANTIATE_CPU_BACKWARD(kAtan, double, double)
PLIF_INSTANTIATE_CPU_BACKWARD(kPiecewiseQuadratic, double, double)
PLIF_INSTANTIATE_CPU_BACKWARD(kPiecewiseExp, double, double)
PLIF_INSTANTIATE_CPU_BACKWARD(kSoftSign, double, double)
PLIF_INSTANTIATE_CPU_BACKWARD(kSuperSpike, double, double)
PLIF_INSTANTIATE_CPU_BACKWARD(kErf, double, double)
}  // namespace plif
