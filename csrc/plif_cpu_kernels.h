// Fused CPU kernels: blocks of neurons in parallel, each block walked through all T steps
// with the shared math of plif_math.h. Built with -ffp-contract=off (see setup.py). Included
// only by the plif_cpu_forward_*.cpp and plif_cpu_backward_*.cpp files, each instantiating a part
// (plif_cpu_parts.h), so that they compile in parallel.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <type_traits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "plif_cpu_parts.h"
#include "plif_dispatch.h"
#include "plif_launch.h"
#include "plif_math.h"

namespace plif {
namespace {

// A block is kGroups groups of kLanes neurons. Each step runs one fused loop over a group (wide
// enough to vectorise, small enough for its temporaries to stay in L1), and the block walks
// time step by time step through all its groups, so every [T, N] stream is read and written
// in runs of kGroups * kLanes values, each requested a step ahead (prefetch_row).
constexpr int kLanes = 128;
constexpr int kGroups = 8;
constexpr index_t kBlock = kLanes * kGroups;
// How far ahead the forward requests X into L2.
constexpr index_t kForwardStepsIntoL2 = 3;

// One copy per instruction set, picked at load time for the running CPU: the same scans
// vectorise 4, 8 or 16 floats wide. The backward, bound by its arithmetic, has an AVX-512 copy
// as well (-25% backward time on an AMD EPYC of family 25, benchmarks/NOTES.md); the forward,
// bound by memory, does not pay for one. No -ffast-math; contraction stays off in every copy.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PLIF_ISA_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#define PLIF_ISA_CLONES_WITH_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PLIF_ISA_CLONES
#define PLIF_ISA_CLONES_WITH_AVX512
#endif

// Passes whose [T, N] streams exceed the last-level cache find nothing they write in cache
// afterwards, and an ordinary store first reads the line it writes (write-allocate): 20 B of
// memory traffic per fp32 neuron-step in the forward instead of 12, 16 instead of 12 in the
// backward. Those passes compute each step of a block into an L1-resident staging row and
// write it out with non-temporal stores, which skip that read. Smaller passes store
// directly, leaving their outputs in cache for the next op.
// PLIF_CPU_LLC_MB when set (a VM may describe its caches wrongly), else the largest cache of
// CPU 0 as Linux describes it (sysfs); glibc's sysconf answers from cpuid, which on an AMD guest
// reports the host's L3 summed over its dies (384 MiB where a core shares 32 MiB).
int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    if (const char* mib = std::getenv("PLIF_CPU_LLC_MB")) {
      char* end = nullptr;
      const double value = std::strtod(mib, &end);
      if (end != mib && *end == '\0' && value > 0) return static_cast<int64_t>(value * (1 << 20));
    }
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
      int64_t size = 0;
      std::string unit;
      if (!(file >> size)) continue;
      file >> unit;
      const int64_t scale = unit == "K" ? 1 << 10 : unit == "M" ? 1 << 20 : unit == "G" ? 1 << 30 : 1;
      largest = std::max(largest, size * scale);
    }
    if (largest > 0) return largest;
    const long reported = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : int64_t(32) << 20;
  }();
  return bytes;
}

// Copies a staged row to memory with non-temporal stores of whole 64-byte lines where the CPU
// has AVX-512, else of 32 or 16 bytes (on the AMD EPYC guest of benchmarks/NOTES.md, 16-byte
// ones, four per line, made the forward 20% slower); the unaligned ends go through ordinary
// stores. One function per store width, each compiled for its instruction set (the intrinsics
// need it), all from this one body; each returns the bytes it wrote, the tail left to stream_row.
#define PLIF_STREAM_ROW(NAME, TARGET, WIDTH, STORE)                                                \
  TARGET size_t NAME(char* d, const char* s, size_t bytes) {                                       \
    const size_t head = std::min(bytes, (WIDTH - reinterpret_cast<uintptr_t>(d) % WIDTH) % WIDTH); \
    std::memcpy(d, s, head);                                                                       \
    size_t done = head;                                                                            \
    for (; bytes - done >= WIDTH; done += WIDTH) STORE;                                            \
    return done;                                                                                   \
  }
#if defined(__x86_64__) && defined(__GNUC__)
PLIF_STREAM_ROW(stream_lines_avx512, __attribute__((target("avx512f"))), 64,
                _mm512_stream_si512(reinterpret_cast<__m512i*>(d + done), _mm512_loadu_si512(s + done)))
PLIF_STREAM_ROW(stream_lines_avx, __attribute__((target("avx"))), 32,
                _mm256_stream_si256(reinterpret_cast<__m256i*>(d + done),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + done))))
