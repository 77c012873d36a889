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
