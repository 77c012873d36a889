"""The fused C++ CPU op ``torch.ops.kdfast.distill_forward`` seen from Python.

The op itself is registered in C++ (csrc/distill_op.cpp, ``TORCH_LIBRARY``);
its fake kernel and autograd formula are the shared ones of ``_fused_op``.
"""

from __future__ import annotations

import torch

from ._fused_op import call_distill_op, register_fake_and_autograd
from ._options import LossConfig

register_fake_and_autograd("kdfast::distill_forward")


def distill_loss_cpu(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The fused C++ kernel; same contract as ``reference.distill_loss_reference``."""
    return call_distill_op(torch.ops.kdfast.distill_forward, student_logits, teacher_logits, cfg)
