// Page-resident buffers for the CPU op's large outputs.
//
// A large tensor from torch's CPU allocator gets fresh pages from the kernel (glibc maps
// chunks of 32 MiB and more, and unmaps them on free), and the first write to each page costs
// a fault plus zeroing: on the 2-core KVM guest of benchmarks/NOTES.md, longer than the fused
// kernel's whole pass. Training asks for the same shapes every step, so the op keeps the
// buffers its outputs release and hands them out again.
//
// What it keeps: released buffers of 1 MiB and more, each serving later requests of its size
// down to 4/5 of it (best fit, most recently released first), or any smaller request where a
// new buffer would exceed the bound below. Bound: what the op's outputs
// held at their peak (since the start or the last empty_cpu_cache()): live plus cached bytes
// never exceed it, so idle memory is at most one peak's worth of outputs, and less where
// PLIF_CPU_CACHE_MB caps it (0 turns the cache off: outputs then come from torch's allocator).
// The least recently released buffers go back to the system first.
//
// Outputs are ordinary resizable CPU tensors whose storage's allocator is this cache (resize_,
// share_memory_, pickling behave as for any tensor). A forked child (a DataLoader worker)
// starts with an empty cache: its copies of the cached buffers are unmapped at fork.
#pragma once

#include <ATen/ATen.h>

namespace plif {

// An uninitialised CPU tensor of `sizes` and `options`, from the cache when large enough to
// matter, else from torch's allocator.
at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// Bytes the cache holds now (released buffers kept for reuse).
int64_t cpu_cache_bytes();

// Returns every cached buffer to the system and restarts the bound from the outputs alive now
// (buffers still in use are not affected).
void empty_cpu_cache();

// Caps the bytes the cache keeps (negative: no cap beyond the peak; 0: off, later outputs come
// from torch's allocator) and returns the previous cap. PLIF_CPU_CACHE_MB sets the first one.
int64_t set_cpu_cache_limit(int64_t bytes);

}  // namespace plif
