"""kdfast.train checkpoints: atomic writes, weights_only loading, RNG states, bit-exact resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kdfast.train import checkpoint
from kdfast.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from ddp_worker import build_run  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(value):
    return {"format": checkpoint.FORMAT_VERSION, "value": torch.tensor([value])}


def test_save_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(_state(1.0), path)
    save_checkpoint(_state(2.0), path)
    assert os.listdir(tmp_path / "ckpt") == ["last.pt"]
    assert float(load_checkpoint(path)["value"]) == 2.0


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(_state(1.0), path)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert float(load_checkpoint(path)["value"]) == 1.0
    assert os.listdir(tmp_path) == ["last.pt"]


def test_load_rejects_what_is_not_a_checkpoint(tmp_path):
    torch.save({"value": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a kdfast.train checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    save_checkpoint({"format": checkpoint.FORMAT_VERSION, "rng": checkpoint.capture_rng_state()}, tmp_path / "r.pt")

    def draws():
        return torch.rand(3).tolist(), random.random(), float(np.random.standard_normal())

    first = draws()
    checkpoint.restore_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert draws() == first


def _parameters(distiller):
    return {**{f"student.{k}": v for k, v in distiller.students[0].state_dict().items()},
            **{f"ema.{k}": v for k, v in distiller.signal.model.state_dict().items()}}


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


class Killed(Exception):
    pass


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    full, loader = build_run(batch_size=8)
    full.fit(loader, 3, progress=False)

    def crash_after_first_epoch(record):
        if record["epoch"] == 1:
            raise Killed

    first, loader = build_run(batch_size=8)
    with pytest.raises(Killed):
        first.fit(loader, 3, checkpoint_dir=tmp_path, metrics_path=tmp_path / "m.jsonl", progress=False,
                  on_epoch_end=crash_after_first_epoch)
    # A fresh process would rebuild everything: a different initialisation must not matter.
    resumed, loader = build_run(batch_size=8, init_seed=99)
    history = resumed.fit(loader, 3, checkpoint_dir=tmp_path, resume=True, metrics_path=tmp_path / "m.jsonl",
                          progress=False)
    assert [r["epoch"] for r in history] == [2, 3]
    _assert_identical(_parameters(resumed), _parameters(full))
    for mine, theirs in zip(resumed.optimizer.state.values(), full.optimizer.state.values()):
        assert torch.equal(mine["momentum_buffer"], theirs["momentum_buffer"])
    assert resumed.step == full.step and resumed.scheduler.get_last_lr() == full.scheduler.get_last_lr()
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]


def test_resuming_without_a_checkpoint_starts_afresh_and_a_fresh_run_refuses_to_overwrite(tmp_path):
    distiller, loader = build_run(batch_size=32)
    assert [r["epoch"] for r in distiller.fit(loader, 1, checkpoint_dir=tmp_path, resume=True, progress=False)] == [1]
    again, loader = build_run(batch_size=32)
    with pytest.raises(FileExistsError, match="resume=True"):
        again.fit(loader, 2, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="needs a checkpoint_dir"):
        again.fit(loader, 2, resume=True, progress=False)
    loader.sampler.seed = 8
    with pytest.raises(ValueError, match="sampler seed"):
        again.fit(loader, 2, checkpoint_dir=tmp_path, resume=True, progress=False)


@pytest.mark.slow  # two interpreter start-ups (~10 s of CPU); the in-process crash test above runs in CI
def test_a_killed_process_resumes_to_the_same_weights(tmp_path):
    """SIGKILL a training process after its first checkpoint, resume it in another process."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    ckpt = tmp_path / "ckpt"
    args = [sys.executable, WORKER, str(tmp_path), "--epochs", "3", "--checkpoint-dir", str(ckpt)]
    victim = subprocess.Popen(args + ["--stall-after-epoch", "1"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (ckpt / CHECKPOINT_NAME).exists():
            assert victim.poll() is None, victim.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.05)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    subprocess.run(args + ["--resume"], env=env, check=True, capture_output=True, timeout=120)

    full, loader = build_run(batch_size=8)
    full.fit(loader, 3, progress=False)
    _assert_identical(torch.load(tmp_path / "rank0.pt", weights_only=True), full.students[0].state_dict())
