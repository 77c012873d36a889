"""Teacher training with cross-entropy or with MSE between softmax and one-hot.

"How to Train the Teacher Model for Effective Knowledge Distillation"
(Hamidi et al., ECCV 2024) trains the teacher with the MSE between its softmax
output and the one-hot label (``||softmax(z) - e_y||^2``, summed over classes,
averaged over samples): the MSE-trained teacher's output is a better estimate
of the true class probabilities, which is what the student distils from.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from .distiller import Distiller


def train_teacher(model: nn.Module, loader, loss: str = "ce", *, optimizer: torch.optim.Optimizer, epochs: int,
                  scheduler=None, device=None, amp: Optional[str] = None, grad_accum_steps: int = 1,
                  ignore_index: int = -100, eval_loader=None, checkpoint_dir=None, resume: bool = False,
                  metrics_path=None, progress: bool = True, on_epoch_end=None) -> List[dict]:
    """Train ``model`` on labelled data with ``loss="ce"`` or ``"mse"``; return the per-epoch records.

    A :class:`~kdfast.train.Distiller` without a teacher (only the hard
    term), so checkpoints, resume, AMP, accumulation and DDP work the same.
    ``on_epoch_end(record)`` is :meth:`Distiller.fit`'s (e.g. to keep
    intermediate checkpoints for :class:`~kdfast.train.TeacherSchedule`).
    """
    distiller = Distiller(model, None, optimizer=optimizer, scheduler=scheduler, hard_loss=loss, hard_weight=1.0,
                          ignore_index=ignore_index, device=device, amp=amp, grad_accum_steps=grad_accum_steps)
    return distiller.fit(loader, epochs, eval_loader=eval_loader, checkpoint_dir=checkpoint_dir, resume=resume,
                         metrics_path=metrics_path, progress=progress, on_epoch_end=on_epoch_end)
