// The CUDA kernels of csrc/plif_kernels.cuh compiled by the host compiler and launched on the CPU:
// every block of the grid the extension's launcher picks runs the real __global__ function, its
// threads as coroutines on one CPU thread: each runs until it ends or reaches __syncthreads,
// and a barrier releases once every thread of the block has reached it (or ended), as on a GPU.
// Every vector access has its alignment checked. tests/test_gpu_emulation.py builds this file
// into a shared library and compares its results bit for bit with the fused CPU kernel.
//
// Built with -ffp-contract=off, as the extension is; plif_math.h then takes its host branches
// (the CPU kernel's expf, the bit-select `pick`), so the emulation computes what the CPU kernel
// computes, while the memory traffic (paths, chunks, vector accesses, grid-stride loops) is the
// GPU's.
#include <ucontext.h>

#include <cstring>
#include <functional>
#include <vector>

#include "emulation.h"

namespace plif_emulation {
long long vector_accesses = 0;
long long barriers = 0;  // __syncthreads calls of the last launch, every thread's counted

inline void check_vector_access(const void* pointer, unsigned long long bytes) {
  if (reinterpret_cast<std::uintptr_t>(pointer) % bytes != 0) {
    char message[128];
    std::snprintf(message, sizeof(message), "misaligned %llu-byte vector access at %p", bytes, pointer);
    throw std::runtime_error(message);
  }
  ++vector_accesses;
}

// The block's scheduler and the thread running now, which __syncthreads hands control back to.
ucontext_t scheduler_context;
ucontext_t* running_context = nullptr;
inline void syncthreads() {
  ++barriers;
  swapcontext(running_context, &scheduler_context);
}
}  // namespace plif_emulation

#define PLIF_CHECK_VECTOR_ACCESS(pointer, bytes) plif_emulation::check_vector_access(pointer, bytes)
#define __syncthreads() plif_emulation::syncthreads()

#include "plif_kernels.cuh"