#endif
#if defined(__SSE2__)
PLIF_STREAM_ROW(stream_lines_sse2, , 16,
                _mm_stream_si128(reinterpret_cast<__m128i*>(d + done),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + done))))
#endif
#undef PLIF_STREAM_ROW

void stream_row(void* dst, const void* src, size_t bytes) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  size_t done = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  static const int width = __builtin_cpu_supports("avx512f") ? 64 : __builtin_cpu_supports("avx") ? 32 : 16;
  done = width == 64   ? stream_lines_avx512(d, s, bytes)
         : width == 32 ? stream_lines_avx(d, s, bytes)
                       : stream_lines_sse2(d, s, bytes);
#elif defined(__SSE2__)
  done = stream_lines_sse2(d, s, bytes);
#endif
  std::memcpy(d + done, s + done, bytes - done);
}

// Streaming stores are weakly ordered: fenced before a block's results count as written.
void fence_streamed_rows() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Requests VALUES values of a row for the next step while this one computes: each step reads
// runs of kBlock values from rows N values apart, too short for the hardware prefetchers to get
// ahead of. A streaming pass (its data exceeds the last-level cache) asks for non-temporal
// lines: read once, they are not kept in the outer caches when they leave L1/L2, so the pass
// no longer flushes what the caller keeps there (the interpreter, the next layer's weights).
// On the EPYC guest of benchmarks/NOTES.md that kept a 4 MiB working set 1.6x faster to walk
// after a pass, and the passes themselves ran 3-5% faster.
template <int VALUES, typename T>
PLIF_HD void prefetch_row(const T* row, bool streaming) {
  const char* bytes = reinterpret_cast<const char*>(row);
  if (streaming) {
    for (size_t offset = 0; offset < VALUES * sizeof(T); offset += 64) __builtin_prefetch(bytes + offset, 0, 0);
  } else {
    for (size_t offset = 0; offset < VALUES * sizeof(T); offset += 64) __builtin_prefetch(bytes + offset);
  }
}

// Requests a row needed a few microseconds from now into L2, where L1 would not keep it.
template <int VALUES, typename T>
PLIF_HD void prefetch_row_into_l2(const T* row) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (size_t offset = 0; offset < VALUES * sizeof(T); offset += 64) __builtin_prefetch(bytes + offset, 0, 2);
}

// The block's step-t rows in a one-step view (N = 0: a step's row offsets are then just the
// neuron offsets within the block), with the outputs redirected to staging rows when streaming.
template <typename in_t, typename acc_t>
struct ForwardStaging {
  in_t spikes[kBlock];
  in_t v_seq[kBlock];
  acc_t h_seq[kBlock];
};

// Where step t's H goes in h_seq (a checkpoint step's row in kSaveCheckpoints mode).
template <typename in_t, typename acc_t>
index_t h_row_offset(const ForwardParams<in_t, acc_t>& p, index_t t, index_t n0) {
  return (p.opts.h_checkpoints ? (is_checkpoint_step(t, p.T) ? checkpoint_row(t) : 0) : t) * p.N + n0;
}

template <typename in_t, typename acc_t>
ForwardParams<in_t, acc_t> forward_step_view(const ForwardParams<in_t, acc_t>& p, index_t t, index_t n0,
                                             ForwardStaging<in_t, acc_t>* staging) {
  ForwardParams<in_t, acc_t> view = p;
  const index_t row = t * p.N + n0;
  view.N = 0;
  view.x_step = 0;
  view.x = p.x + t * p.x_step + n0;
  view.spikes = staging ? staging->spikes : p.spikes + row;
  if (p.v_seq != nullptr) view.v_seq = staging ? staging->v_seq : p.v_seq + row;
  if (p.h_seq != nullptr) view.h_seq = staging ? staging->h_seq : p.h_seq + h_row_offset(p, t, n0);
  return view;
}

template <typename in_t, typename acc_t>
void stream_forward_step(const ForwardParams<in_t, acc_t>& p, index_t t, index_t n0,
                         const ForwardStaging<in_t, acc_t>& staging) {
  const index_t row = t * p.N + n0;
  stream_row(p.spikes + row, staging.spikes, sizeof(staging.spikes));
  if (p.v_seq != nullptr) stream_row(p.v_seq + row, staging.v_seq, sizeof(staging.v_seq));
  if (p.h_seq != nullptr && (!p.opts.h_checkpoints || is_checkpoint_step(t, p.T))) {
    stream_row(p.h_seq + h_row_offset(p, t, n0), staging.h_seq, sizeof(staging.h_seq));
  }
}

