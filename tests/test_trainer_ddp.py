"""kdfast's Hugging Face trainers under DDP: 2 gloo CPU ranks (torchrun) against one process on the whole batch.

tests/trainer_ddp_worker.py trains for two SGD steps with 2 sequences per rank
per step; the same training in one process takes the 4 sequences per step.  The
parameters after the steps and the logged losses (the hard and soft terms too,
reduced over the ranks) must agree to rounding; with the trunk called outside
the DDP wrapper they do not (the gradients are then not averaged).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers", reason="transformers is not installed: pip install kdfast[hf]")
pytest.importorskip("accelerate", reason="accelerate is not installed: pip install kdfast[hf]")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")

sys.path.insert(0, os.path.dirname(__file__))
import trainer_ddp_worker as worker  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "trainer_ddp_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGGED = ("loss", "hard_loss", "soft_loss", "grad_norm")


def launch(mode: str, out) -> dict:
    """Rank 0's result of ``trainer_ddp_worker.py mode`` on 2 ranks."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          WORKER, mode, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return torch.load(out / f"{mode}.pt", weights_only=False)


def one_process(mode: str, out) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        return worker.result(*worker.RUNS[mode](str(out), 4, 1))
    finally:
        torch.set_num_threads(threads)


def max_param_difference(a: dict, b: dict) -> float:
    assert a["params"].keys() == b["params"].keys()
    return max(float((a["params"][name] - b["params"][name]).abs().max()) for name in a["params"])


def logged_steps(result: dict) -> list:
    return [{key: entry[key] for key in LOGGED if key in entry} for entry in result["log_history"] if "loss" in entry]


def assert_same_logs(ranks: dict, single: dict, terms: bool) -> None:
    got, want = logged_steps(ranks), logged_steps(single)
    assert len(got) == len(want) == worker.STEPS
    for step, expected in zip(got, want):
        assert ({"hard_loss", "soft_loss"} <= step.keys()) == terms
        assert step.keys() == expected.keys()
        assert step == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def distillation_ranks(tmp_path_factory):
    return launch("trainer", tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def distillation_single(tmp_path_factory):
    return one_process("trainer", tmp_path_factory.mktemp("single"))


def test_distillation_trainer_under_ddp_equals_one_process(distillation_ranks, distillation_single):
    assert distillation_ranks["wrapper"] == "DistributedDataParallel"
    assert max_param_difference(distillation_ranks, distillation_single) < 1e-6
    assert_same_logs(distillation_ranks, distillation_single, terms=True)


def test_the_trunk_outside_the_ddp_wrapper_is_not_averaged(tmp_path, distillation_single):
    outside = launch("trunk-outside-ddp", tmp_path)
    assert max_param_difference(outside, distillation_single) > 1e-3


def test_gkd_trainer_under_ddp_equals_one_process(tmp_path_factory):
    pytest.importorskip("trl", reason="trl is not installed: pip install kdfast[trl]")
    pytest.importorskip("datasets", reason="datasets is not installed: pip install kdfast[trl]")
    ranks = launch("gkd", tmp_path_factory.mktemp("gkd-ddp"))
    single = one_process("gkd", tmp_path_factory.mktemp("gkd-single"))
    assert ranks["wrapper"] == "DistributedDataParallel"
    assert max_param_difference(ranks, single) < 1e-6
    assert_same_logs(ranks, single, terms=False)


# ----------------------------------------------------------------- the checks, without processes
def fake_trainer(world_size: int, kind: str = "MULTI_CPU", average_tokens: bool = True, processes: int = 2):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(args=SimpleNamespace(world_size=world_size, average_tokens_across_devices=average_tokens),
                           accelerator=SimpleNamespace(distributed_type=DistributedType[kind], num_processes=processes))


def test_sharded_setups_are_refused_and_ddp_needs_logits_to_keep():
    from test_integrations_transformers import llama

    from kdfast.integrations.loss_call import check_data_parallel

    model = llama()
    check_data_parallel(fake_trainer(1, "NO"), model, "T")
    check_data_parallel(fake_trainer(2, "MULTI_CPU"), model, "T")
    for kind in ("FSDP", "DEEPSPEED"):
        with pytest.raises(NotImplementedError, match=f"T runs on one process or under DDP.*{kind}"):
            check_data_parallel(fake_trainer(2, kind), model, "T")

    class NoLogitsToKeep(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="NoLogitsToKeep.*logits_to_keep"):
        check_data_parallel(fake_trainer(2, "MULTI_GPU"), NoLogitsToKeep(), "T")


@pytest.mark.parametrize("world, normalizer, average, expected", [
    (1, 10.0, True, 1), (2, 10.0, True, 2), (2, None, True, 1), (2, 10.0, False, 1)])
def test_the_loss_scale_follows_the_trainers_rule(world, normalizer, average, expected):
    from kdfast.integrations.loss_call import data_parallel_loss_scale

    assert data_parallel_loss_scale(fake_trainer(world, average_tokens=average, processes=world), normalizer) == expected
