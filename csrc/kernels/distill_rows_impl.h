// Instantiates the row skeleton for every divergence and dtype pair and
// defines `distill_rows` for the capability of the including translation unit.
#pragma once

#include <algorithm>
#include <cstdlib>

#include "dtype_pairs.h"
#include "narrow_rows.h"
#include "row_kernel.h"

namespace kdfast {
namespace KDFAST_CPU_CAPABILITY {

template <template <class> class Div, class V, class TT, class TS>
void run_rows(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  using S = typename V::value_type;
  using Kernel = RowKernel<Div, V, TT, TS>;
  const DivConsts& dc = prm.div;
  using Narrow = NarrowRows<Div, V, TT, TS>;
  with_scratch_rows<V, Kernel::kScratchRows>(b.vocab, b.row_status, begin, end, [&](S* scratch, int64_t padded) {
    const RowScratch<S> rows = Kernel::scratch_rows(scratch, padded, b.keep_shifted_logits);
    int64_t i = begin;
    if constexpr (Narrow::kApplies) {
      if (Narrow::eligible(prm, b)) {
        for (; i < end; i += Narrow::W) {
          const int count = int(std::min<int64_t>(Narrow::W, end - i));
          const uint32_t skeleton = Narrow::run(prm, b, i, count);
          for (int r = 0; r < count; ++r)
            if (skeleton >> r & 1u) Kernel::run(prm, dc, b, i + r, rows);
        }
      }
    }
    for (; i < end; ++i) Kernel::run(prm, dc, b, i, rows);
    // the chunk's streamed gradient is ordered before whatever the thread does next (the op's join)
    if (b.stream_grad) stream_fence();
  });
}

template <template <class> class Div, class V>
void dispatch_dtypes(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  const bool known = with_dtype_pair(b.teacher_dtype, b.student_dtype, [&](auto tt, auto ts) {
    run_rows<Div, V, typename decltype(tt)::type, typename decltype(ts)::type>(prm, b, begin, end);
  });
  if (!known)
    for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;  // unsupported pair: the op checks first
}

template <class V>
void dispatch(const DistillParams& prm, const DistillBatch& b, int64_t begin, int64_t end) {
  switch (prm.divergence) {
#define KDFAST_DISPATCH_DIVERGENCE(policy, name) \
    case Divergence::policy: return dispatch_dtypes<policy, V>(prm, b, begin, end);
    KDFAST_FOR_EACH_DIVERGENCE(KDFAST_DISPATCH_DIVERGENCE)
#undef KDFAST_DISPATCH_DIVERGENCE
    default: break;
  }
  for (int64_t i = begin; i < end; ++i) b.row_status[i] = -1;
}

}  // namespace KDFAST_CPU_CAPABILITY
}  // namespace kdfast