// The options a spiking block fixes at compile time (a mask of these bits), so that its step
// loop computes one side of each option's select instead of both: a third fewer instructions
// per neuron-step in the forward, a fifth fewer in the backward. kOptionsAtRunTime keeps them
// as they come (float64, and the smooth mode). detach_reset stays a run-time select: the forward
// never reads it, and in the backward it is one select off the multiplies' pipes, not worth
// twice the copies (benchmarks/NOTES.md, "The build after the AVX-512 copy").
enum OptionBits : int { kSoftReset = 1, kDecayInput = 2, kOptionsAtRunTime = -1 };
constexpr int kOptionMasks = (kSoftReset | kDecayInput) + 1;

template <int OPTIONS, typename Params>
PLIF_HD void fix_options(Params& p) {
  if constexpr (OPTIONS != kOptionsAtRunTime) {
    p.opts.soft_reset = (OPTIONS & kSoftReset) != 0;
    p.opts.decay_input = (OPTIONS & kDecayInput) != 0;
  }
}

template <typename acc_t>
int option_bits(const Options<acc_t>& o) {
  return (o.soft_reset ? kSoftReset : 0) | (o.decay_input ? kDecayInput : 0);
}

// k and v_init hold one value (stride 0) or one per neuron (stride 1); with the stride a
// constant, the per-neuron loads at a block's start vectorise instead of running one by one.
template <int K_STRIDE, int V_INIT_STRIDE, typename Params>
PLIF_HD Params with_strides(const Params& p) {
  Params view = p;
  view.k_stride = K_STRIDE;
  view.v_init_stride = V_INIT_STRIDE;
  return view;
}

// Calls fn(view of p) with k's and v_init's strides (0 or 1) fixed at compile time.
template <typename Params, typename Fn>
PLIF_HD void with_constant_strides(const Params& p, Fn fn) {
  dispatch_flag(p.k_stride != 0, [&](auto k_stride) PLIF_INLINE_BODY {
    dispatch_flag(p.v_init_stride != 0, [&](auto v_init_stride) PLIF_INLINE_BODY {
      fn(with_strides<decltype(k_stride)::value, decltype(v_init_stride)::value>(p));
    });
  });
}

template <typename in_t, typename acc_t>
PLIF_HD void forward_begin_groups(const ForwardParams<in_t, acc_t>& p, index_t n0, ForwardState<kLanes, acc_t>* state) {
  for (int g = 0; g < kGroups; ++g) forward_begin<kLanes>(p, n0 + g * kLanes, state[g]);
}

template <int SURROGATE, int OPTIONS, typename in_t, typename acc_t>
PLIF_HD void forward_block(const ForwardParams<in_t, acc_t>& given, index_t n0, index_t following_n0, bool stream) {
  ForwardParams<in_t, acc_t> p = given;
  fix_options<OPTIONS>(p);
  ForwardState<kLanes, acc_t> state[kGroups];
  ForwardStaging<in_t, acc_t> staging;
  with_constant_strides(
      p, [&](const ForwardParams<in_t, acc_t>& view) PLIF_INLINE_BODY { forward_begin_groups(view, n0, state); });
  for (index_t t = 0; t < p.T; ++t) {
    ForwardParams<in_t, acc_t> view = forward_step_view(p, t, n0, stream ? &staging : nullptr);
    fix_options<OPTIONS>(view);
    // Each group requests its part of the next step's X, as the backward does (see there), and
    // of the X kForwardStepsIntoL2 steps ahead into L2 (the few misses a core keeps in flight into
    // L1 leave memory idle: -12% forward time at 2^20 on one thread, benchmarks/NOTES.md); near
    // the end, the rows of the block this thread takes next.
    for (int g = 0; g < kGroups; ++g) {
      if (t + 1 < p.T)
        prefetch_row<kLanes>(p.x + (t + 1) * p.x_step + n0 + g * kLanes, stream);
      else if (following_n0 >= 0)
        prefetch_row<kLanes>(p.x + following_n0 + g * kLanes, stream);
      const index_t ahead = t + kForwardStepsIntoL2;
      if (ahead < p.T)
        prefetch_row_into_l2<kLanes>(p.x + ahead * p.x_step + n0 + g * kLanes);
      else if (following_n0 >= 0 && ahead - p.T < p.T)
        prefetch_row_into_l2<kLanes>(p.x + (ahead - p.T) * p.x_step + following_n0 + g * kLanes);
      forward_step<kLanes, SURROGATE>(view, t, g * kLanes, state[g]);
    }
    if (stream) stream_forward_step(p, t, n0, staging);
  }
  if (stream) {
    // v_last too goes out through a staging row, H's (free after the last step): an ordinary
    // store would read each line first.
    ForwardParams<in_t, acc_t> staged = p;
    staged.v_last = staging.h_seq;
    for (int g = 0; g < kGroups; ++g) forward_end<kLanes>(staged, g * kLanes, state[g]);
    stream_row(p.v_last + n0, staging.h_seq, kBlock * sizeof(acc_t));
    fence_streamed_rows();
  } else {
    for (int g = 0; g < kGroups; ++g) forward_end<kLanes>(p, n0 + g * kLanes, state[g]);
  }
}

