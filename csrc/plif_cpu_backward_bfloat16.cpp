// Backward kernels for bfloat16 inputs (computed in float32).
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_BACKWARD(c10::BFloat16, float)
}  // namespace plif
