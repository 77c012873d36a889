"""kdfast: fused knowledge-distillation losses.

>>> import kdfast
>>> loss = kdfast.kd_loss(student_logits, teacher_logits, temperature=2.0)

The math contract is docs/contract.md; every backend matches the
pure-PyTorch reference in :mod:`kdfast.reference`.
"""

from .ops.extension import cpu_extension_available
from .config import DIVERGENCES, REDUCTIONS, WEIGHTINGS
from .ops.backends import available_backends
from .correlation_losses import correlation_loss, dist_loss, dkd_loss
from .losses import distill_loss, kd_loss, ttm_loss, wttm_loss
from .longtail import LTKDLoss, kd_group_decomposition, ltkd_loss
from .grouped_kd import GroupedKDLoss, grouped_kd_loss
from .label_revision import revised_teacher_probs, select_for_distillation
from .modules import CorrelationLoss, DISTLoss, DistillLoss, DKDLoss, KDLoss, TTMLoss, WTTMLoss
from .llm.fused_linear import (FusedLinearDistillLoss, FusedLinearTopKDistillLoss, fused_linear_distill_loss,
                           fused_linear_topk_distill_loss)
from .llm.topk import TopKDistillLoss, topk_distill_loss
from .llm.vocab_parallel import vocab_parallel_distill_loss
from .regression import (BatchPearsonLoss, DistributionalKDLoss, GaussianHead, GaussianKDLoss, PairwiseDifferenceLoss,
                         PairwiseOrderLoss, batch_pearson_loss, distributional_kd_loss, gaussian_kd_loss, gaussian_kl,
                         gaussian_nll_loss, pairwise_difference_loss, pairwise_order_loss)

__version__ = "0.1.0"


def cpu_capability() -> str:
    """The SIMD level of the CPU kernels ('avx512_bf16', 'avx512', 'avx2', 'default'), or 'unavailable'."""
    from .ops.extension import _C

    return _C.cpu_capability() if _C is not None else "unavailable"


def empty_cache() -> int:
    """Release the large gradient buffers the CPU kernels keep for reuse (see README, "Memory").

    Returns the bytes released (0 without the C++ extension).
    """
    from .ops.extension import _C

    return int(_C.empty_cache()) if _C is not None else 0


__all__ = [
    "CorrelationLoss",
    "DISTLoss",
    "DKDLoss",
    "DIVERGENCES",
    "REDUCTIONS",
    "WEIGHTINGS",
    "DistillLoss",
    "FusedLinearDistillLoss",
    "FusedLinearTopKDistillLoss",
    "KDLoss",
    "TTMLoss",
    "TopKDistillLoss",
    "WTTMLoss",
    "available_backends",
    "cpu_capability",
    "correlation_loss",
    "cpu_extension_available",
    "dist_loss",
    "distill_loss",
    "dkd_loss",
    "empty_cache",
    "fused_linear_distill_loss",
    "fused_linear_topk_distill_loss",
    "kd_loss",
    "topk_distill_loss",
    "ttm_loss",
    "vocab_parallel_distill_loss",
    "wttm_loss",
    "BatchPearsonLoss",
    "DistributionalKDLoss",
    "GaussianHead",
    "GaussianKDLoss",
    "PairwiseDifferenceLoss",
    "PairwiseOrderLoss",
    "batch_pearson_loss",
    "distributional_kd_loss",
    "gaussian_kd_loss",
    "gaussian_kl",
    "gaussian_nll_loss",
    "pairwise_difference_loss",
    "pairwise_order_loss",
    "LTKDLoss",
    "kd_group_decomposition",
    "ltkd_loss",
    "GroupedKDLoss",
    "grouped_kd_loss",
    "revised_teacher_probs",
    "select_for_distillation",
]
