// Backward kernels for float16 inputs (computed in float32).
#include "plif_cpu_kernels.h"

namespace plif {
PLIF_INSTANTIATE_CPU_BACKWARD(c10::Half, float)
}  // namespace plif
