"""kdfast.train checkpoints: atomic writes, checksums, weights_only loading, RNG states, bit-exact resume."""

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from kdfast.train import CheckpointCorruptedError, checkpoint, load_latest_checkpoint
from kdfast.train.checkpoint import CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME, load_checkpoint, save_checkpoint

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
    with pytest.raises(ValueError, match="not a kdfast.train checkpoint"), pytest.warns(UserWarning):
        load_checkpoint(tmp_path / "other.pt")


# ----------------------------------------------------------------- checksums
HEADER_SIZE = 119  # b"kdfast-checkpoint 1\nbytes=<20 digits> sha256=<64 hex>\n"


def _big_state(value=1.0):
    """A state whose tensor data is most of the file, so that a byte flipped mid-file lands in a weight."""
    return {"format": checkpoint.FORMAT_VERSION, "value": torch.full((1000,), value)}


def test_the_header_holds_the_length_and_sha256_of_the_payload(tmp_path):
    path = save_checkpoint(_big_state(), tmp_path / "last.pt")
    data = open(path, "rb").read()
    payload = data[HEADER_SIZE:]
    assert data[:HEADER_SIZE] == b"kdfast-checkpoint 1\nbytes=%020d sha256=%s\n" % (
        len(payload), hashlib.sha256(payload).hexdigest().encode())
    assert payload.startswith(b"PK\x03\x04")  # a torch.save archive


def _flip(position):
    def damage(data):
        data = bytearray(data)
        data[position] ^= 0x01
        return bytes(data)
    return damage