template <typename in_t, typename acc_t>
BackwardParams<in_t, acc_t> backward_step_view(const BackwardParams<in_t, acc_t>& p, index_t t, index_t n0,
                                               in_t* grad_x_staging) {
  BackwardParams<in_t, acc_t> view = p;
  const index_t row = t * p.N + n0;
  view.N = 0;
  if (p.grad_spikes != nullptr) view.grad_spikes = p.grad_spikes + row;
  if (p.grad_v_seq != nullptr) view.grad_v_seq = p.grad_v_seq + row;
  if (p.grad_v_last != nullptr) view.grad_v_last = p.grad_v_last + n0;
  view.v_init = p.v_init + n0 * p.v_init_stride;
  view.grad_x = grad_x_staging ? grad_x_staging : p.grad_x + row;
  return view;
}

// h_last: H[T-1] of the block's first neuron.
template <int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void backward_begin_groups(const BackwardParams<in_t, acc_t>& p, index_t n0, const acc_t* h_last,
                                   BackwardState<kLanes, acc_t>* state) {
  for (int g = 0; g < kGroups; ++g)
    backward_begin<kLanes, SURROGATE>(p, n0 + g * kLanes, h_last + g * kLanes, state[g]);
}

template <int SURROGATE, typename in_t, typename acc_t>
PLIF_HD void begin_block(const BackwardParams<in_t, acc_t>& p, index_t n0, const acc_t* h_last,
                         BackwardState<kLanes, acc_t>* state) {
  dispatch_flag(p.k_stride != 0, [&](auto k_stride) PLIF_INLINE_BODY {
    backward_begin_groups<SURROGATE>(with_strides<decltype(k_stride)::value, 0>(p), n0, h_last, state);
  });
}

// Step t of every group of the block, H[t-1] and dH[t]/dk of the block's first neuron in
// h_prev_row and dh_dk_row.
template <int SURROGATE, int OPTIONS, typename in_t, typename acc_t>
PLIF_HD void backward_block_step(const BackwardParams<in_t, acc_t>& p, index_t t, index_t n0, index_t following_n0,
                                 const acc_t* h_prev_row, const acc_t* dh_dk_row, in_t* grad_x_staging,
                                 BackwardState<kLanes, acc_t>* state) {
  BackwardParams<in_t, acc_t> view = backward_step_view(p, t, n0, grad_x_staging);
  fix_options<OPTIONS>(view);
  // Each group requests its own part of the next step's rows: spread over the step, the
  // requests find free miss buffers, where the whole block's at once stalled the backward
  // (benchmarks/NOTES.md, "The backward's arithmetic"). Step 0 requests the first rows of the block this
  // thread takes next (following_n0, if any): its last chunk's checkpoint and dL/dS[T-1].
  // Each step also requests one step's X and dL/dS rows of the next chunk to recompute (this
  // block's chunk before, or after chunk 0 the next block's last chunk) into L2: this step's
  // arithmetic hides the requests, which the recompute (light on arithmetic) and the first steps
  // back would otherwise wait on.
  const bool stream = grad_x_staging != nullptr;
  const index_t chunk = t / kCheckpointSteps, step_in_chunk = t % kCheckpointSteps;
  const index_t last_chunk = (p.T - 1) / kCheckpointSteps;
  index_t t_ahead = -1, n_ahead = n0;
  if (chunk > 0) {
    t_ahead = (chunk - 1) * kCheckpointSteps + step_in_chunk;
  } else if (following_n0 >= 0 && last_chunk * kCheckpointSteps + step_in_chunk < p.T) {
    t_ahead = last_chunk * kCheckpointSteps + step_in_chunk;
    n_ahead = following_n0;
  }
  for (int g = 0; g < kGroups; ++g) {
    const index_t next = n0 + g * kLanes;
    if (t >= 1 && p.grad_spikes != nullptr) prefetch_row<kLanes>(p.grad_spikes + (t - 1) * p.N + next, stream);
    if (t_ahead >= 0) {
      prefetch_row_into_l2<kLanes>(p.x + t_ahead * p.x_step + n_ahead + g * kLanes);
      if (p.grad_spikes != nullptr) prefetch_row_into_l2<kLanes>(p.grad_spikes + t_ahead * p.N + n_ahead + g * kLanes);
    }
    if (t == 0 && following_n0 >= 0) {
      const index_t ahead = following_n0 + g * kLanes;
      if (p.grad_spikes != nullptr) prefetch_row<kLanes>(p.grad_spikes + (p.T - 1) * p.N + ahead, stream);
      if (last_chunk > 0) prefetch_row<kLanes>(p.h_seq + (last_chunk - 1) * p.N + ahead, stream);
    }
    backward_step<kLanes, SURROGATE>(view, t, g * kLanes, t > 0 ? h_prev_row + g * kLanes : nullptr,
                                     dh_dk_row + g * kLanes, state[g]);
  }
  if (grad_x_staging != nullptr) stream_row(p.grad_x + t * p.N + n0, grad_x_staging, kBlock * sizeof(in_t));
}

