"""The fused linear loss under data parallelism: FSDP2 (``fully_shard``) and DDP through accelerate, 2 gloo CPU ranks.

Each run (tests/fsdp_worker.py under torchrun; its docstring explains the
variants: the loss in the root unit's forward, in a registered forward method of
a head that is its own unit, against a sharded teacher head, and DDP through
accelerate) trains a tiny student for two SGD-with-momentum steps on its half of
a batch; the first step's gradients (gathered whole) and the final parameters
must equal one process on the whole batch.  The LM-head weight of an FSDP2 model
passed from outside a forward (a DTensor) is a clear TypeError; a loss computed
outside DDP's forward is not averaged (the pitfall the README warns of).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import fsdp_worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32, a different summation order (two half batches, the ranks' average): rounding only.
TOL = dict(rtol=1e-5, atol=1e-6)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def _launch(mode: str, out) -> list:
    """Both ranks' results of ``fsdp_worker.py mode`` (torchrun --standalone: localhost, a free port)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(fsdp_worker.WORLD), WORKER, mode, str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return [torch.load(out / f"{mode}-rank{r}.pt", weights_only=True) for r in range(fsdp_worker.WORLD)]


@pytest.fixture(scope="module")
def single():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        return fsdp_worker.train_single()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not hasattr(fsdp, "register_fsdp_forward_method"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    return _launch("fsdp", tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    pytest.importorskip("accelerate")
    return _launch("accelerate", tmp_path_factory.mktemp("accelerate"))


def _max_abs_diff(got: dict, want: dict) -> float:
    return max(float((got[name] - want[name]).abs().max()) for name in want)


def _assert_matches_single(ranks: list, variant: str, single: dict) -> None:
    runs = [rank[variant] for rank in ranks]
    names = dict(single["grads"]).keys()
    for run in runs:
        assert run["grads"].keys() == names and run["params"].keys() == names
        # The gradients gathered whole (FSDP2) or averaged (DDP) are the whole batch's ...
        torch.testing.assert_close(run["grads"], single["grads"], **TOL)
        # ... and so are the parameters after two optimizer steps.
        torch.testing.assert_close(run["params"], single["params"], **TOL)
    for name in names:  # every rank holds the same model
        assert torch.equal(runs[0]["params"][name], runs[1]["params"][name]), name
    # The ranks' losses average to the whole batch's loss, step by step.
    for step, want in enumerate(single["losses"]):
        assert sum(run["losses"][step] for run in runs) / len(runs) == pytest.approx(want, rel=1e-5)
    print(f"\n{variant}: max |grad - one process| = {_max_abs_diff(runs[0]['grads'], single['grads']):.2e}, "
          f"max |param - one process| after {fsdp_worker.STEPS} steps = "
          f"{_max_abs_diff(runs[0]['params'], single['params']):.2e}")


def test_the_ranks_hold_different_numbers_of_target_tokens(fsdp_ranks):
    # Otherwise the global normaliser would not be tested: each rank's own "batchmean" would do.
    _, labels, _, _ = fsdp_worker.make_batch()
    per_rank = [int((labels[2 * r:2 * r + 2, 1:] != fsdp_worker.IGNORE).sum()) for r in range(2)]
    assert per_rank[0] != per_rank[1]
    assert fsdp_ranks[0]["normalizer"] == fsdp_ranks[1]["normalizer"] == sum(per_rank) / 2


def test_fsdp2_loss_in_the_root_forward_equals_one_process(fsdp_ranks, single):
    # The head belongs to the root unit: sharded (19 + 18 rows) outside the root's forward, whole inside it.
    assert [rank["root"]["local_head_rows"] for rank in fsdp_ranks] == [19, 18]
    _assert_matches_single(fsdp_ranks, "root", single)


def test_fsdp2_sharded_teacher_head_unsharded_around_the_loss(fsdp_ranks, single):
    _assert_matches_single(fsdp_ranks, "sharded-teacher", single)


def test_fsdp2_head_as_its_own_unit_with_a_registered_forward_method(fsdp_ranks, single):
    # The head's 37 rows are really split across the ranks (19 + 18) ...
    assert [rank["head-unit"]["local_head_rows"] for rank in fsdp_ranks] == [19, 18]
    # ... and the loss, a method of the head made an FSDP forward method, still gives the whole batch's gradients.
    _assert_matches_single(fsdp_ranks, "head-unit", single)


def test_fsdp2_sharded_weight_outside_a_forward_is_a_clear_error(fsdp_ranks):
    for rank in fsdp_ranks:
        kind, message = rank["outside_forward_error"]
        assert kind == "TypeError"
        assert "DTensor" in message and "register_fsdp_forward_method" in message


def test_ddp_through_accelerate_equals_one_process(ddp_ranks, single):
    assert ddp_ranks[0]["backend"] == "gloo"
    _assert_matches_single(ddp_ranks, "ddp", single)


def test_ddp_does_not_average_a_backward_outside_its_forward(ddp_ranks):
    # The documented pitfall: the unwrapped module's loss gets each rank's own gradient, not the average.
    rank0, rank1 = (rank["outside_forward_grads"] for rank in ddp_ranks)
    assert not torch.allclose(rank0["lm_head.weight"], rank1["lm_head.weight"])
