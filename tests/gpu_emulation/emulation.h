// What both emulated launches share: CUDA's half types, the launch names as host variables (set by
// the launch before each thread runs), the test's dtype codes and the C interface's error report.
// Include it before the kernels' header, after defining __syncthreads as the emulation runs it.
#pragma once

#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>

// CUDA's half types with their host conversions; included before the launch names are defined
// below, since the runtime API headers they pull in use those names as parameters.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace plif_emulation {
inline dim3 grid_dim, block_dim;
inline uint3 block_idx, thread_idx;

// dtype codes of tests/test_gpu_emulation.py (DTYPE_CODES): float32, float64, float16, bfloat16.
template <typename Fn>
void dispatch(int dtype, Fn fn) {
  switch (dtype) {
    case 0: fn(float{}, float{}); break;
    case 1: fn(double{}, double{}); break;
    case 2: fn(__half{}, float{}); break;
    case 3: fn(__nv_bfloat16{}, float{}); break;
    default: throw std::invalid_argument("unknown dtype code");
  }
}

// Runs `body`; false, with the exception's message in `error`, where it throws.
template <typename Body>
bool run_reporting(char* error, int error_size, Body body) {
  try {
    body();
  } catch (const std::exception& e) {
    std::snprintf(error, static_cast<size_t>(error_size), "%s", e.what());
    return false;
  }
  return true;
}
}  // namespace plif_emulation

#define gridDim plif_emulation::grid_dim
#define blockDim plif_emulation::block_dim
#define blockIdx plif_emulation::block_idx
#define threadIdx plif_emulation::thread_idx
// Launch bounds steer only the device compiler's register allocation.
#define __launch_bounds__(...)
// One block runs at a time, so one copy of a block's shared array serves every block.
#undef __shared__
#define __shared__ static
