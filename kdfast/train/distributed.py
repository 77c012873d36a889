"""torch.distributed plumbing of the trainer: process group set-up, rank queries, reductions, data loaders.

Under ``torchrun`` call :func:`init_distributed` first (it reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` from the environment and picks gloo on CPU,
nccl on GPU); the :class:`~kdfast.train.Distiller` then wraps its students in
``DistributedDataParallel`` by itself.  Without a process group everything
here degrades to the single-process case.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and progress bars."""
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def current_context(device: Optional[torch.device] = None) -> DistributedContext:
    """The context of this process (rank 0 of 1 without a process group)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if is_distributed():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, torch.device(device))
    return DistributedContext(0, 1, 0, torch.device(device))


def init_distributed(backend: Optional[str] = None) -> DistributedContext:
    """Initialise the default process group from ``torchrun``'s environment variables.

    ``backend`` defaults to nccl when CUDA is available, else gloo.  Without
    ``WORLD_SIZE`` in the environment (not launched by torchrun) nothing is
    initialised and the single-process context is returned.  Calling it twice
    is harmless.
    """
    if "WORLD_SIZE" not in os.environ:
        return current_context()
    if not is_distributed():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return current_context()


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks of ``values`` (returned on the CPU); ``values`` itself without a process group."""
    if not is_distributed():
        return values
    buffer = values.to(device)
    dist.all_reduce(buffer)
    return buffer.cpu()


def all_gather(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def make_train_loader(dataset: Dataset, batch_size: int, *, seed: int, shuffle: bool = True,
                      drop_last: bool = False, **loader_options) -> DataLoader:
    """A DataLoader whose order is a function of ``(seed, epoch)`` and which shards over ranks.

    It uses a ``DistributedSampler`` also in a single process (one replica):
    its permutation comes from a generator seeded with ``seed + epoch``, and
    the Distiller calls ``set_epoch`` before every epoch, so a resumed run sees
    the same batches as an uninterrupted one.  ``batch_size`` is per rank.
    ``loader_options`` go to ``DataLoader`` (``num_workers``, ``collate_fn``, ...).
    """
    context = current_context()
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **loader_options)


def epoch_sampler(loader) -> Optional[Any]:
    """The loader's sampler if it has ``set_epoch`` (DistributedSampler and friends), else None."""
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            return sampler
    return None
