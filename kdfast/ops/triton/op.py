"""The Triton kernels as the custom op ``torch.ops.kdfast.distill_forward_triton``.

Registered through ``torch.library`` with the same schema, fake kernel and
autograd formula as the C++ op, so a ``torch.compile``d step sees one opaque
node and no graph break.  The schema is inferred from the annotations of
``launch.distill_forward``.
"""

from __future__ import annotations

import torch

from ..fused_op import (call_distill_op, call_revised_distill_op, register_fake_and_autograd,
                        register_revised_fake_and_autograd)
from ...config import LossConfig
from . import launch

distill_forward_triton = torch.library.custom_op("kdfast::distill_forward_triton", mutates_args=())(
    launch.distill_forward)
register_fake_and_autograd(distill_forward_triton)

# Label Revision: the same op with one more scalar (eta), a separate op so the schema shared with C++ stays.
distill_forward_revised_triton = torch.library.custom_op("kdfast::distill_forward_revised_triton",
                                                         mutates_args=())(launch.distill_forward_revised)
register_revised_fake_and_autograd(distill_forward_revised_triton)


def distill_loss_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The fused Triton kernel; same contract as ``reference.distill_loss_reference``."""
    if cfg.label_revision is not None:
        return call_revised_distill_op(distill_forward_revised_triton, student_logits, teacher_logits, cfg)
    return call_distill_op(distill_forward_triton, student_logits, teacher_logits, cfg)
