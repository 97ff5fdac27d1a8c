// Backward kernels for float32 inputs.
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_BACKWARD(float, float)
}  // namespace plif
