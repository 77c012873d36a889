// The per-row weightings of the divergence term, once: the enum, the names and
// the dispatch switch expand this list.  Each entry is X(policy, "name"):
// `policy` is the enumerator and the policy struct of weightings.h; "name" is the
// entry of kdfast.registry.WEIGHTING_TABLE, in the same order
// (tests/test_registry.py compares the two through _C.weighting_names()).
#pragma once

#define KDFAST_FOR_EACH_WEIGHTING(X) \
  X(None, "none")                    \
  X(WTTM, "wttm")                    \
  X(Entropy, "entropy")              \
  X(Given, "given")
