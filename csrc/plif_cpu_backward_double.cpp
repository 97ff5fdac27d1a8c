// Backward kernels for float64 inputs.
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_BACKWARD(double, double)
}  // namespace plif
