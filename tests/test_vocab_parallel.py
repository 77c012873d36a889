"""``vocab_parallel_distill_loss`` over real process groups against ``distill_loss`` of the full logits.

Two gloo ranks are spawned once for the whole module (``two_rank_results``);
they run every case of ``CASES`` and save their losses and gradient shards,
and each case is then checked as its own test: the loss of every rank equals
``kdfast.distill_loss`` of the concatenated logits (float64: 1e-10, float32:
the suite's float32 tolerances), bit-identical across ranks, and the
concatenated gradient shards equal its student gradient.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kdfast
from kdfast.llm.vocab_parallel import vocab_parallel_distill_loss

WORLD_SIZE = 2
UNEQUAL = (20, 17)  # V = 37: shards of unequal size
SPAWN_TIMEOUT_S = 180  # the whole two-rank run; collectives time out after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


@dataclass
class Case:
    """One call of the loss on every rank; ``student_shards[r]`` is what rank ``r`` holds."""

    name: str
    student_shards: List[torch.Tensor]
    teacher_shards: List[torch.Tensor]
    options: Dict = field(default_factory=dict)
    # "shards": the ranks share the vocabulary; "self": each rank computes alone in a
    # group of its own (world size 1) on the full logits; "chunks": rows in two
    # chunks with reduction="sum" and torch.autograd.grad (how fused_linear calls it).
    mode: str = "shards"
    # For a case that must fail: a fragment of the message each rank must raise.
    error_fragments: Optional[Sequence[str]] = None

    @property
    def student(self) -> torch.Tensor:
        return torch.cat(self.student_shards, -1)

    @property
    def teacher(self) -> torch.Tensor:
        return torch.cat(self.teacher_shards, -1)


def _logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _case(name, split=UNEQUAL, rows=(6,), dtype=torch.float64, teacher_dtype=None, seed=0, mask=None,
          mode="shards", **options) -> Case:
    """A case on random logits split into ``split`` columns; ``mask(student, teacher)`` may set -inf entries."""
    V = sum(split)
    student = _logits((*rows, V), torch.float64, seed)
    teacher = _logits((*rows, V), torch.float64, seed + 1000)
    if mask is not None:
        mask(student, teacher)
    student, teacher = student.to(dtype), teacher.to(teacher_dtype or dtype)
    return Case(name, list(student.split(split, -1)), list(teacher.split(split, -1)), options, mode)


def _mask_shard_and_padding(student, teacher):
    """Row 0 is -inf on the whole second shard (both models); the last 3 columns are padding
    (-inf everywhere); the teacher alone masks a few more entries (p = 0 < q)."""
    _mask_shard_and_padding_in_both(student, teacher)
    teacher[1, [2, 25]] = teacher[3, 7] = float("-inf")


def _poison_rows(student, teacher):
    """A NaN in row 1 of the teacher's second shard and a +inf in row 4 of the student's first: NaN rows."""
    teacher[1, UNEQUAL[0] + 2] = float("nan")
    student[4, 1] = float("inf")


def _mask_shard_and_padding_in_both(student, teacher):
    """As ``_mask_shard_and_padding`` without the teacher-only entries (reverse KL is infinite there)."""
    student[0, UNEQUAL[0]:] = teacher[0, UNEQUAL[0]:] = float("-inf")
    student[:, -3:] = teacher[:, -3:] = float("-inf")


LABELS = torch.tensor([3, 30, -100, 19, 20, 36])  # on shard 0, shard 1, ignored, both shard edges, last
DIVERGENCE_PARAMS = {
    "kl": {}, "reverse_kl": {}, "tvd": {},
    "jsd": dict(beta=0.3), "renyi": dict(alpha=0.5), "ab": dict(alpha=0.7, beta=0.4),
    "skew_kl": dict(skew=0.2), "skew_reverse_kl": dict(skew=0.2),
}


def _value_cases() -> List[Case]:
    cases = []
    for name, params in DIVERGENCE_PARAMS.items():
        for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
            cases.append(_case(f"{name}-{tag}", dtype=dtype, temperature=2.0, divergence=name, **params))
        mask = _mask_shard_and_padding_in_both if name == "reverse_kl" else _mask_shard_and_padding
        cases.append(_case(f"{name}-masked", mask=mask, divergence=name, **params))
    cases += [
        _case("jsd-default-beta", divergence="jsd"),
        _case("renyi-alpha-above-1", divergence="renyi", alpha=2.5, temperature=1.5),
        _case("ab-large-alpha", divergence="ab", alpha=1.5, beta=0.5),
        _case("student-temperature", temperature=3.0, student_temperature=1.0),
        _case("equal-shards", split=(16, 16), temperature=2.0),
        _case("leading-dims", rows=(2, 3), divergence="jsd"),
        _case("teacher-bf16-student-f32", dtype=torch.float32, teacher_dtype=torch.bfloat16),
        _case("student-f16-teacher-bf16", dtype=torch.float16, teacher_dtype=torch.bfloat16, divergence="jsd"),
        _case("wttm-f64", weighting="wttm", temperature=2.0, student_temperature=1.0),
        _case("wttm-f32", dtype=torch.float32, weighting="wttm", temperature=2.0),
        _case("entropy-f64", weighting="entropy", divergence="reverse_kl"),
        _case("entropy-f32", dtype=torch.float32, weighting="entropy"),
        _case("entropy-masked", mask=_mask_shard_and_padding, weighting="entropy"),
        _case("weighting-tensor", weighting=torch.linspace(0.1, 2.0, 6, dtype=torch.float64)),
        _case("labels-hard-and-soft", labels=LABELS, hard_weight=0.5, soft_weight=0.7, temperature=2.0),
        _case("labels-hard-only-f32", dtype=torch.float32, labels=LABELS, hard_weight=1.0, soft_weight=0.0),
        _case("labels-own-ignore-index", labels=torch.where(LABELS < 0, -1, LABELS), ignore_index=-1,
              hard_weight=0.3, student_temperature=2.0),
        _case("labels-masked", mask=_mask_shard_and_padding, labels=torch.tensor([1, 30, 5, -100, 21, 8]),
              hard_weight=1.0, divergence="renyi", alpha=0.5),
        _case("soft-only-labels-mask", labels=LABELS, divergence="tvd"),
        _case("no-valid-row", labels=torch.full((6,), -100), hard_weight=1.0),
        _case("reduction-sum", reduction="sum", divergence="skew_kl", scale=4.0),
        _case("reduction-none", reduction="none", labels=LABELS, hard_weight=0.5, weighting="wttm"),
        _case("normalizer", normalizer=10.0, labels=LABELS, divergence="ab"),
        _case("nan-and-inf-rows", mask=_poison_rows, reduction="none", labels=LABELS, hard_weight=0.5),
        _case("nan-row-reduced", mask=_poison_rows, divergence="hellinger"),
        _case("world-size-1-f64", mode="self", divergence="jsd", labels=LABELS, hard_weight=0.5,
              weighting="entropy"),
        _case("world-size-1-f32", mode="self", dtype=torch.float32, divergence="renyi", alpha=2.0),
        _case("chunks-autograd-grad", mode="chunks", reduction="sum", labels=LABELS, hard_weight=0.5),
    ]
    return cases


def _error_cases() -> List[Case]:
    student = _logits((6, 37), torch.float64, 0)
    s0, s1 = student.split(UNEQUAL, -1)
    dead_teacher = student.clone()
    dead_teacher[1] = float("-inf")
    d0, d1 = dead_teacher.split(UNEQUAL, -1)
    return [
        Case("error-shard-shapes-on-one-rank", [s0, s1], [s0, s1[:, :-1]],
             error_fragments=["bad arguments on rank(s) [1]", "student_logits shape (6, 17) does not match "
                                                              "teacher_logits shape (6, 16)"]),
        Case("error-row-counts-differ", [s0, s1[:5]], [s0, s1[:5]],
             error_fragments=["same rows, got row counts [6, 5]"] * 2),
        Case("error-label-outside-full-vocabulary", [s0, s1], [s0, s1],
             dict(labels=torch.tensor([0, 36, 37, 1, 2, 3]), hard_weight=1.0),
             error_fragments=["label 37 at row 2 is outside [0, 37)"] * 2),
        Case("error-teacher-row-all-inf", [s0, s1], [d0, d1],
             error_fragments=["teacher_logits row 1 is all -inf"] * 2),
        Case("error-bad-option", [s0, s1], [s0, s1], dict(temperature=0.0),
             error_fragments=["temperature must be > 0"] * 2),
    ]


CASES = _value_cases() + _error_cases()


# ----------------------------------------------------------------- the ranks
def _rank_inputs(case: Case, rank: int):
    if case.mode == "self":
        return case.student, case.teacher
    return case.student_shards[rank], case.teacher_shards[rank]


def _upstream(loss: torch.Tensor) -> torch.Tensor:
    """A fixed, non-uniform gradient for ``reduction="none"`` (1 for a scalar loss)."""
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape) if loss.dim() else \
        torch.ones_like(loss)


def _run(case: Case, rank: int, own_group):
    """(loss, gradient of the student shard) of one case on this rank."""
    student, teacher = _rank_inputs(case, rank)
    group = own_group if case.mode == "self" else None
    if case.mode == "chunks":
        # Rows in two chunks, each its own call and its own torch.autograd.grad, as fused_linear does.
        labels = case.options["labels"]
        options = {k: v for k, v in case.options.items() if k != "labels"}
        losses, grads = [], []
        for rows in (slice(0, 4), slice(4, None)):
            chunk = student[rows].clone().requires_grad_(True)
            loss = vocab_parallel_distill_loss(chunk, teacher[rows], labels=labels[rows], **options)
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, chunk)[0])
        return sum(losses), torch.cat(grads)
    student = student.clone().requires_grad_(True)
    loss = vocab_parallel_distill_loss(student, teacher, process_group=group, **case.options)
    (grad,) = torch.autograd.grad((loss * _upstream(loss)).sum(), student)
    return loss.detach(), grad


def _worker(rank: int, cases: List[Case], init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        # Every rank creates every group (new_group is collective); each uses its own.
        own_group = [dist.new_group([r]) for r in range(WORLD_SIZE)][rank]
        results = {}
        for case in cases:
            try:
                results[case.name] = ("ok", *_run(case, rank, own_group))
            except (ValueError, TypeError) as exc:
                results[case.name] = ("error", type(exc).__name__, str(exc))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """The results of every case on each of the two ranks: ``[rank0_results, rank1_results]``."""
    root = tmp_path_factory.mktemp("vocab_parallel")
    context = mp.spawn(_worker, args=(CASES, str(root / "store"), str(root)), nprocs=WORLD_SIZE, join=False)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=SPAWN_TIMEOUT_S)
    while not context.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {SPAWN_TIMEOUT_S} s (a collective hung?)")
    return [torch.load(root / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _expected(case: Case):
    """``distill_loss`` of the full logits, and its student gradient with the same upstream gradient."""
    student = case.student.clone().requires_grad_(True)
    loss = kdfast.distill_loss(student, case.teacher, **case.options)
    (grad,) = torch.autograd.grad((loss * _upstream(loss)).sum(), student)
    return loss.detach(), grad


def _assert_close(got, want, case: Case, what: str, grad: bool):
    from conftest import GRAD_TOL, VALUE_ATOL, VALUE_RTOL  # only here: the spawned ranks skip conftest

    f64 = case.student.dtype == torch.float64
    if grad:
        tol = GRAD_TOL[case.student.dtype]
        finite = want[torch.isfinite(want)]
        scale = (float(finite.abs().max()) if finite.numel() else 0.0) or 1.0
        rtol, atol = tol["rtol"], tol["atol"] * scale + tol["atol_abs"]
    else:
        rtol, atol = (1e-10, 1e-12) if f64 else (VALUE_RTOL, VALUE_ATOL)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"case {case.name!r}: {what} differs from distill_loss\n{m}")


VALUE_CASES = [c for c in CASES if c.error_fragments is None]
ERROR_CASES = [c for c in CASES if c.error_fragments is not None]


@pytest.mark.parametrize("case", VALUE_CASES, ids=[c.name for c in VALUE_CASES])
def test_matches_distill_loss_on_the_full_logits(two_rank_results, case):
    want_loss, want_grad = _expected(case)
    got = [results[case.name] for results in two_rank_results]
    for rank, result in enumerate(got):
        assert result[0] == "ok", f"case {case.name!r} raised on rank {rank}: {result[1:]}"
    losses = [result[1] for result in got]
    assert losses[0].dtype == want_loss.dtype and losses[0].shape == want_loss.shape
    # Every rank holds the very same loss, not merely a close one.
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"case {case.name!r}: the ranks disagree: {losses}\n{m}")
    _assert_close(losses[0], want_loss, case, "the loss", grad=False)

    grads = [result[2] for result in got]
    assert all(g.dtype == case.student.dtype for g in grads)
    if case.mode == "self":  # each rank alone in its group, on the whole vocabulary
        for grad in grads:
            _assert_close(grad, want_grad, case, "the student gradient", grad=True)
    else:
        _assert_close(torch.cat(grads, -1), want_grad, case, "the concatenated gradient shards", grad=True)


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.name for c in ERROR_CASES])
def test_bad_arguments_raise_on_every_rank(two_rank_results, case):
    for rank, results in enumerate(two_rank_results):
        result = results[case.name]
        assert result[0] == "error", f"case {case.name!r}: rank {rank} did not raise"
        assert result[1] == "ValueError" and case.error_fragments[rank] in result[2], (
            f"case {case.name!r}: rank {rank} raised {result[1]}: {result[2]!r}, "
            f"expected a ValueError containing {case.error_fragments[rank]!r}")


# ----------------------------------------------------------------- one process
def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    s = _logits((2, 5), torch.float32, 0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_distill_loss(s, s)


def test_default_group_of_one_is_distill_loss(tmp_path):
    """``process_group=None`` with a default group of size 1 is exactly ``distill_loss``."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for case in (_case("kl", temperature=2.0), _case("skew-rkl-f32", dtype=torch.float32,
                                                          divergence="skew_reverse_kl", labels=LABELS,
                                                          hard_weight=0.5)):
            student = case.student.clone().requires_grad_(True)
            loss = vocab_parallel_distill_loss(student, case.teacher, **case.options)
            (grad,) = torch.autograd.grad(loss, student)
            want_loss, want_grad = _expected(case)
            _assert_close(loss.detach(), want_loss, case, "the loss", grad=False)
            _assert_close(grad, want_grad, case, "the student gradient", grad=True)
    finally:
        dist.destroy_process_group()
