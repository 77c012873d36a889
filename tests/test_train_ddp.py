"""The Distiller under torchrun: two gloo processes with DistributedDataParallel on the CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from kdfast.train import load_checkpoint
from kdfast.train.checkpoint import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME

sys.path.insert(0, os.path.dirname(__file__))
from ddp_worker import build_run  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def test_two_ranks_end_identical_and_equal_to_one_process_with_the_global_batch(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    ckpt = tmp_path / "ckpt"
    # No input noise and no dropout: those draw from each rank's own generator, which one process cannot repeat.
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
         str(tmp_path), "--epochs", "2", "--batch-size", "8", "--noise", "0", "--dropout", "0",
         "--checkpoint-dir", str(ckpt)],
        env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-4000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"

    # One process, twice the per-rank batch: the same samples per optimizer step, the same global normaliser.
    torch.set_num_threads(1)
    single, loader = build_run(batch_size=16, noise=0.0, dropout=0.0)
    history = single.fit(loader, 2, progress=False)
    for name, value in single.students[0].state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6)

    # Only rank 0 wrote: one metrics line per epoch, one checkpoint holding both ranks' random states.
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    # The logged losses are the global ones (each rank's share summed), as in the one-process run.
    for logged, expected in zip(lines, history):
        assert logged["losses"] == pytest.approx(expected["losses"], rel=1e-5)
    state = load_checkpoint(ckpt / CHECKPOINT_NAME)
    assert len(state["rng"]) == 2 and state["data"]["world_size"] == 2
    assert sorted(os.listdir(ckpt)) == sorted([CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME])  # only rank 0 writes