DAMAGE = {
    "flipped byte in a weight": (lambda data: _flip(len(data) // 2)(data), "is damaged: its payload has sha256"),
    "flipped last byte": (_flip(-1), "is damaged"),
    "flipped byte in the header's length": (_flip(45), "is (truncated|grown): its payload has"),
    "flipped byte in the header's digest": (_flip(HEADER_SIZE - 10), "is damaged"),
    "flipped byte in the magic": (_flip(0), "neither a kdfast checkpoint header nor a torch.save archive"),
    "truncated": (lambda data: data[:-100], r"is truncated: its payload has \d+ bytes, its header says \d+"),
    "truncated in the header": (lambda data: data[:50], "header is damaged or cut short"),
    "truncated to the header": (lambda data: data[:HEADER_SIZE], "is truncated"),
    "grown": (lambda data: data + b"\0", "is grown"),
    "empty": (lambda data: b"", "is empty"),
    "garbage": (lambda data: bytes(random.Random(0).randrange(256) for _ in range(len(data))), "neither"),
    "text": (lambda data: "checkpoint \u00e9t\u00e9\n".encode("latin-1") * 50, "neither"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_every_kind_of_damage_is_a_checkpoint_corrupted_error_naming_the_file(tmp_path, damage):
    change, pattern = DAMAGE[damage]
    path = save_checkpoint(_big_state(), tmp_path / "last.pt")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(change(data))
    with pytest.raises(CheckpointCorruptedError, match=pattern) as caught:
        load_checkpoint(path)
    assert str(caught.value).startswith(str(path))
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte in the zip", "zip signature only"])
def test_damage_to_a_checkpoint_without_checksum_is_still_named(tmp_path, damage):
    path = tmp_path / "old.pt"
    torch.save(_big_state(), path)
    data = path.read_bytes()
    data = {"truncated": data[:len(data) // 2], "flipped byte in the zip": _flip(-30)(data),
            "zip signature only": data[:4]}[damage]
    path.write_bytes(data)
    with pytest.raises(CheckpointCorruptedError, match=re.escape(str(path))), pytest.warns(UserWarning):
        load_checkpoint(path)


def test_a_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    """Checkpoints of a kdfast before checksums still resume: nothing vouches for them, and the user is told."""
    path = tmp_path / "old.pt"
    torch.save(_big_state(2.0), path)
    with pytest.warns(UserWarning, match=re.escape(str(path)) + " has no checksum"):
        state = load_checkpoint(path)
    assert torch.equal(state["value"], torch.full((1000,), 2.0))


class NotWeights:
    unpickled = False

    def __setstate__(self, state):
        NotWeights.unpickled = True


def test_loading_unpickles_no_arbitrary_object_even_with_a_valid_checksum(tmp_path):
    path = save_checkpoint({"format": checkpoint.FORMAT_VERSION, "object": NotWeights()}, tmp_path / "last.pt")
    with pytest.raises(CheckpointCorruptedError, match=re.escape(str(path)) + " cannot be loaded safely"):
        load_checkpoint(path)
    assert not NotWeights.unpickled


def test_map_location_moves_the_tensors(tmp_path):
    path = save_checkpoint({"format": checkpoint.FORMAT_VERSION, "nested": {"a": [torch.ones(2)]}}, tmp_path / "c.pt")
    assert load_checkpoint(path, torch.device("meta"))["nested"]["a"][0].device.type == "meta"


# ----------------------------------------------------------------- previous.pt
def test_save_keeps_the_checkpoint_it_replaces_as_previous(tmp_path):
    last, previous = tmp_path / CHECKPOINT_NAME, tmp_path / PREVIOUS_CHECKPOINT_NAME
    for value in (1.0, 2.0, 3.0):
        save_checkpoint(_state(value), last, previous=previous)
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME]
    assert float(load_checkpoint(last)["value"]) == 3.0 and float(load_checkpoint(previous)["value"]) == 2.0


def _training_state(epoch=1):
    distiller, loader = build_run(batch_size=32)
    return distiller.state_dict(epoch, loader.sampler)


def test_latest_checkpoint_falls_back_to_the_previous_one_when_the_last_is_damaged(tmp_path):
    last, previous = tmp_path / CHECKPOINT_NAME, tmp_path / PREVIOUS_CHECKPOINT_NAME
    assert load_latest_checkpoint(tmp_path) is None
    save_checkpoint(_training_state(1), last, previous=previous)
    save_checkpoint(_training_state(2), last, previous=previous)
    state, path = load_latest_checkpoint(tmp_path)
    assert (state["epoch"], path) == (2, str(last))
    last.write_bytes(_flip(-1)(last.read_bytes()))
    with pytest.warns(UserWarning, match=re.escape(str(last)) + " is damaged.*resuming from the previous"):
        state, path = load_latest_checkpoint(tmp_path)
    assert (state["epoch"], path) == (1, str(previous))
    last.unlink()  # a crash between renaming last.pt and writing the new one
    with pytest.warns(UserWarning, match=re.escape(str(last)) + " is missing; resuming from the previous"):
        assert load_latest_checkpoint(tmp_path)[1] == str(previous)
    last.write_bytes(b"")
    previous.write_bytes(previous.read_bytes()[:-1])
    with pytest.raises(CheckpointCorruptedError, match=f"{re.escape(str(last))} is empty; "
                                                       f"{re.escape(str(previous))} is truncated"):
        load_latest_checkpoint(tmp_path)


def _set(key, value):
    def change(state):
        state[key] = value
    return change


BAD_STATES = {
    "negative epoch": (_set("epoch", -3), "'epoch'"),
    "epoch a string": (_set("epoch", "3"), "'epoch'"),
    "epoch a bool": (_set("epoch", True), "'epoch'"),
    "epoch a float": (_set("epoch", 3.0), "'epoch'"),
    "negative step": (_set("step", -1), "'step'"),
    "no optimizer": (lambda state: state.pop("optimizer"), r"lacks the entries \['optimizer'\]"),
    "no students": (_set("students", []), "'students'"),
    "students a dict": (lambda state: state.update(students=state["students"][0]), "'students'"),
    "a weight not a tensor": (lambda state: state["students"][0].update({"0.weight": [1.0]}), r"'students\[0\]'"),
    "optimizer without param_groups": (lambda state: state["optimizer"].pop("param_groups"), "'optimizer'"),
    "scheduler a list": (_set("scheduler", []), "'scheduler'"),
    "teacher_signal None": (_set("teacher_signal", None), "'teacher_signal'"),
    "no random states": (_set("rng", []), "'rng'"),
    "random state without torch": (lambda state: state["rng"][0].pop("torch"), r"'rng\[0\]'"),
    "python random state a list": (lambda state: state["rng"][0]["python"].update(state=[1, 2]), r"'rng\[0\]'"),
    "world_size 0": (lambda state: state["data"].update(world_size=0), "'data'"),
    "sampler_seed a string": (lambda state: state["data"].update(sampler_seed="7"), "'data'"),
}


@pytest.mark.parametrize("bad", BAD_STATES)
def test_a_checkpoint_whose_state_is_not_a_training_state_is_rejected(tmp_path, bad):
    change, entry = BAD_STATES[bad]
    state = _training_state()
    checkpoint.check_training_state(state, "ok")  # the unchanged state passes
    change(state)
    path = save_checkpoint(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointCorruptedError, match=f"{re.escape(path)}.*{entry}"):
        load_latest_checkpoint(tmp_path)
    distiller, loader = build_run(batch_size=32)
    with pytest.raises(CheckpointCorruptedError, match=entry):
        distiller.fit(loader, 2, checkpoint_dir=tmp_path, resume=True, progress=False)


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


def test_resume_falls_back_to_the_previous_checkpoint_when_the_last_is_damaged(tmp_path):
    """One flipped byte in last.pt: the run resumes from previous.pt, warns, and still ends bit-identical."""
    full, loader = build_run(batch_size=16)
    full.fit(loader, 3, progress=False)

    def crash_after_second_epoch(record):
        if record["epoch"] == 2:
            raise Killed

    first, loader = build_run(batch_size=16)
    with pytest.raises(Killed):
        first.fit(loader, 3, checkpoint_dir=tmp_path, metrics_path=tmp_path / "m.jsonl", progress=False,
                  on_epoch_end=crash_after_second_epoch)
    last, previous = tmp_path / CHECKPOINT_NAME, tmp_path / PREVIOUS_CHECKPOINT_NAME
    assert load_checkpoint(previous)["epoch"] == 1
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0x10
    last.write_bytes(bytes(data))

    resumed, loader = build_run(batch_size=16, init_seed=99)
    with pytest.warns(UserWarning, match=re.escape(str(last)) + " is damaged"):
        history = resumed.fit(loader, 3, checkpoint_dir=tmp_path, resume=True, metrics_path=tmp_path / "m.jsonl",
                              progress=False)
    assert [r["epoch"] for r in history] == [2, 3]
    _assert_identical(_parameters(resumed), _parameters(full))
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    # The damaged last.pt was overwritten, not rotated over the good previous.pt.
    assert load_checkpoint(last)["epoch"] == 3 and load_checkpoint(previous)["epoch"] == 2


def test_resume_with_no_good_checkpoint_raises_and_a_fresh_run_minds_previous_pt(tmp_path):
    distiller, loader = build_run(batch_size=32)
    distiller.fit(loader, 2, checkpoint_dir=tmp_path, progress=False)
    for name in (CHECKPOINT_NAME, PREVIOUS_CHECKPOINT_NAME):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:-1])
    again, loader = build_run(batch_size=32)
    with pytest.raises(CheckpointCorruptedError, match="no good checkpoint to resume from"):
        again.fit(loader, 3, checkpoint_dir=tmp_path, resume=True, progress=False)
    (tmp_path / CHECKPOINT_NAME).unlink()
    with pytest.raises(FileExistsError, match="previous.pt exists: pass resume=True"):
        again.fit(loader, 3, checkpoint_dir=tmp_path, progress=False)


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


def test_replace_atomically_gives_new_files_the_umask_mode_and_keeps_an_existing_files_mode(tmp_path):
    import os
    import stat

    from kdfast.atomic_files import replace_atomically

    old = os.umask(0o027)
    try:
        new_file = tmp_path / "new.json"
        replace_atomically(new_file, lambda f: f.write(b"{}"))
        assert stat.S_IMODE(os.stat(new_file).st_mode) == 0o640  # not mkstemp's private 0600
        os.chmod(new_file, 0o604)
        replace_atomically(new_file, lambda f: f.write(b"[]"))
        assert stat.S_IMODE(os.stat(new_file).st_mode) == 0o604
        assert new_file.read_bytes() == b"[]"
    finally:
        os.umask(old)
