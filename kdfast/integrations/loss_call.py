"""What the Trainer and TRL integrations both do around kdfast's fused linear loss: its operands' dtype, autocast
off inside it, and the Trainer's token count as its ``normalizer``."""

from __future__ import annotations

import contextlib
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


def head_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``(hidden, weight, bias)`` in one dtype: autocast's if it is on (as the model's head would run), else the
    weight's."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


@contextlib.contextmanager
def autocast_off(device_type: str):
    """No autocast inside the fused loss (its chunk matmuls write into buffers of the heads' dtypes)."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield
