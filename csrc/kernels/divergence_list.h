// The divergences of the C++ kernels, once: the enum, the names the op parses
// and every dispatch switch expand this list.  Each entry is
// X(policy, "name"): `policy` is both the enumerator and the policy template of
// divergences.h; "name" is the table entry of kdfast/registry.py, in the same
// order (tests/test_registry.py compares the two through _C.divergence_names()).
#pragma once

#define KDFAST_FOR_EACH_DIVERGENCE(X) \
  X(KL, "kl")                         \
  X(ReverseKL, "reverse_kl")          \
  X(JSD, "jsd")                       \
  X(TVD, "tvd")                       \
  X(Renyi, "renyi")                   \
  X(AB, "ab")                         \
  X(SkewKL, "skew_kl")                \
  X(SkewReverseKL, "skew_reverse_kl") \
  X(Hellinger, "hellinger")

// The op's float[] params vector, in kdfast.registry.KERNEL_PARAMS's order (the
// same test compares them): every divergence's constants, unused ones 0, and the
// log-weights of the mixture m = w_p p + w_q q (possibly -inf), computed once in
// Python.  A new parameter is one line here and one there, not a new op argument.
#define KDFAST_FOR_EACH_KERNEL_PARAM(X) \
  X(alpha)                              \
  X(beta)                               \
  X(skew)                               \
  X(log_w_p)                            \
  X(log_w_q)
