// The input dtypes the ops take and the compute dtype of each, for the binding layers
// (plif_ops.cpp, plif_bn_cpu.cpp): float64 computes in float64, every other dtype in float32.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace plif {

inline at::ScalarType compute_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// fn(in_t{}, acc_t{}) for the four supported (input, compute) type pairs; any other dtype is an
// error naming the argument.
template <typename Fn>
void dispatch_types(at::ScalarType t, const char* name, Fn fn) {
  switch (t) {
    case at::kFloat: fn(float{}, float{}); break;
    case at::kDouble: fn(double{}, double{}); break;
    case at::kHalf: fn(c10::Half{}, float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}, float{}); break;
    default: TORCH_CHECK(false, name, " must be float16, bfloat16, float32 or float64, got ", t);
  }
}

}  // namespace plif
