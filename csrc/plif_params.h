// Parameters of the fused multi-step PLIF kernels, shared by the CPU kernel, the CUDA
// extension and the NVRTC (CuPy) path. Plain C++ only: NVRTC compiles this file too, so
// no standard-library headers here.
#pragma once

namespace plif {

// 64-bit indices everywhere: T * N may exceed 2^31 elements.
typedef long long index_t;

// Surrogate ids, in the order of the names the library exports (plif_cuda._C.SURROGATES).
enum SurrogateId : int { kSigmoid, kAtan, kPiecewiseQuadratic, kPiecewiseExp, kSoftSign, kSuperSpike, kErf };

// What a forward keeps for the backward (plif_ops.cpp's save_mode_for decides; exported as
// plif_cuda._C.SAVE_*). kSaveCheckpoints keeps H only at the last step of every chunk of
// kCheckpointSteps steps but the final one (rows K-1, 2K-1, ...: (T-1)/K rows of N), and the
// backward, given X as well, recomputes each chunk's H from X and the checkpoint before it:
// bit for bit the H the forward computed. kSaveH (every H) serves tests and the CPU backward's
// comparison only.
enum SaveMode : int { kSaveNothing = 0, kSaveH = 1, kSaveCheckpoints = 2 };
enum CheckpointGeometry : int { kCheckpointSteps = 8 };

// Rows of H kept in kSaveCheckpoints mode for T steps.
inline index_t checkpoint_rows(index_t T) { return T > 0 ? (T - 1) / kCheckpointSteps : 0; }

// Options that are uniform over the whole launch. They are runtime values, not template
// parameters: every neuron takes the same branch, so on a GPU the branch is warp-uniform
// and on a CPU the compiler hoists it out of the vectorised loops.
template <typename acc_t>
struct Options {
  acc_t v_threshold;
  acc_t v_reset;  // 0 for soft reset
  acc_t alpha;
  int surrogate;
  bool soft_reset;
  bool decay_input;
  bool detach_reset;
  bool spiking;
  bool h_checkpoints;  // h_seq holds the checkpoint rows only (kSaveCheckpoints)
};

// The boolean options packed into one int, for kernels that take scalar arguments only
// (plif_kernels.cuh).
enum OptionFlags : int {
  kFlagSoftReset = 1,
  kFlagDecayInput = 2,
  kFlagDetachReset = 4,
  kFlagSpiking = 8,
  kFlagHCheckpoints = 16
};

template <typename acc_t>
inline int option_flags(const Options<acc_t>& o) {
  return (o.soft_reset ? kFlagSoftReset : 0) | (o.decay_input ? kFlagDecayInput : 0) |
         (o.detach_reset ? kFlagDetachReset : 0) | (o.spiking ? kFlagSpiking : 0) |
         (o.h_checkpoints ? kFlagHCheckpoints : 0);
}

// The kernels' scalar arguments, in their parameter order (plif_kernels.cuh), passed to `fn`.
// Every launcher passes exactly these: the nvcc one (plif_cuda.cu) and the NVRTC one
// (plif_ops.cpp hands them to plif_cuda/cupy_backend.py). launch_flags: the launcher's choices
// added to the options' flags (the forward's memory path, plif_launch.h).
template <typename Params, typename Fn>
inline void with_scalar_arguments(const Params& p, Fn fn, int launch_flags = 0) {
  fn(p.k_stride, p.v_init_stride, p.T, p.N, p.x_step, p.opts.v_threshold, p.opts.v_reset, p.opts.alpha,
     p.opts.surrogate, option_flags(p.opts) | launch_flags);
}

// Memory layout: every [T, N] tensor is contiguous with time outermost (element (t, n) at
// t * N + n), except x, whose steps are x_step elements apart (element (t, n) at t * x_step + n):
// N where it is contiguous, 0 where one step is broadcast over time, any other value where it is
// a slice of a larger tensor. Every per-neuron tensor is [N] contiguous or, where its stride is
// 0, a single value shared by all neurons.
template <typename in_t, typename acc_t>
struct ForwardParams {
  const in_t* x;                    // [T, N], steps x_step apart
  const acc_t* k;                   // [N] or one value (k_stride = 0); k = sigmoid(w) = 1/tau
  const acc_t* v_init;              // [N] or one value (v_init_stride = 0)
  in_t* spikes;                     // [T, N]
  acc_t* v_last;                    // [N], in the compute dtype: the state a layer carries to its next call
  in_t* v_seq;                      // [T, N] or null (store_v_seq off)
  acc_t* h_seq;                     // [T, N], checkpoint rows only ([(T-1)/K, N], opts.h_checkpoints), or null
  index_t k_stride, v_init_stride;  // 0 where k (v_init) is one value, else 1
  index_t T, N, x_step;
  Options<acc_t> opts;
};

template <typename in_t, typename acc_t>
struct BackwardParams {
  const in_t* grad_spikes;   // [T, N] or null (zero)
  const acc_t* grad_v_last;  // [N] or null (zero)
  const in_t* grad_v_seq;    // [T, N] or null (zero)
  const acc_t* h_seq;        // [T, N]: H saved by the forward, or its checkpoint rows (opts.h_checkpoints)
  const in_t* x;             // [T, N], steps x_step apart: the forward's input where h_seq holds checkpoints, else null
  const acc_t* k;
  const acc_t* v_init;
  in_t* grad_x;  // [T, N]
  // dL/dk and dL/dv_init: [N], or one value, the sum of the neurons' shares, where k (v_init) is
  // one value (stride 0; plif_math.h's sum_in_fixed_order).
  acc_t* grad_k;
  acc_t* grad_v_init;
  // The GPU kernels' partial sums of those shares, one per thread block (at least the launch's
  // blocks), where k (v_init) is one value; else null, as always on CPU.
  double* grad_k_partials;
  double* grad_v_init_partials;
  index_t k_stride, v_init_stride;  // 0 where k (v_init) is one value, else 1
  index_t T, N, x_step;
  Options<acc_t> opts;
};

}  // namespace plif
