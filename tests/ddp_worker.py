"""A tiny distillation run for the subprocess tests of kdfast.train (DDP, and a killed run resumed).

Run under torchrun (``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT``)
it trains with DistributedDataParallel on gloo; run plainly it trains in one process.
Every rank saves its final student weights to ``OUT/rank<r>.pt``.

The toy configuration lives here so that the tests build the very same run in-process
(``build_run``) to compare against.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdfast.train import Distiller, MeanTeacher, init_distributed, make_train_loader, seed_everything

SAMPLES, FEATURES, CLASSES = 64, 6, 3


class NoisyToyData(Dataset):
    """A fixed labelled toy set whose items get noise from Python's and numpy's global generators,
    so that a resumed run is exact only if those random states are restored too.  Every third
    label is ``-100`` (unlabelled), so micro-batches hold different numbers of labelled rows."""

    def __init__(self, noise: float = 0.05):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(SAMPLES, FEATURES, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0.5).long()
        self.y[::3] = -100
        self.noise = noise

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        jitter = self.noise * (random.random() - 0.5 + float(np.random.standard_normal()))
        return self.x[i] + jitter, self.y[i]


def toy_model(hidden: int, dropout: float, seed: int) -> nn.Module:
    seed_everything(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, CLASSES))


def build_run(batch_size: int, *, init_seed: int = 0, noise: float = 0.05, dropout: float = 0.2,
              grad_accum_steps: int = 2):
    """(distiller, train_loader): a Mean-Teacher run with dropout, momentum and an LR schedule,
    i.e. every kind of state a checkpoint must carry."""
    student = toy_model(16, dropout, init_seed)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    distiller = Distiller(student, MeanTeacher(decay=0.9, rampup_epochs=2), "kd", optimizer=optimizer,
                          scheduler=scheduler, grad_accum_steps=grad_accum_steps, distill_unlabeled=True)
    return distiller, make_train_loader(NoisyToyData(noise), batch_size, seed=7)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="per rank")
    parser.add_argument("--grad-accum-steps", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stall-after-epoch", type=int, default=0,
                        help="after this epoch's checkpoint, sleep until killed (the kill test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    context = init_distributed()
    distiller, loader = build_run(args.batch_size, noise=args.noise, dropout=args.dropout,
                                  grad_accum_steps=args.grad_accum_steps)

    def stall(record):
        if record["epoch"] == args.stall_after_epoch:
            time.sleep(3600)

    metrics = os.path.join(args.out, "metrics.jsonl")
    distiller.fit(loader, args.epochs, checkpoint_dir=args.checkpoint_dir, resume=args.resume, metrics_path=metrics,
                  progress=False, on_epoch_end=stall)
    torch.save(distiller.students[0].state_dict(), os.path.join(args.out, f"rank{context.rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