namespace {

using plif::index_t;

// A thread's stack: the kernels keep their chunks in registers, a few KiB on the host.
constexpr size_t kThreadStackBytes = 256 << 10;

struct EmulatedThread {
  ucontext_t context;
  std::vector<char> stack = std::vector<char>(kThreadStackBytes);
  bool ended = false;
  std::exception_ptr error;
};

// The thread body makecontext starts (it takes no pointer argument portably): the kernel call and
// the thread of the launch, set before each start.
const std::function<void()>* thread_body = nullptr;
EmulatedThread* starting_thread = nullptr;

void run_emulated_thread() {
  EmulatedThread* self = starting_thread;
  try {
    (*thread_body)();
  } catch (...) {
    self->error = std::current_exception();  // an exception cannot leave a coroutine's stack
  }
  self->ended = true;
}  // returns to uc_link: the scheduler

void launch(index_t blocks, const std::function<void()>& run_thread) {
  using namespace plif_emulation;
  grid_dim = dim3(static_cast<unsigned int>(blocks));
  block_dim = dim3(plif::kThreadsPerBlock);
  std::vector<EmulatedThread> threads(block_dim.x);
  thread_body = &run_thread;
  for (unsigned int b = 0; b < grid_dim.x; ++b) {
    block_idx = make_uint3(b, 0, 0);
    for (unsigned int t = 0; t < block_dim.x; ++t) {
      EmulatedThread& thread = threads[t];
      thread.ended = false;
      getcontext(&thread.context);
      thread.context.uc_stack.ss_sp = thread.stack.data();
      thread.context.uc_stack.ss_size = thread.stack.size();
      thread.context.uc_link = &scheduler_context;
      makecontext(&thread.context, run_emulated_thread, 0);
    }
    // Rounds: every thread not yet ended runs to its next barrier or its end.
    for (bool started = false, pending = true; pending; started = true) {
      pending = false;
      for (unsigned int t = 0; t < block_dim.x; ++t) {
        EmulatedThread& thread = threads[t];
        if (thread.ended) continue;
        thread_idx = make_uint3(t, 0, 0);
        running_context = &thread.context;
        if (!started) starting_thread = &thread;
        swapcontext(&scheduler_context, &thread.context);
        if (thread.error) std::rethrow_exception(thread.error);
        pending = pending || !thread.ended;
      }
    }
  }
}

using plif_emulation::dispatch;

// Runs `body`; returns the number of vector accesses it made, or -1 with the error in `error`.
long long guarded(char* error, int error_size, const std::function<void()>& body) {
  plif_emulation::vector_accesses = plif_emulation::barriers = 0;
  return plif_emulation::run_reporting(error, error_size, body) ? plif_emulation::vector_accesses : -1;
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
      // The host's choice of path and grid, as the launchers make it (plif_launch.h).
      const plif::LaunchPath shape =
          plif::forward_shape(T, N, x_step, static_cast<int>(sizeof(in_t)), flags,
                              plif::on_vector_words(x, spikes, v_seq, h_seq), resident_blocks);
      launch(shape.blocks, [&] {
        plif::plif_forward_kernel<in_t, acc_t>(
            static_cast<const in_t*>(x), static_cast<const acc_t*>(k), static_cast<const acc_t*>(v_init),
            static_cast<in_t*>(spikes), static_cast<v_last_t*>(v_last), static_cast<in_t*>(v_seq),
            static_cast<acc_t*>(h_seq), k_stride, v_init_stride, T, N, x_step, static_cast<acc_t>(v_threshold),
            static_cast<acc_t>(v_reset), static_cast<acc_t>(alpha), surrogate, flags | shape.path_flag);
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
      // As the op and the launchers do (csrc/plif_ops.cpp, csrc/plif_cuda.cu backward_cuda): a
      // shared k (v_init) whose gradient is asked for (not null) gets a row of per-block
      // partials, finished by one thread after the backward.
      const int element_bytes = static_cast<int>(sizeof(in_t));
      const plif::LaunchPath shape = plif::backward_shape(
          N, x_step, element_bytes, flags,
          plif::on_words(plif::backward_lanes(element_bytes) * element_bytes, x, grad_spikes, grad_v_seq, grad_x),
          resident_blocks);
      const index_t blocks = shape.blocks;
      std::vector<double> k_partials(k_stride == 0 && grad_k != nullptr ? blocks : 0);
      std::vector<double> v_init_partials(v_init_stride == 0 && grad_v_init != nullptr ? blocks : 0);
      double* const k_partials_ptr = k_partials.empty() ? nullptr : k_partials.data();
      double* const v_init_partials_ptr = v_init_partials.empty() ? nullptr : v_init_partials.data();
      launch(blocks, [&] {
        plif::plif_backward_kernel<in_t, acc_t>(
            static_cast<const in_t*>(grad_spikes), static_cast<plif::GradVLast<in_t, acc_t>*>(grad_v_last),
            static_cast<const in_t*>(grad_v_seq), static_cast<const acc_t*>(h_seq), static_cast<const in_t*>(x),
            static_cast<const acc_t*>(k), static_cast<const acc_t*>(v_init), static_cast<in_t*>(grad_x),
            static_cast<acc_t*>(grad_k), static_cast<acc_t*>(grad_v_init), k_partials_ptr, v_init_partials_ptr,
            k_stride, v_init_stride, T, N, x_step, static_cast<acc_t>(v_threshold), static_cast<acc_t>(v_reset),
            static_cast<acc_t>(alpha), surrogate, flags | shape.path_flag);
      });
      if (k_partials_ptr != nullptr || v_init_partials_ptr != nullptr) {
        plif_emulation::grid_dim = plif_emulation::block_dim = dim3(1);
        plif_emulation::block_idx = plif_emulation::thread_idx = make_uint3(0, 0, 0);
        plif::plif_finish_shares_kernel<acc_t>(k_partials_ptr, v_init_partials_ptr, static_cast<acc_t*>(grad_k),
                                               static_cast<acc_t*>(grad_v_init), blocks);
      }
    });
  });
}

// The __syncthreads calls of the last emulated launch (every thread's).
long long plif_emulated_barriers() { return plif_emulation::barriers; }

// A vector access at `pointer`, for the test that the alignment check fires.
long long plif_emulate_vector_load(const void* pointer, char* error, int error_size) {
  return guarded(error, error_size, [&] {
    plif::LoadedLanes<true, 4, float> values;
    values.load(static_cast<const float*>(pointer));
  });
}

}  // extern "C"
