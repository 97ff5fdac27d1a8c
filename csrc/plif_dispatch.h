// Run-time values turned into compile-time constants: dispatch calls a generic body once with
// std::integral_constant<int, V> for the V that a run-time value equals, so the body's templates
// are instantiated once per listed V and the running code branches once, outside the hot loops.
// The CPU drivers (plif_cpu_kernels.h) fix the option mask, the surrogate and the strides of k
// and v_init this way; the list of values is where each copy is paid for in build time.
#pragma once

#include <type_traits>
#include <utility>

// The dispatch and the bodies it calls are inlined into their caller: a kernel compiled once per
// instruction set (target_clones) runs a body that is not inlined in the baseline instruction
// set, without its vector units (benchmarks/NOTES.md, "CPU compile-time specialisations").
// PLIF_INLINE_BODY goes after a lambda's parameter list.
#if defined(__GNUC__)
#define PLIF_ALWAYS_INLINE __attribute__((always_inline)) inline
#define PLIF_INLINE_BODY __attribute__((always_inline))
#else
#define PLIF_ALWAYS_INLINE inline
#define PLIF_INLINE_BODY
#endif

namespace plif {

template <int V>
using IntConstant = std::integral_constant<int, V>;

// body(IntConstant<V>()) for the first V of CHOICES equal to value, else for the last of them
// (a value outside the list takes the last, as a switch's default would).
template <int FIRST, int... REST, typename Body>
PLIF_ALWAYS_INLINE void dispatch(int value, Body&& body) {
  if constexpr (sizeof...(REST) == 0) {
    body(IntConstant<FIRST>());
  } else if (value == FIRST) {
    body(IntConstant<FIRST>());
  } else {
    dispatch<REST...>(value, std::forward<Body>(body));
  }
}

namespace detail {
template <int... VALUES, typename Body>
PLIF_ALWAYS_INLINE void dispatch_sequence(std::integer_sequence<int, VALUES...>, int value, Body&& body) {
  dispatch<VALUES...>(value, std::forward<Body>(body));
}
}  // namespace detail

// body(IntConstant<value>()) for value in [0, COUNT); COUNT - 1 for anything else.
template <int COUNT, typename Body>
PLIF_ALWAYS_INLINE void dispatch_below(int value, Body&& body) {
  static_assert(COUNT > 0, "dispatch_below needs at least one value");
  detail::dispatch_sequence(std::make_integer_sequence<int, COUNT>(), value, std::forward<Body>(body));
}

// body(IntConstant<1>()) where flag is set, else body(IntConstant<0>()).
template <typename Body>
PLIF_ALWAYS_INLINE void dispatch_flag(bool flag, Body&& body) {
  dispatch<1, 0>(flag ? 1 : 0, std::forward<Body>(body));
}

}  // namespace plif
