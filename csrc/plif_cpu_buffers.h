// Page-resident buffers for the CPU op's large outputs.
//
// torch's CPU allocator hands every large tensor fresh pages from the kernel (glibc maps
// chunks above 32 MiB, and unmaps them on free), and first touching them costs page faults
// plus zeroing: on a 2-core VM about as long as the fused kernel itself. Training repeats the
// same shapes every step, so the op keeps the buffers its outputs released and hands them out
// again: the steady state touches no fresh page. Bounded (PLIF_CPU_CACHE_MB, default 2048;
// 0 turns it off); blocks beyond the bound go back to the system.
#pragma once

#include <ATen/ATen.h>

namespace plif {

// An uninitialised CPU tensor of `sizes` and `options`, from the cache when large enough to
// matter, else from torch's allocator.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes the cache holds now (released buffers kept for reuse).
int64_t cpu_cache_bytes();

// Returns every cached buffer to the system (buffers still in use are not affected).
void empty_cpu_cache();

}  // namespace plif
