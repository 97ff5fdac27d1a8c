// The CUDA kernels of csrc/plif_kernels.cuh compiled by the host compiler and launched on the CPU:
// every block and thread of the grid the extension's launcher picks runs the real __global__
// function in turn (the kernels share nothing between threads, so the order does not matter).
// Every vector access has its alignment checked. tests/test_gpu_emulation.py builds this file
// into a shared library and compares its results bit for bit with the fused CPU kernel.
//
// Built with -ffp-contract=off, as the extension is; plif_math.h then takes its host branches
// (the CPU kernel's expf, the bit-select `pick`), so the emulation computes what the CPU kernel
// computes, while the memory traffic (paths, chunks, vector accesses, grid-stride loops) is the
// GPU's.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>

// CUDA's half types with their host conversions; included before the launch names are defined
// below, since the runtime API headers they pull in use those names as parameters.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace plif_emulation {
dim3 grid_dim, block_dim;
uint3 block_idx, thread_idx;
long long vector_accesses = 0;

inline void check_vector_access(const void* pointer, unsigned long long bytes) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % bytes != 0) {
    char message[128];
    std::snprintf(message, sizeof(message), "misaligned %llu-byte vector access at %p", bytes, pointer);
    throw std::runtime_error(message);
  }
  ++vector_accesses;
}
}  // namespace plif_emulation

#define gridDim plif_emulation::grid_dim
#define blockDim plif_emulation::block_dim
#define blockIdx plif_emulation::block_idx
#define threadIdx plif_emulation::thread_idx
#define PLIF_CHECK_VECTOR_ACCESS(pointer, bytes) plif_emulation::check_vector_access(pointer, bytes)
// Launch bounds steer only the device compiler's register allocation.
#define __launch_bounds__(...)
// The threads of the emulated grid run one after another, each to its end, so one copy of a
// block's shared array serves them all (a thread uses its own column only).
#undef __shared__
#define __shared__ static

#include "plif_kernels.cuh"

namespace {

using plif::index_t;

template <typename Kernel>
void launch(index_t neurons, index_t resident_blocks, Kernel run_thread) {
  plif_emulation::grid_dim = dim3(static_cast<unsigned int>(plif::launch_blocks(neurons, resident_blocks)));
  plif_emulation::block_dim = dim3(plif::kThreadsPerBlock);
  for (unsigned int b = 0; b < plif_emulation::grid_dim.x; ++b) {
    for (unsigned int t = 0; t < plif_emulation::block_dim.x; ++t) {
      plif_emulation::block_idx = make_uint3(b, 0, 0);
      plif_emulation::thread_idx = make_uint3(t, 0, 0);
      run_thread();
    }
  }
}

// dtype codes of tests/test_gpu_emulation.py: float32, float64, float16, bfloat16.
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

// Runs `body`; returns the number of vector accesses it made, or -1 with the error in `error`.
template <typename Body>
long long guarded(char* error, int error_size, Body body) {
  plif_emulation::vector_accesses = 0;
  try {
    body();
  } catch (const std::exception& e) {
    std::snprintf(error, static_cast<size_t>(error_size), "%s", e.what());
    return -1;
  }
  return plif_emulation::vector_accesses;
}

}  // namespace

extern "C" {

long long plif_emulate_forward(int dtype, const void* x, const void* k, const void* v_init, void* spikes, void* v_last,
                               void* v_seq, void* h_seq, long long k_stride, long long v_init_stride, long long T,
                               long long N, long long x_step, double v_threshold, double v_reset, double alpha,
                               int surrogate, int flags, long long resident_blocks, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    dispatch(dtype, [&](auto in_v, auto acc_v) {
      using in_t = decltype(in_v);
      using acc_t = decltype(acc_v);
      using v_last_t = plif::VLast<in_t, acc_t>;
      launch(N, resident_blocks, [&] {
        plif::plif_forward_kernel<in_t, acc_t>(
            static_cast<const in_t*>(x), static_cast<const acc_t*>(k), static_cast<const acc_t*>(v_init),
            static_cast<in_t*>(spikes), static_cast<v_last_t*>(v_last), static_cast<in_t*>(v_seq),
            static_cast<acc_t*>(h_seq), k_stride, v_init_stride, T, N, x_step, static_cast<acc_t>(v_threshold),
            static_cast<acc_t>(v_reset), static_cast<acc_t>(alpha), surrogate, flags);
      });
    });
  });
}

long long plif_emulate_backward(int dtype, const void* grad_spikes, const void* grad_v_last, const void* grad_v_seq,
                                const void* h_seq, const void* x, const void* k, const void* v_init, void* grad_x,
                                void* grad_k, void* grad_v_init, long long k_stride, long long v_init_stride,
                                long long T, long long N, long long x_step, double v_threshold, double v_reset,
                                double alpha, int surrogate, int flags, long long resident_blocks, char* error,
                                int error_size) {
  return guarded(error, error_size, [&] {
    dispatch(dtype, [&](auto in_v, auto acc_v) {
      using in_t = decltype(in_v);
      using acc_t = decltype(acc_v);
      // The launchers' choice (csrc/plif_cuda.cu backward_cuda): checkpoints have their own kernel.
      auto kernel = plif::plif_backward_kernel<in_t, acc_t>;
      if constexpr (sizeof(in_t) == 2) {
        if (flags & plif::kFlagHCheckpoints) kernel = plif::plif_recompute_backward_kernel<in_t, acc_t>;
      }
      launch(N, resident_blocks, [&] {
        kernel(
            static_cast<const in_t*>(grad_spikes), static_cast<plif::GradVLast<in_t, acc_t>*>(grad_v_last),
            static_cast<const in_t*>(grad_v_seq), static_cast<const acc_t*>(h_seq), static_cast<const in_t*>(x),
            static_cast<const acc_t*>(k), static_cast<const acc_t*>(v_init), static_cast<in_t*>(grad_x),
            static_cast<acc_t*>(grad_k), static_cast<acc_t*>(grad_v_init), k_stride, v_init_stride, T, N, x_step,
            static_cast<acc_t>(v_threshold), static_cast<acc_t>(v_reset), static_cast<acc_t>(alpha), surrogate, flags);
      });
    });
  });
}

// A vector access at `pointer`, for the test that the alignment check fires.
long long plif_emulate_vector_load(const void* pointer, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    plif::LoadedLanes<true, 4, float> values;
    values.load(static_cast<const float*>(pointer));
  });
}

}  // extern "C"