// kSaveCheckpoints: each chunk of kCheckpointSteps steps, from the last, has its H recomputed
// into rows that stay in the core's caches, then is walked back (see backward_scan).
template <int SURROGATE, int OPTIONS, typename in_t, typename acc_t>
PLIF_HD void backward_block_recomputing(const BackwardParams<in_t, acc_t>& p, index_t n0, index_t following_n0,
                                        in_t* grad_x_staging, BackwardState<kLanes, acc_t>* state) {
  // h_rows[i + 1]: H[t0 + i] of the block; h_rows[0]: the checkpoint H[t0 - 1]; dh_dk_rows[i]:
  // dH/dk at t0 + i.
  acc_t h_rows[kCheckpointSteps + 1][kBlock], dh_dk_rows[kCheckpointSteps][kBlock];
  const index_t last_chunk = (p.T - 1) / kCheckpointSteps;
  for (index_t chunk = last_chunk; chunk >= 0; --chunk) {
    const index_t t0 = chunk * kCheckpointSteps;
    const int count = static_cast<int>(std::min<index_t>(kCheckpointSteps, p.T - t0));
    ForwardState<kLanes, acc_t> forward_state[kGroups];
    with_constant_strides(p, [&](const BackwardParams<in_t, acc_t>& view) {
      for (int g = 0; g < kGroups; ++g) {
        recompute_chunk_begin<kLanes, SURROGATE>(view, chunk, n0 + g * kLanes, forward_state[g],
                                                 h_rows[0] + g * kLanes);
      }
    });
    for (int i = 0; i < count; ++i) {
      const in_t* const x_row = p.x + (t0 + i) * p.x_step + n0;
      for (int g = 0; g < kGroups; ++g) {
        if (i + 1 < count) prefetch_row<kLanes>(x_row + p.x_step + g * kLanes, grad_x_staging != nullptr);
        recompute_step<kLanes, SURROGATE>(x_row + g * kLanes, p.opts, forward_state[g], h_rows[i + 1] + g * kLanes,
                                          dh_dk_rows[i] + g * kLanes);
      }
    }
    if (chunk == last_chunk) begin_block<SURROGATE>(p, n0, h_rows[count], state);
    for (int i = count - 1; i >= 0; --i) {
      backward_block_step<SURROGATE, OPTIONS>(p, t0 + i, n0, following_n0, h_rows[i], dh_dk_rows[i], grad_x_staging,
                                              state);
    }
  }
}

// Where k (v_init) is one value for the layer, dL/dk (dL/dv_init) is the sum of every neuron's
// share (plif_math.h's sum_in_fixed_order): each block sums its neurons' shares into a slot of
// its own, and ShareSums sums the slots; nothing per neuron is written. Null: per neuron.
struct ShareSlots {
  double* grad_k;
  double* grad_v_init;
};

// A block's row of per-neuron shares: summed into its slot, written out at neuron n0, or dropped
// where out is null (a gradient the caller does not ask for).
template <typename acc_t>
PLIF_HD void emit_shares(acc_t* out, index_t n0, const acc_t* row, index_t count, bool stream, double* slot) {
  if (slot != nullptr) {
    *slot = sum_in_fixed_order(row, count);
  } else if (out == nullptr) {
    return;
  } else if (stream) {
    stream_row(out + n0, row, count * sizeof(acc_t));
  } else {
    std::memcpy(out + n0, row, count * sizeof(acc_t));
  }
}

