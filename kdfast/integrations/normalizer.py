"""The Hugging Face Trainer's token count as kdfast's ``normalizer`` (shared by the Trainer and TRL integrations)."""

from __future__ import annotations

import math
from typing import Optional

import torch


def trainer_normalizer(num_items_in_batch) -> Optional[float]:
    """``num_items_in_batch`` (the target tokens of the whole accumulated batch) as a float, or None.

    None when the Trainer gives none, or zero (or a non-finite count): the
    loss then averages over the batch's own targets instead.
    """
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.reshape(-1)[0].item()
    n = float(num_items_in_batch)
    return n if n > 0 and math.isfinite(n) else None
