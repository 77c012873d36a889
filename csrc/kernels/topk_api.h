// The plain-C++ interface of the top-k row kernel: a dense student row against
// a sparse teacher row (kdfast/llm/topk.py defines the loss; csrc/topk_op.cpp
// calls this, topk_kernel.h implements it once per CPU capability).
//
// Per row, with S the row's k teacher indices:
//   renormalize: D(teacher_S || softmax(z_S / tau_s)), the gradient zero off S;
//   bucket: D over k + 1 outcomes, the last the mass off S: for the student
//     logsumexp(z_{not S} / tau_s) - logsumexp(z / tau_s), from one sweep of
//     the row with S's entries masked out (exact, never 1 - sum), and its
//     gradient spread over every entry off S;
//   plus hard_weight * CE(z, label) at temperature 1.
// The k (or k + 1) outcome divergence itself is the dense row kernel's
// (distill_rows on one short row), so every divergence and parameter of the
// dense loss is available with no second implementation.
#pragma once

#include <cstdint>

#include "kernel_api.h"

namespace kdfast {

// Row status codes of the top-k kernel beyond RowStatus (kernel_api.h).
// A row refused for its mass leaves the mass in row_loss (the op's message).
enum TopkRowStatus : int32_t {
  kIndexOutOfRange = 3,
  kIndexRepeated = 4,
  kLogprobNotFinite = 5,  // a log-prob (or the row's tail_logprobs) NaN or +inf
  kLogprobPositive = 6,   // one above mass_tolerance
  kMassOverOne = 7,       // their mass above 1 + mass_tolerance
};

struct TopkBatch {
  int64_t rows = 0, vocab = 0, k = 0;
  const void* student = nullptr;  // row i at student + i * student_row_stride (elements)
  int64_t student_row_stride = 0;
  DType student_dtype = DType::Float32;
  const int64_t* indices = nullptr;  // (rows, k) contiguous
  // (rows, k) contiguous teacher log-probabilities at temperature 1 over the
  // full vocabulary, any float dtype; each row is read once, rounded to the
  // lanes' type (float, double for a float64 student) and checked as
  // kdfast/llm/topk.py's check_topk_logprobs checks it: every entry finite or
  // -inf and at most mass_tolerance, the mass (with the tail's) at most
  // 1 + mass_tolerance.  temperature applies to them as to logits.
  const void* logprobs = nullptr;
  DType logprob_dtype = DType::Float32;
  // (rows,) the teacher's log-mass off S (the bucket tail's tail_logprobs), or null: then the
  // bucket is log(1 - mass), empty when -log(mass) <= empty_bucket_below (teacher_bucket in topk.py)
  const void* tail_logprobs = nullptr;
  DType tail_dtype = DType::Float32;
  double mass_tolerance = 0.0;
  double empty_bucket_below = 0.0;
  bool bucket = false;
  const int64_t* labels = nullptr;  // (rows,) or null; ignored rows have label == ignore_index
  int64_t ignore_index = -100;
  void* grad = nullptr;    // (rows, vocab) contiguous, student dtype (may be the student itself); null: no gradient
  bool stream_grad = false;
  double* row_loss = nullptr;    // (rows,) hard_weight * CE + soft_coef * D, unnormalised
  int32_t* row_status = nullptr; // (rows,) RowStatus / TopkRowStatus
};

// prm: the dense kernel's parameters (its weighting must be None: the top-k
// loss has none); rows [begin, end).
namespace cpu_default { void topk_rows(const DistillParams&, const TopkBatch&, int64_t begin, int64_t end); }
namespace avx2 { void topk_rows(const DistillParams&, const TopkBatch&, int64_t begin, int64_t end); }
namespace avx512 { void topk_rows(const DistillParams&, const TopkBatch&, int64_t begin, int64_t end); }
namespace avx512_bf16 { void topk_rows(const DistillParams&, const TopkBatch&, int64_t begin, int64_t end); }
void topk_rows(const DistillParams&, const TopkBatch&, int64_t begin, int64_t end);

}  // namespace kdfast
