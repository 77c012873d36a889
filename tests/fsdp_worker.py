"""Two-rank runs of the fused linear loss for tests/test_fsdp.py: FSDP2 (``fully_shard``) and DDP through accelerate.

Run under torchrun on the CPU (gloo)::

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py {fsdp,accelerate} OUT

Every rank trains the same tiny student (a trunk of two Linear layers, an LM head
``Linear(H, V)`` with a bias) for two optimizer steps (SGD with momentum) on its
half of a fixed batch, against a fixed teacher head, and saves
``OUT/<mode>-rank<r>.pt``: per variant its losses, the full gradients of the first
step and the full parameters after the second (DTensors gathered with
``full_tensor()``).  The test runs the very same model and batch in one process
(:func:`train_single`) to compare against.  A rank stuck longer than
``--hang-timeout`` seconds prints its stack and exits (no orphaned process).

The point is where the LM-head weight meets the loss.  Under FSDP2 a parameter is
a sharded DTensor outside its unit's forward and a plain, whole tensor inside it;
under DDP gradients are averaged only for a backward of the wrapper's forward.  So
the loss is computed inside a forward:

* ``root``: the student's own ``forward`` returns the loss; the head belongs to
  the root unit (``fully_shard(model)``), unsharded while the root's forward runs;
* ``head-unit``: the head is its own FSDP unit and the loss is a method of the
  head, made a forward method with ``register_fsdp_forward_method`` (the head's
  ``forward`` keeps returning logits);
* ``sharded-teacher``: as ``root``, with the frozen teacher's head sharded too and
  made whole with ``unshard()`` / ``reshard()`` around the loss;
* accelerate: ``Accelerator(cpu=True)`` wraps the student in DDP, whose forward
  returns the loss.

The ranks' loss normaliser is ``global target tokens / world size`` (an
all-reduce): FSDP and DDP average the ranks' gradients, and the average of the
ranks' ``sum / (global / W)`` is ``sum over all ranks / global``, the loss of one
process on the whole batch, also when the ranks hold different numbers of target
tokens (as here).
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import gc
import os
import sys
import weakref

import torch
from torch import nn

from kdfast import fused_linear_distill_loss

B, T, F, H, H_T, V = 4, 6, 8, 12, 10, 37  # V odd: FSDP2 shards the head's 37 rows as 19 + 18
WORLD = 2
IGNORE = -100
LOSS_OPTIONS = dict(divergence="kl", temperature=2.0, hard_weight=0.5, soft_weight=0.5, chunk_size=4)
STEPS = 2
LR = 0.5


class DistillLMHead(nn.Linear):
    """An LM head (its ``forward`` gives logits, as usual) with the fused distillation loss as a method."""

    def distill_loss(self, hidden, teacher_hidden, teacher_weight, labels, normalizer=None):
        return fused_linear_distill_loss(hidden, self.weight, teacher_hidden, teacher_weight, labels,
                                         student_bias=self.bias, shift=True, normalizer=normalizer, **LOSS_OPTIONS)


class TinyStudent(nn.Module):
    """Two Linear layers of trunk and an LM head; ``forward`` returns the distillation loss of a batch."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.ModuleList([nn.Linear(F, H), nn.Linear(H, H)])
        self.lm_head = DistillLMHead(H, V)

    def hidden(self, x):
        return self.trunk[1](torch.tanh(self.trunk[0](x)))

    def forward(self, x, teacher_hidden, teacher_weight, labels, normalizer=None):
        return self.lm_head.distill_loss(self.hidden(x), teacher_hidden, teacher_weight, labels, normalizer)


def make_student() -> TinyStudent:
    torch.manual_seed(0)
    return TinyStudent()


def make_batch():
    """``(x, labels, teacher_hidden, teacher_weight)`` of the global batch; rows ``2r, 2r + 1`` are rank r's."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, F, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 1:5] = IGNORE  # rank 0 gets 6 target tokens (after the shift), rank 1 gets 10
    labels[1, 3] = IGNORE
    teacher_hidden = torch.randn(B, T, H_T, generator=g)
    teacher_weight = 0.5 * torch.randn(V, H_T, generator=g)
    return x, labels, teacher_hidden, teacher_weight


def rank_batch(rank: int, world: int = WORLD):
    x, labels, teacher_hidden, teacher_weight = make_batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    return x[rows], labels[rows], teacher_hidden[rows], teacher_weight


def make_optimizer(model: nn.Module):
    # SGD with momentum (a state per parameter, sharded like it under FSDP2): the parameters move linearly with
    # the gradients, so the comparison stays at rounding level; Adam's m / (sqrt(v) + eps) magnifies the
    # float32 rounding of the near-zero gradient entries (here down to 3e-7) about a thousandfold.
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=0.01)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's parameters and gradients) gathered whole; a plain tensor as it is."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(model: nn.Module, params_of, loss_of, optimizer) -> dict:
    """``STEPS`` optimizer steps of ``loss_of()``; the losses, the first step's gradients, the final parameters."""
    losses, grads = [], None
    for step in range(STEPS):
        loss = loss_of()
        loss.backward()
        losses.append(float(loss.detach()))
        if step == 0:
            grads = {name: _full(p.grad) for name, p in params_of()}
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": losses, "grads": grads, "params": {name: _full(p) for name, p in params_of()}}


