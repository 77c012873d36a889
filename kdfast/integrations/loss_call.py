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


def check_data_parallel(trainer, student_model: torch.nn.Module, who: str) -> None:
    """Refuse the multi-process setups the trainers do not run: anything but DDP, and DDP of a model whose
    forward cannot skip its logits.

    Under DDP the student's trunk runs inside the wrapper's forward
    (:func:`student_hidden_states`); FSDP, DeepSpeed and the other sharded
    setups would need the loss inside the forward of the unit that holds the
    LM head (tests/fsdp_worker.py shows how for a model of one's own).
    """
    if trainer.args.world_size <= 1:
        return
    kind = getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type))
    if not str(kind).startswith("MULTI_"):
        raise NotImplementedError(
            f"{who} runs on one process or under DDP (one model copy per process); {kind} (world_size="
            f"{trainer.args.world_size}) shards or wraps the student so that its LM head is not whole outside the "
            f"wrapper's forward")
    from .heads import takes_logits_to_keep

    if not takes_logits_to_keep(student_model):
        raise ValueError(
            f"{who} under DDP runs the student {type(student_model).__name__} through the DDP wrapper and needs its "
            f"forward to take logits_to_keep (as the causal LMs of transformers do), so that it does not compute "
            f"the (tokens x vocabulary) logits that the fused loss avoids")


def student_hidden_states(model: torch.nn.Module, parts, model_inputs) -> torch.Tensor:
    """The student's trunk output for ``model_inputs``: through ``model`` when it is a DDP wrapper (so that DDP
    averages the gradients), else from the trunk directly."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return parts.hidden_states_through(model, model_inputs)
    return parts.hidden_states(model_inputs)


def data_parallel_loss_scale(trainer, normalizer: Optional[float]) -> int:
    """The factor ``Trainer.compute_loss`` applies to a loss normalised by the token count of *all* processes.

    With ``average_tokens_across_devices`` the Trainer's ``num_items_in_batch``
    counts every process's target tokens and DDP averages the processes'
    gradients, so each process's loss is multiplied by their number: the
    average of ``W * sum_r / total`` is ``sum / total``, one process's loss on
    the whole batch.  The trainers here override ``compute_loss``, so they
    apply it themselves.
    """
    if normalizer is None or trainer.args.world_size <= 1 or not trainer.args.average_tokens_across_devices:
        return 1
    return int(trainer.accelerator.num_processes)