template <int SURROGATE, int OPTIONS, typename in_t, typename acc_t>
PLIF_HD void backward_block(const BackwardParams<in_t, acc_t>& given, index_t n0, index_t following_n0, bool stream,
                            ShareSlots slots) {
  BackwardParams<in_t, acc_t> p = given;
  fix_options<OPTIONS>(p);
  BackwardState<kLanes, acc_t> state[kGroups];
  in_t grad_x_staging[kBlock];
  in_t* const staging = stream ? grad_x_staging : nullptr;
  backward_block_recomputing<SURROGATE, OPTIONS>(p, n0, following_n0, staging, state);
  // The per-neuron gradients go through rows on the stack: out with streaming stores when the
  // pass streams (an ordinary store would read each line first), or into their sums.
  acc_t grad_k_row[kBlock], grad_v_init_row[kBlock];
  BackwardParams<in_t, acc_t> staged = p;
  staged.grad_k = grad_k_row;
  staged.grad_v_init = grad_v_init_row;
  for (int g = 0; g < kGroups; ++g) backward_end<kLanes>(staged, g * kLanes, state[g]);
  emit_shares(p.grad_k, n0, grad_k_row, kBlock, stream, slots.grad_k);
  emit_shares(p.grad_v_init, n0, grad_v_init_row, kBlock, stream, slots.grad_v_init);
  if (stream) fence_streamed_rows();
}

// The block loops in one copy per instruction set where the option mask is fixed (spiking mode,
// float32 and the half types: what training runs), in one baseline copy elsewhere (float64, the
// smooth mode): benchmarks/NOTES.md, "CPU compile-time specialisations", says what each pays.
template <int SURROGATE, int OPTIONS, typename in_t, typename acc_t>
PLIF_ISA_CLONES void forward_block_per_isa(const ForwardParams<in_t, acc_t>& p, index_t n0, index_t following_n0,
                                           bool stream) {
  forward_block<SURROGATE, OPTIONS>(p, n0, following_n0, stream);
}

template <int SURROGATE, int OPTIONS, typename in_t, typename acc_t>
PLIF_ISA_CLONES_WITH_AVX512 void backward_block_per_isa(const BackwardParams<in_t, acc_t>& p, index_t n0,
                                                        index_t following_n0, bool stream, ShareSlots slots) {
  backward_block<SURROGATE, OPTIONS>(p, n0, following_n0, stream, slots);
}

// The neurons from n_begin on, as a view whose neuron 0 is n_begin (rows keep their stride N;
// grad_k and grad_v_init are left for the caller to place).
template <typename in_t, typename acc_t>
BackwardParams<in_t, acc_t> neurons_from(const BackwardParams<in_t, acc_t>& p, index_t n_begin) {
  const auto shifted = [n_begin](auto* values) { return values == nullptr ? values : values + n_begin; };
  BackwardParams<in_t, acc_t> view = p;
  view.grad_spikes = shifted(p.grad_spikes);
  view.grad_v_last = shifted(p.grad_v_last);
  view.grad_v_seq = shifted(p.grad_v_seq);
  view.h_seq = shifted(p.h_seq);
  view.x = shifted(p.x);
  view.k = p.k + n_begin * p.k_stride;
  view.v_init = p.v_init + n_begin * p.v_init_stride;
  view.grad_x = p.grad_x + n_begin;
  return view;
}

// Neurons [n_begin, n_end) (at most kBlock) one group of lanes (then one neuron) at a time,
// through all T steps: the N % kBlock neurons after the last block, and the blocks of the
// float32/float64 checkpoint mode.
template <int SURROGATE, typename in_t, typename acc_t>
void backward_scans(const BackwardParams<in_t, acc_t>& p, index_t n_begin, index_t n_end, ShareSlots slots) {
  BackwardParams<in_t, acc_t> view = neurons_from(p, n_begin);
  acc_t grad_k_row[kBlock], grad_v_init_row[kBlock];
  view.grad_k = slots.grad_k != nullptr || p.grad_k == nullptr ? grad_k_row : p.grad_k + n_begin;
  view.grad_v_init =
      slots.grad_v_init != nullptr || p.grad_v_init == nullptr ? grad_v_init_row : p.grad_v_init + n_begin;
  const index_t count = n_end - n_begin;
  index_t n = 0;
  for (; n + kLanes <= count; n += kLanes) backward_scan<kLanes, SURROGATE>(view, n);
  for (; n < count; ++n) backward_scan<1, SURROGATE>(view, n);
  if (slots.grad_k != nullptr) *slots.grad_k = sum_in_fixed_order(grad_k_row, count);
  if (slots.grad_v_init != nullptr) *slots.grad_v_init = sum_in_fixed_order(grad_v_init_row, count);
}