def train_single() -> dict:
    """The reference: one process, the whole batch, the default ``"batchmean"`` normaliser."""
    model = make_student()
    x, labels, teacher_hidden, teacher_weight = make_batch()
    return train(model, model.named_parameters, lambda: model(x, teacher_hidden, teacher_weight, labels),
                 make_optimizer(model))


def global_normalizer(labels: torch.Tensor) -> float:
    """This rank's ``"batchmean"`` normaliser: the target tokens of all ranks over the world size."""
    import torch.distributed as dist

    count = (labels[:, 1:] != IGNORE).sum().reshape(1).double()  # shift=True: the first label has no row
    dist.all_reduce(count)
    return float(count) / dist.get_world_size()


# ----------------------------------------------------------------- FSDP2
def run_fsdp(rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x, labels, teacher_hidden, teacher_weight = rank_batch(rank, dist.get_world_size())
    normalizer = global_normalizer(labels)
    results = {"normalizer": normalizer}

    for variant in ("root", "head-unit", "sharded-teacher"):
        model = make_student()
        for layer in model.trunk:
            fully_shard(layer, mesh=mesh)
        if variant == "head-unit":
            fully_shard(model.lm_head, mesh=mesh)
            register_fsdp_forward_method(model.lm_head, "distill_loss")
        fully_shard(model, mesh=mesh)
        optimizer = make_optimizer(model)
        if variant == "sharded-teacher":
            loss_of = _with_sharded_teacher(model, mesh, x, labels, teacher_hidden, teacher_weight, normalizer)
        else:
            loss_of = functools.partial(model, x, teacher_hidden, teacher_weight, labels, normalizer)
        results[variant] = train(model, model.named_parameters, loss_of, optimizer)
        results[variant]["local_head_rows"] = model.lm_head.weight.to_local().shape[0]

    # Outside any forward the head's weight is this rank's shard, a DTensor: the loss must refuse it.
    model = make_student()
    fully_shard(model, mesh=mesh)
    hidden = torch.zeros(x.shape[0], T, H, requires_grad=True)
    try:
        fused_linear_distill_loss(hidden, model.lm_head.weight, teacher_hidden, teacher_weight, labels, shift=True)
        results["outside_forward_error"] = None
    except Exception as error:  # noqa: BLE001 - the test checks the type and the message
        results["outside_forward_error"] = (type(error).__name__, str(error))
    del model, optimizer  # the sharded modules go before their process group (see run_accelerate)
    gc.collect()
    dist.destroy_process_group()
    return results


def _with_sharded_teacher(model, mesh, x, labels, teacher_hidden, teacher_weight, normalizer):
    """The loss against a frozen teacher head that FSDP2 shards too.

    No forward of the teacher head runs, so it is made whole explicitly around
    the loss, which is done with it once it returns (the student's gradients
    come from the loss's forward).
    """
    from torch.distributed.fsdp import fully_shard

    teacher_head = nn.Linear(H_T, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        teacher_head.weight.copy_(teacher_weight)
    fully_shard(teacher_head, mesh=mesh)

    def loss_of():
        teacher_head.unshard()
        try:
            return model(x, teacher_hidden, teacher_head.weight, labels, normalizer)
        finally:
            teacher_head.reshard()

    return loss_of


# ----------------------------------------------------------------- DDP through accelerate
def run_accelerate(rank: int) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD and str(accelerator.distributed_type).endswith("MULTI_CPU")
    x, labels, teacher_hidden, teacher_weight = rank_batch(accelerator.process_index, accelerator.num_processes)
    normalizer = global_normalizer(labels)
    student = make_student()
    model, optimizer = accelerator.prepare(student, make_optimizer(student))
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    results = {"normalizer": normalizer, "backend": accelerator.state.backend}

    def loss_of():
        return model(x, teacher_hidden, teacher_weight, labels, normalizer)

    losses, grads = [], None
    for step in range(STEPS):
        loss = loss_of()
        accelerator.backward(loss)
        losses.append(float(loss.detach()))
        if step == 0:
            grads = {name: _full(p.grad) for name, p in student.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    results["ddp"] = {"losses": losses, "grads": grads,
                      "params": {name: _full(p) for name, p in student.named_parameters()}}

    # The pitfall: the same loss through the unwrapped module skips DDP's forward, so its backward is not averaged.
    loss = accelerator.unwrap_model(model)(x, teacher_hidden, teacher_weight, labels, normalizer)
    loss.backward()
    results["outside_forward_grads"] = {name: _full(p.grad) for name, p in student.named_parameters()}
    # DDP (its C++ reducer) goes before its process group: destroyed the other way round, a rank could hang
    # (about one run in four) in the reducer's destructor when this frame's locals were freed.
    ddp = weakref.ref(model)
    model, optimizer = accelerator.free_memory(model, optimizer)  # accelerate's own references too
    del loss
    gc.collect()
    assert ddp() is None, "the DDP wrapper outlived the training"
    accelerator.end_training()
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("fsdp", "accelerate"))
    parser.add_argument("out")
    parser.add_argument("--hang-timeout", type=float, default=120.0,
                        help="seconds after which a stuck rank prints its stack and exits")
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    results = run_fsdp(rank) if args.mode == "fsdp" else run_accelerate(rank)
    torch.save(results, os.path.join(args.out, f"{args.mode}-rank{rank}.pt"))


if __name__ == "__main__":
    sys.exit(main())
