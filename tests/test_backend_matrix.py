"""Every divergence x weighting x reduction x dtype: fused backends against the oracle.

Shape (5, 1029): 1029 = 1024 + 5 crosses a partial-sum flush boundary of the
C++ kernels and leaves a tail that is not a multiple of any vector width; for
the interpreted Triton kernel (tile 512) it is two full tiles and a partial one.
"""

import pytest
import torch

from conftest import assert_matches_oracle, kernels, logits
from kdfast.registry import divergence_cases

DIVERGENCES = divergence_cases()
WEIGHTINGS = [None, "wttm", "entropy", "tensor"]
REDUCTIONS = ["batchmean", "sum", "none"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
N, V = 5, 1029


def _options(weighting, with_labels):
    kw = {"temperature": 2.0}
    if weighting == "tensor":
        kw["weighting"] = torch.linspace(0.2, 1.8, N)
    else:
        kw["weighting"] = weighting
    if with_labels:
        kw.update(labels=torch.tensor([3, -100, 1028, 0, 517]), hard_weight=0.7, soft_weight=0.9,
                  student_temperature=1.5)
    return kw


@kernels
@pytest.mark.parametrize("with_labels", [False, True], ids=["soft", "hard+ignore"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS, ids=str)
@pytest.mark.parametrize("divergence,params", DIVERGENCES, ids=lambda x: str(x))
def test_kernel_matches_reference(divergence, params, weighting, reduction, dtype, with_labels, kernel):
    student, teacher = logits((N, V), dtype, seed=1), logits((N, V), dtype, seed=2)
    kw = dict(_options(weighting, with_labels), divergence=divergence, reduction=reduction, **params)
    assert_matches_oracle(student, teacher, kernel, **kw)


@kernels
@pytest.mark.parametrize("pair", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                  (torch.float16, torch.bfloat16), (torch.float32, torch.float16)], ids=str)
def test_mixed_dtypes(pair, kernel):
    """Teacher and student may differ in dtype; the gradient has the student's."""
    s_dtype, t_dtype = pair
    student, teacher = logits((4, 300), s_dtype, seed=3), logits((4, 300), t_dtype, seed=4)
    assert_matches_oracle(student, teacher, kernel, divergence="jsd", temperature=1.5)
