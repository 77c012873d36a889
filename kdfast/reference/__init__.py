"""The reference oracle: every formula of docs/contract.md in plain PyTorch.

The tests compare every fused kernel with these functions, and the backends
fall back to them where no fused kernel runs.  ``kdfast.reference.<name>``
reaches the distillation formulas (:mod:`.distill`); DKD, Grouped KD, long-tailed KD
and the correlation losses have their own modules (:mod:`.dkd`, :mod:`.grouped_kd`,
:mod:`.longtail`, :mod:`.correlation`).
"""

from .correlation import correlation_loss_reference, dist_loss_reference
from .distill import (FORMULAS, WEIGHT_FORMULAS, ab, accumulation_dtype, check_labels, check_rows_defined, cross_entropy, distill_loss_reference,
                      divergence, entropy_weight, entropy_weight_from_entropy, given_weight, hellinger, jsd, kl, nan_or_posinf_rows,
                      nan_rows_where, reduce_rows, renyi, renyi_log_terms, revise_teacher_log_probs, reverse_kl, skew_kl, skew_reverse_kl, tvd,
                      wttm_weight, wttm_weight_from_logsumexps)
from .dkd import dkd_loss_reference
from .grouped_kd import grouped_kd_loss_reference
from .longtail import ltkd_loss_reference