// One slot per block and one for the neurons after the last block, where k (v_init) is one value.
template <typename acc_t>
class ShareSums {
 public:
  template <typename in_t>
  explicit ShareSums(const BackwardParams<in_t, acc_t>& p) {
    const size_t slots = static_cast<size_t>(p.N / kBlock) + 1;
    if (p.k_stride == 0 && p.grad_k != nullptr) grad_k_.assign(slots, 0.0);
    if (p.v_init_stride == 0 && p.grad_v_init != nullptr) grad_v_init_.assign(slots, 0.0);
  }

  ShareSlots slots_of_block(index_t block) {
    return {grad_k_.empty() ? nullptr : &grad_k_[block], grad_v_init_.empty() ? nullptr : &grad_v_init_[block]};
  }

  template <typename in_t>
  void store(const BackwardParams<in_t, acc_t>& p) const {
    if (!grad_k_.empty()) p.grad_k[0] = static_cast<acc_t>(in_order(grad_k_));
    if (!grad_v_init_.empty()) p.grad_v_init[0] = static_cast<acc_t>(in_order(grad_v_init_));
  }

 private:
  static double in_order(const std::vector<double>& slots) {
    return sum_in_fixed_order(slots.data(), static_cast<index_t>(slots.size()));
  }

  std::vector<double> grad_k_;
  std::vector<double> grad_v_init_;
};

// The blocks of a pass split into one contiguous range per thread, the same ranges for every pass
// of a size: a block's forward and backward run on the same thread, so the lines one pass leaves
// in that core's caches are where the next pass looks for them. (On the EPYC guest of
// benchmarks/NOTES.md, whose two vCPUs sit on two CCDs in some minutes, a shared counter that
// sent each block to either thread made passes that stay in cache 2-5x slower in those minutes.)
// A thread whose range is done takes blocks from the back of the others': one that starts late
// or loses its core leaves the rest of its range to them instead of holding them at the end.
class BlockRanges {
 public:
  BlockRanges(int64_t blocks, int64_t threads) : ranges_(threads) {
    // Fronts and backs fit 32 bits: 2^32 blocks would be 2^42 neurons.
    for (int64_t t = 0; t < threads; ++t) ranges_[t].store(pack(blocks * t / threads, blocks * (t + 1) / threads));
  }

  // The next block for thread `self`: the front of its own range, else the back of another's;
  // -1 once every range is empty.
  int64_t claim(int64_t self) {
    const int64_t count = static_cast<int64_t>(ranges_.size());
    int64_t block = take(ranges_[self], /*from_front=*/true);
    for (int64_t k = 1; block < 0 && k < count; ++k) block = take(ranges_[(self + k) % count], /*from_front=*/false);
    return block;
  }

 private:
  static uint64_t pack(uint64_t front, uint64_t back) { return front << 32 | back; }

  static int64_t take(std::atomic<uint64_t>& range, bool from_front) {
    uint64_t packed = range.load();
    for (;;) {
      const uint64_t front = packed >> 32, back = packed & 0xffffffffu;
      if (front >= back) return -1;
      const uint64_t rest = from_front ? pack(front + 1, back) : pack(front, back - 1);
      if (range.compare_exchange_weak(packed, rest)) return static_cast<int64_t>(from_front ? front : back - 1);
    }
  }

  std::vector<std::atomic<uint64_t>> ranges_;  // per thread: front << 32 | back
};

// Whole blocks in parallel (BlockRanges), then tail(p, n) for the N % kBlock neurons from n on,
// if any.
template <typename Params, typename BlockFn, typename TailFn>
void for_each_neuron(const Params& p, BlockFn block, TailFn tail) {
  const index_t blocks = p.N / kBlock;
  // At least ~2^17 neuron-steps (tens of microseconds) per thread: below that, waking a second
  // thread costs more than it saves.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks * p.T * kBlock >> 17));
  BlockRanges ranges(blocks, threads);
  // Chunk t of the parallel_for runs on the pool's thread t in every call.
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t self = begin; self < end; ++self) {
      // Each thread claims its next block before it walks this one, so that this one's last step
      // can request the next one's first rows.
      for (int64_t b = ranges.claim(self); b >= 0;) {
        const int64_t following = ranges.claim(self);
        block(p, b * kBlock, following >= 0 ? following * kBlock : index_t(-1));
        b = following;
      }
    }
  });
  if (blocks * kBlock < p.N) tail(p, blocks * kBlock);
}

// Bytes of the [T, N] streams a pass reads and writes: above the last-level cache it streams.
template <typename in_t>
bool exceeds_cache(index_t T, index_t N, int64_t streams) {
  return T * N * static_cast<int64_t>(sizeof(in_t)) * streams > last_level_cache_bytes();
}

// Calls fn(IntConstant<OPTIONS>) with the option mask fixed, or kOptionsAtRunTime where fixing
// it is not worth eight copies (float64, the smooth mode).
template <int SURROGATE, typename acc_t, typename Fn>
void with_options(const Options<acc_t>& o, Fn fn) {
  if constexpr (SURROGATE == kRuntime || sizeof(acc_t) != sizeof(float)) {
    fn(IntConstant<kOptionsAtRunTime>());
  } else {
    dispatch_below<kOptionMasks>(option_bits(o), fn);
  }
}

template <int SURROGATE, typename in_t, typename acc_t>
void forward_in_mode(const ForwardParams<in_t, acc_t>& p) {
  const bool stream =
      exceeds_cache<in_t>(p.T, p.N, 2 + (p.v_seq != nullptr) + (p.h_seq != nullptr && !p.opts.h_checkpoints));
  with_options<SURROGATE>(p.opts, [&](auto options) {
    for_each_neuron(
        p,
        [stream](const ForwardParams<in_t, acc_t>& q, index_t n0, index_t following_n0) {
          constexpr int kOptions = decltype(options)::value;
          if constexpr (kOptions == kOptionsAtRunTime) {
            forward_block<SURROGATE, kOptions>(q, n0, following_n0, stream);
          } else {
            forward_block_per_isa<SURROGATE, kOptions>(q, n0, following_n0, stream);
          }
        },
        [](const ForwardParams<in_t, acc_t>& q, index_t n_begin) {
          index_t n = n_begin;
          for (; n + kLanes <= q.N; n += kLanes) forward_scan<kLanes, SURROGATE>(q, n);
          for (; n < q.N; ++n) forward_scan<1, SURROGATE>(q, n);
        });
  });
}

template <int SURROGATE, typename in_t, typename acc_t>
void backward_in_mode(const BackwardParams<in_t, acc_t>& p) {
  ShareSums<acc_t> sums(p);
  const auto tail = [&sums](const BackwardParams<in_t, acc_t>& q, index_t n_begin) {
    backward_scans<SURROGATE>(q, n_begin, q.N, sums.slots_of_block(q.N / kBlock));
  };
  if (!p.opts.h_checkpoints) {
    // From every H: what tests compare the checkpoints' backward with (training keeps checkpoints),
    // so the plain scans, a block loop fewer to build per variant.
    for_each_neuron(
        p,
        [&sums](const BackwardParams<in_t, acc_t>& q, index_t n0, index_t) {
          backward_scans<SURROGATE>(q, n0, n0 + kBlock, sums.slots_of_block(n0 / kBlock));
        },
        tail);
    return sums.store(p);
  }
  const bool stream = exceeds_cache<in_t>(p.T, p.N, 2 + (p.grad_spikes != nullptr) + (p.grad_v_seq != nullptr));
  with_options<SURROGATE>(p.opts, [&](auto options) {
    for_each_neuron(
        p,
        [stream, &sums](const BackwardParams<in_t, acc_t>& q, index_t n0, index_t following_n0) {
          constexpr int kOptions = decltype(options)::value;
          if constexpr (kOptions == kOptionsAtRunTime) {
            backward_block<SURROGATE, kOptions>(q, n0, following_n0, stream, sums.slots_of_block(n0 / kBlock));
          } else {
            backward_block_per_isa<SURROGATE, kOptions>(q, n0, following_n0, stream, sums.slots_of_block(n0 / kBlock));
          }
        },
        tail);
  });
  sums.store(p);
}

}  // namespace

// One mode's forward kernels (every option mask) and one surrogate's backward kernels, each
// instantiated by one plif_cpu_forward_*.cpp or plif_cpu_backward_*.cpp file (plif_cpu_parts.h).
template <int MODE, typename in_t, typename acc_t>
void forward_with_mode(const ForwardParams<in_t, acc_t>& p) {
  forward_in_mode<MODE>(p);
}

template <int SURROGATE, typename in_t, typename acc_t>
void backward_with_surrogate(const BackwardParams<in_t, acc_t>& p) {
  backward_in_mode<SURROGATE>(p);
}

}  // namespace plif
