"""kdfast.llm.cache: top-k teacher caches written, resumed, verified and read back; no pickle anywhere."""

import json
import math
import os
import pickle
import shutil
import sys

import pytest
import torch

pytest.importorskip("safetensors", reason="kdfast.llm.cache stores its shards with the safetensors package")

from safetensors import safe_open  # noqa: E402

import kdfast  # noqa: E402
from kdfast.llm.cache import CacheCorruptedError, TopKCache, teacher_topk, write_topk_cache  # noqa: E402
from kdfast.llm.topk import topk_distill_loss  # noqa: E402

VOCAB_IN, V, K = 40, 24, 5
BATCH_SHAPE = (2, 5)  # 10 rows a batch
NUM_BATCHES = 9


class Teacher:
    """A tiny deterministic teacher: an embedding table as logits; counts its calls, can fail on call n."""

    def __init__(self, vocab_size=V, fail_on_call=None, seed=0):
        self.table = torch.randn(VOCAB_IN, vocab_size, generator=torch.Generator().manual_seed(seed)) * 3
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        return self.table[ids]


def make_batches(n=NUM_BATCHES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB_IN, BATCH_SHAPE, generator=g) for _ in range(n)]


def write(out_dir, teacher=None, batches=None, **kw):
    kw = dict(dict(k=K, tokens_per_shard=25, progress=False), **kw)
    return write_topk_cache(teacher or Teacher(), make_batches() if batches is None else batches, out_dir, **kw)


def folder_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def shard_paths(path):
    return sorted(p for p in path.iterdir() if p.suffix == ".safetensors")


# ----------------------------------------------------------------- round trip
@pytest.mark.parametrize("logprob_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_stores_the_teachers_top_k(tmp_path, logprob_dtype):
    teacher, batches = Teacher(), make_batches()
    cache = write(tmp_path, teacher, batches, logprob_dtype=logprob_dtype, teacher_name="tiny", temperature=2.0)
    assert (cache.k, cache.vocab_size, cache.logprob_dtype, cache.temperature, cache.teacher_name) == \
        (K, V, logprob_dtype, 2.0, "tiny")
    assert len(cache) == NUM_BATCHES * 10 and cache.complete
    # 25 rows a shard in whole batches of 10: shards of 30, 30, 30 rows.
    assert [shard["rows"] for shard in cache.shards] == [30, 30, 30]
    assert len(list(cache.iter_batches())) == len(batches)
    for batch, rows in zip(batches, cache.iter_batches()):
        logprobs, indices, tail = teacher_topk(teacher.table[batch], K, 2.0)
        assert torch.equal(rows.token_ids, batch)
        assert rows.topk_indices.dtype == torch.int32 and rows.topk_indices.shape == (*BATCH_SHAPE, K)
        assert torch.equal(rows.topk_indices.reshape(-1, K).long(), indices)
        assert rows.topk_logprobs.dtype == logprob_dtype
        assert torch.equal(rows.topk_logprobs.reshape(-1, K), logprobs.to(logprob_dtype))
        assert torch.equal(rows.tail_logprobs.reshape(-1), tail)
    expected = torch.log_softmax(teacher.table[batches[0]].reshape(-1, V) / 2.0, -1)
    assert torch.equal(expected.topk(K, -1).values, teacher_topk(teacher.table[batches[0]], K, 2.0)[0])


def test_rows_by_index_slice_shard_and_run(tmp_path):
    cache = write(tmp_path)
    every = [torch.cat(parts) for parts in zip(*cache)]  # iteration: one TopKRows per shard
    assert every[0].shape == (len(cache),) and every[1].shape == (len(cache), K)
    for start, stop in [(0, 90), (3, 31), (29, 61), (60, 60), (85, 200), (-7, None)]:
        rows = cache[start:stop]
        for got, want in zip(rows, every):
            assert torch.equal(got, want[start:stop])
    last = cache[-1]
    assert last.token_ids.shape == () and torch.equal(last.topk_indices, every[1][-1])
    runs = list(cache.iter_rows(16))
    assert [r.token_ids.numel() for r in runs] == [16] * 5 + [10]
    for got, want in zip(zip(*runs), every):
        assert torch.equal(torch.cat(got), want)
    with pytest.raises(IndexError, match="row 90 is out of range"):
        cache[90]
    with pytest.raises(ValueError, match="step 1"):
        cache[::2]
    with pytest.raises(ValueError, match="batch_rows"):
        list(cache.iter_rows(0))


def test_dict_batches_give_the_teacher_the_dict_and_store_its_token_ids(tmp_path):
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in make_batches()]
    cache = write(tmp_path, batches=batches)
    tensor_cache = write(tmp_path / "plain")
    for got, want in zip(cache[0:90], tensor_cache[0:90]):
        assert torch.equal(got, want)


def test_tail_logprobs_hold_the_exact_remaining_mass(tmp_path):
    teacher, batches = Teacher(), make_batches()
    cache = write(tmp_path, teacher, batches, logprob_dtype=torch.float16)
    rows = next(cache.iter_batches())
    assert rows.tail_logprobs.dtype == torch.float32 and rows.tail_logprobs.shape == BATCH_SHAPE
    logprobs = torch.log_softmax(teacher.table[batches[0]].double(), -1)
    rest = logprobs.scatter(-1, rows.topk_indices.long(), -math.inf)
    torch.testing.assert_close(rows.tail_logprobs.double(), torch.logsumexp(rest, -1), rtol=1e-6, atol=1e-6)


def test_progress_reports_each_shard_on_stderr(tmp_path, capsys):
    write(tmp_path / "loud", progress=True)
    err = capsys.readouterr().err
    assert err.count("wrote shard-") == 3 and "complete: 90 rows in 3 shards" in err
    write(tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------- resume
def interrupted(out_dir, fail_on_call, **kw):
    with pytest.raises(RuntimeError, match="simulated crash"):
        write(out_dir, Teacher(fail_on_call=fail_on_call), **kw)


def test_resume_after_a_crash_gives_the_uninterrupted_files_byte_for_byte(tmp_path):
    write(tmp_path / "whole")
    interrupted(tmp_path / "resumed", fail_on_call=8)  # shards 0 and 1 (batches 0-5) done, 6 and 7 lost
    assert [p.name for p in shard_paths(tmp_path / "resumed")] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        TopKCache(tmp_path / "resumed")
    assert len(TopKCache(tmp_path / "resumed", allow_incomplete=True)) == 60
    teacher = Teacher()
    write(tmp_path / "resumed", teacher)
    assert teacher.calls == 3, "the teacher runs only on the batches that no complete shard holds"
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")


def test_resume_after_the_batch_iterator_fails(tmp_path):
    def failing_batches():
        for number, batch in enumerate(make_batches()):
            if number == 4:
                raise OSError("data loader died")
            yield batch

    write(tmp_path / "whole")
    with pytest.raises(OSError, match="data loader died"):
        write(tmp_path / "resumed", batches=failing_batches())
    write(tmp_path / "resumed")
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")


def test_resume_before_the_first_shard_and_after_the_last(tmp_path):
    write(tmp_path / "whole")
    interrupted(tmp_path / "resumed", fail_on_call=2)  # nothing but the settings were written
    assert json.loads((tmp_path / "resumed" / "index.json").read_text())["shards"] == []
    write(tmp_path / "resumed")
    assert folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")
    teacher = Teacher()
    write(tmp_path / "resumed", teacher)  # already complete: nothing to do
    assert teacher.calls == 0 and folder_bytes(tmp_path / "resumed") == folder_bytes(tmp_path / "whole")


def test_leftover_temporaries_and_unlisted_shards_are_removed_on_resume(tmp_path):
    write(tmp_path / "whole")
    out = tmp_path / "resumed"
    interrupted(out, fail_on_call=8)
    # A crash mid-write leaves a temporary; one between rename and index update, an unlisted shard.
    (out / "shard-00002.safetensors.tmp").write_bytes(b"half a shard")
    (out / "index.json.tmp").write_bytes(b'{"format": ')
    (out / "shard-00002.safetensors").write_bytes(b"a shard the index never listed")
    (out / "notes.txt").write_text("not the writer's: left alone")
    write(out)
    files = folder_bytes(out)
    assert files.pop("notes.txt") == b"not the writer's: left alone"
    assert files == folder_bytes(tmp_path / "whole")


def test_resume_false_starts_over(tmp_path):
    write(tmp_path, k=3)
    (tmp_path / "notes.txt").write_text("kept")
    cache = write(tmp_path, k=4, resume=False, tokens_per_shard=1000)
    assert cache.k == 4 and len(cache.shards) == 1 and (tmp_path / "notes.txt").exists()
    assert [p.name for p in shard_paths(tmp_path)] == ["shard-00000.safetensors"]


def test_a_second_writer_of_the_same_folder_is_refused_until_the_first_is_done(tmp_path):
    from kdfast.llm.cache.writer import writer_lock

    pytest.importorskip("fcntl", reason="the writer lock is an flock (POSIX)")
    teacher = Teacher()
    with writer_lock(tmp_path):  # a first writer, mid-run
        with pytest.raises(RuntimeError, match="another writer"):
            write(tmp_path, teacher=teacher)
    assert teacher.calls == 0 and not shard_paths(tmp_path)
    assert len(write(tmp_path)) == NUM_BATCHES * 10  # free again


def test_the_lock_is_released_when_the_writer_fails(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        write(tmp_path, teacher=Teacher(fail_on_call=4))
    assert len(write(tmp_path)) == NUM_BATCHES * 10


@pytest.mark.parametrize("kw,pattern", [
    (dict(k=K + 1), r"k: cache has 5, asked for 6"),
    (dict(logprob_dtype=torch.float32), r"logprob_dtype: cache has 'float16', asked for 'float32'"),
    (dict(temperature=2.0), "temperature: cache has 1.0, asked for 2.0"),
    (dict(tokens_per_shard=50), "tokens_per_shard: cache has 25, asked for 50"),
    (dict(teacher_name="other"), "teacher: cache has None, asked for 'other'"),
])
def test_resume_with_other_settings_is_an_error(tmp_path, kw, pattern):
    interrupted(tmp_path, fail_on_call=8)
    with pytest.raises(ValueError, match=pattern):
        write(tmp_path, **kw)


def test_resume_with_another_teacher_or_other_batches_is_an_error(tmp_path):
    interrupted(tmp_path, fail_on_call=8)
    with pytest.raises(ValueError, match="vocabulary size is 30 in batch 6 but the cache has vocab_size 24"):
        write(tmp_path, Teacher(vocab_size=30))
    with pytest.raises(ValueError, match="batches of shard-00000.safetensors are not the ones"):
        write(tmp_path, batches=make_batches(seed=1))
    with pytest.raises(ValueError, match="batches ended after 4 batches, but the cache .* already holds 6"):
        write(tmp_path, batches=make_batches(4))
    write(tmp_path)  # the right batches still finish it
    assert TopKCache(tmp_path, verify="all").complete


# ----------------------------------------------------------------- integrity
def test_truncated_shard_is_detected_when_opened(tmp_path):
    write(tmp_path)
    shard = shard_paths(tmp_path)[1]
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CacheCorruptedError, match=r"shard-00001.safetensors .* has \d+ bytes but the index says \d+ \(truncated\)"):
        TopKCache(tmp_path)


@pytest.mark.parametrize("position", [100, -1])  # in the header, in the data
def test_one_flipped_byte_is_detected(tmp_path, position):
    write(tmp_path)
    shard = shard_paths(tmp_path)[2]
    data = bytearray(shard.read_bytes())
    data[position] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptedError, match="shard-00002.safetensors .* sha256 .* altered"):
        TopKCache(tmp_path, verify="all")
    cache = TopKCache(tmp_path)  # verify=True: sizes now, digests on first load
    assert torch.equal(cache[0:60].token_ids, torch.cat(make_batches()[:6]).reshape(-1))
    with pytest.raises(CacheCorruptedError, match="shard-00002.safetensors"):
        cache[60:61]
    with pytest.raises(CacheCorruptedError, match="shard-00002.safetensors"):
        list(cache.iter_batches())


def test_missing_shard_is_detected(tmp_path):
    write(tmp_path)
    shard_paths(tmp_path)[0].unlink()
    with pytest.raises(CacheCorruptedError, match="shard shard-00000.safetensors .* is missing"):
        TopKCache(tmp_path)
    unchecked = TopKCache(tmp_path, verify=False)
    with pytest.raises(CacheCorruptedError, match="is missing"):
        unchecked[0:1]


def test_shard_whose_contents_disagree_with_the_index_is_detected_even_unverified(tmp_path):
    write(tmp_path)
    from safetensors.torch import save_file
    save_file({"token_ids": torch.zeros(30, dtype=torch.int64), "topk_indices": torch.zeros(30, K, dtype=torch.int64),
               "topk_logprobs": torch.zeros(30, K, dtype=torch.float16), "tail_logprobs": torch.zeros(30)},
              shard_paths(tmp_path)[0])
    with pytest.raises(CacheCorruptedError, match="topk_indices is torch.int64 .* the index says torch.int32"):
        TopKCache(tmp_path, verify=False)[0:1]


def test_bad_index_is_detected(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a top-k cache"):
        TopKCache(tmp_path)
    write(tmp_path)
    index = tmp_path / "index.json"
    text = index.read_text()
    index.write_text(text[:-20])
    with pytest.raises(CacheCorruptedError, match="index.json is not valid JSON"):
        TopKCache(tmp_path)
    index.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CacheCorruptedError, match="not a kdfast-topk-cache index"):
        TopKCache(tmp_path)
    index.write_text(text.replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(CacheCorruptedError, match="format_version 99"):
        TopKCache(tmp_path)
    with pytest.raises(ValueError, match="verify must be True, False or 'all'"):
        TopKCache(tmp_path, verify="some")


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "dump"), (pickle, "dumps"),
                         (torch, "load"), (torch, "save")]:
        monkeypatch.setattr(module, name, refuse)
    cache = write(tmp_path)
    cache = TopKCache(tmp_path, verify="all")
    list(cache.iter_batches())
    # Every file is JSON or safetensors (whose header is JSON, tensors raw bytes), or the empty lock file.
    for path in tmp_path.iterdir():
        if path.name == "index.json":
            assert json.loads(path.read_text())["format"] == "kdfast-topk-cache"
        elif path.name == ".writer.lock":
            assert path.stat().st_size == 0
        else:
            with safe_open(str(path), framework="pt") as f:
                assert f.metadata() == {"format": "kdfast-topk-cache/1"}
                assert sorted(f.keys()) == ["tail_logprobs", "token_ids", "topk_indices", "topk_logprobs"]


# ----------------------------------------------------------------- a hostile or damaged index
VERIFY = [True, False, "all"]  # every setting TopKCache accepts


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished cache (3 shards of 30 rows), written once and copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("pristine") / "cache"
    write(out)
    return out


@pytest.fixture
def cache_dir(tmp_path, pristine):
    out = tmp_path / "cache"
    shutil.copytree(pristine, out)
    return out


def edit_index(folder, change):
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))


def use(folder, verify):
    """Open the cache and read every row: whatever is wrong must surface on the way."""
    cache = TopKCache(folder, verify=verify)
    list(cache.iter_batches())
    return cache


def setter(*keys_and_value):
    """``setter("shards", 0, "rows", "30")``: a change to the index setting ``index["shards"][0]["rows"] = "30"``."""
    *keys, last, value = keys_and_value

    def change(index):
        for key in keys:
            index = index[key]
        index[last] = value
    return change


def deleter(*keys):
    def change(index):
        for key in keys[:-1]:
            index = index[key]
        del index[keys[-1]]
    return change


# (change, the offending entry the message must name)
BAD_INDEXES = {
    "file None": (setter("shards", 0, "file", None), "'shards[0].file'"),
    "file nested": (setter("shards", 0, "file", {"name": "shard-00000.safetensors"}), "'shards[0].file'"),
    "file empty": (setter("shards", 0, "file", ""), "'shards[0].file'"),
    "file another name": (setter("shards", 0, "file", "index.json"), "'shards[0].file'"),
    "file in a subfolder": (setter("shards", 0, "file", "sub/shard-00000.safetensors"), "'shards[0].file'"),
    "file with unicode digits": (setter("shards", 0, "file", "shard-\u0660.safetensors"), "'shards[0].file'"),
    "file twice": (setter("shards", 1, "file", "shard-00000.safetensors"), "'shards'"),
    "rows a string": (setter("shards", 0, "rows", "30"), "'shards[0].rows'"),
    "rows negative": (setter("shards", 0, "rows", -30), "'shards[0].rows'"),
    "rows a bool": (setter("shards", 0, "rows", True), "'shards[0].rows'"),
    "rows a float": (setter("shards", 0, "rows", 30.0), "'shards[0].rows'"),
    "batch_shapes not matching rows": (setter("shards", 0, "batch_shapes", [[2, 5]]), "'shards[0].batch_shapes'"),
    "batch_shapes negative": (setter("shards", 0, "batch_shapes", [[-2, -5], [2, 5], [2, 5]]),
                              "'shards[0].batch_shapes'"),
    "batch_shapes with a bool": (setter("shards", 0, "batch_shapes", [[True, 10], [2, 5], [2, 5]]),
                                 "'shards[0].batch_shapes'"),
    "batch_shapes nested": (setter("shards", 0, "batch_shapes", [[[2, 5]], [2, 5], [2, 5]]),
                            "'shards[0].batch_shapes'"),
    "batch_shapes a string": (setter("shards", 0, "batch_shapes", "[[2, 5]]"), "'shards[0].batch_shapes'"),
    "batch_shapes empty": (setter("shards", 0, "batch_shapes", []), "'shards[0].batch_shapes'"),
    "bytes a string": (setter("shards", 0, "bytes", "1234"), "'shards[0].bytes'"),
    "bytes negative": (setter("shards", 0, "bytes", -1), "'shards[0].bytes'"),
    "sha256 None": (setter("shards", 0, "sha256", None), "'shards[0].sha256'"),
    "sha256 not hex": (setter("shards", 0, "sha256", "z" * 64), "'shards[0].sha256'"),
    "tokens_sha256 a list": (setter("shards", 0, "tokens_sha256", ["0" * 64]), "'shards[0].tokens_sha256'"),
    "shard k differs": (setter("shards", 0, "k", K + 1), "'shards[0].k'"),
    "shard vocab_size a bool": (setter("shards", 2, "vocab_size", True), "'shards[2].vocab_size'"),
    "shard dtypes differ": (setter("shards", 0, "dtypes", {"token_ids": "float32"}), "'shards[0].dtypes'"),
    "shard entry missing": (deleter("shards", 0, "sha256"), "'shards[0]' lacks the entries ['sha256']"),
    "shard not an object": (setter("shards", 1, "shard-00001.safetensors"), "'shards[1]'"),
    "shards not a list": (setter("shards", {"0": "shard-00000.safetensors"}), "'shards'"),
    "shards a string": (setter("shards", "shard-00000.safetensors"), "'shards'"),
    "complete a string": (setter("complete", "no"), "'complete'"),
    "complete an int": (setter("complete", 1), "'complete'"),
    "k a bool": (setter("k", True), "'k'"),
    "k zero": (setter("k", 0), "'k'"),
    "k a list": (setter("k", [K]), "'k'"),
    "vocab_size below k": (setter("vocab_size", K - 1), "'vocab_size'"),
    "vocab_size a string": (setter("vocab_size", "24"), "'vocab_size'"),
    "vocab_size null with shards": (setter("vocab_size", None), "'vocab_size'"),
    "temperature a string": (setter("temperature", "1.0"), "'temperature'"),
    "temperature negative": (setter("temperature", -1.0), "'temperature'"),
    "temperature NaN": (setter("temperature", float("nan")), "'temperature'"),
    "teacher nested": (setter("teacher", {"name": "tiny"}), "'teacher'"),
    "logprob_dtype nested": (setter("logprob_dtype", {"float16": 1}), "'logprob_dtype'"),
    "logprob_dtype unknown": (setter("logprob_dtype", "float64"), "'logprob_dtype'"),
    "tokens_per_shard zero": (setter("tokens_per_shard", 0), "'tokens_per_shard'"),
    "num_rows wrong": (setter("num_rows", 91), "'num_rows'"),
    "num_batches a string": (setter("num_batches", "9"), "'num_batches'"),
    "num_batches wrong": (setter("num_batches", 8), "'num_batches'"),
    "entry missing": (deleter("num_rows"), "lacks the entries ['num_rows']"),
    "format_version a bool": (setter("format_version", True), "format_version True"),
}


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("variant", BAD_INDEXES)
def test_every_entry_of_the_index_is_checked(cache_dir, variant, verify):
    change, entry = BAD_INDEXES[variant]
    edit_index(cache_dir, change)
    with pytest.raises(CacheCorruptedError) as caught:
        use(cache_dir, verify)
    message = str(caught.value)
    assert message.startswith(str(cache_dir / "index.json")), message
    assert entry in message


@pytest.mark.parametrize("verify", VERIFY)
def test_an_index_nested_too_deeply_is_corrupt_not_a_recursion_error(cache_dir, verify):
    (cache_dir / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CacheCorruptedError, match=r"index\.json is not a kdfast-topk-cache index"):
        use(cache_dir, verify)


def test_a_writer_resuming_a_damaged_index_stops(cache_dir):
    edit_index(cache_dir, setter("shards", 0, "file", "../outside.safetensors"))
    with pytest.raises(CacheCorruptedError, match=r"'shards\[0\]\.file'"):
        write(cache_dir)


# ----------------------------------------------------------------- reads outside the cache folder
SECRET = b"SECRET CONTENTS " * 321  # 5136 bytes: neither may appear in an error


def _escape(cache_dir, how, target):
    """Point shard 0 of the cache in ``cache_dir`` at ``target`` (a file outside), in the way ``how``."""
    if how == "relative":
        edit_index(cache_dir, setter("shards", 0, "file", os.path.relpath(target, cache_dir)))
    elif how == "absolute":
        edit_index(cache_dir, setter("shards", 0, "file", str(target)))
    elif how == "symlink outside":
        (cache_dir / "shard-00000.safetensors").unlink()
        (cache_dir / "shard-00000.safetensors").symlink_to(target)
    elif how == "symlink inside":  # the shard moved aside within the folder, a relative link in its place
        (cache_dir / "shard-00000.safetensors").rename(cache_dir / "moved.safetensors")
        (cache_dir / "shard-00000.safetensors").symlink_to("moved.safetensors")


_opened = None  # while a list: the paths Python code opens (the audit hook below appends to it)


def _audit(event, args):
    if event == "open" and _opened is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


@pytest.fixture
def opened_files():
    """The real paths of the files opened from Python during the test (os.open, open, Path.read_*)."""
    global _opened
    if not getattr(sys, "_kdfast_test_cache_audit", False):
        sys.addaudithook(_audit)  # hooks cannot be removed: it stays, muted, once the test is over
        sys._kdfast_test_cache_audit = True
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("target", ["valid shard", "other file"])
@pytest.mark.parametrize("how", ["relative", "absolute", "symlink outside", "symlink inside"])
def test_a_shard_outside_the_folder_or_behind_a_link_is_refused_before_it_is_opened(
        cache_dir, opened_files, how, target, verify):
    outside = cache_dir.parent / "outside.safetensors"
    if target == "valid shard":  # the very bytes the index expects: only where they are read from is wrong
        shutil.copyfile(cache_dir / "shard-00000.safetensors", outside)
    else:
        outside.write_bytes(SECRET)
    _escape(cache_dir, how, outside)
    opened_files.clear()  # the copies above
    with pytest.raises(CacheCorruptedError) as caught:
        use(cache_dir, verify)
    message = str(caught.value)
    assert str(cache_dir) in message
    assert ("'shards[0].file'" if how in ("relative", "absolute") else "shard-00000.safetensors") in message
    assert "symbolic link" in message or how in ("relative", "absolute")
    assert str(len(SECRET)) not in message and "SECRET" not in message
    assert set(opened_files) <= {os.path.realpath(cache_dir / "index.json")}, "opened before it was checked"


@pytest.mark.parametrize("verify", VERIFY)
def test_a_symlinked_index_is_refused(cache_dir, verify):
    (cache_dir / "index.json").rename(cache_dir.parent / "index.json")
    (cache_dir / "index.json").symlink_to(cache_dir.parent / "index.json")
    with pytest.raises(CacheCorruptedError, match=r"index\.json is a symbolic link"):
        use(cache_dir, verify)


@pytest.mark.parametrize("verify", VERIFY)
def test_a_cache_reached_through_a_linked_folder_still_opens(cache_dir, verify):
    link = cache_dir.parent / "link"
    link.symlink_to(cache_dir, target_is_directory=True)
    assert len(use(link, verify)) == NUM_BATCHES * 10


# ----------------------------------------------------------------- writer arguments
class NaNTeacher(Teacher):
    def __call__(self, batch):
        out = super().__call__(batch).clone()
        out[0, 0, 0] = float("nan")
        return out


@pytest.mark.parametrize("kw,error,pattern", [
    (dict(k=0), ValueError, "k must be >= 1, got k=0"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=V + 1), ValueError, "k=25 exceeds the teacher's vocabulary size V=24"),
    (dict(tokens_per_shard=0), ValueError, "tokens_per_shard must be >= 1"),
    (dict(logprob_dtype=torch.float64), ValueError, "logprob_dtype must be"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(teacher=lambda b: torch.zeros(3, V)), ValueError, r"logits shape \(3, 24\) of batch 0 .* \(2, 5\)"),
    (dict(teacher=lambda b: b), TypeError, "floating-point tensor of logits"),
    (dict(teacher="not callable"), TypeError, "teacher must be callable"),
    (dict(teacher=NaNTeacher()), ValueError, "logits of batch 0 have a row with NaN"),
    (dict(batches=[[1, 2, 3]]), TypeError, "a batch must be a tensor of token ids"),
    (dict(batches=[{"ids": torch.zeros(2, 5, dtype=torch.long)}]), TypeError, "a dict without a tensor under 'input_ids'"),
    (dict(batches=[torch.zeros(2, 5)]), TypeError, "token ids must be an integer tensor"),
])
def test_bad_writer_arguments(tmp_path, kw, error, pattern):
    teacher = kw.pop("teacher", None)
    batches = kw.pop("batches", None)
    with pytest.raises(error, match=pattern):
        write_topk_cache(Teacher() if teacher is None else teacher, make_batches() if batches is None else batches,
                         tmp_path, **dict(dict(k=K, progress=False), **kw))


# ----------------------------------------------------------------- distilling from the cache
@pytest.mark.parametrize("logprob_dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
def test_loss_from_the_cache_is_the_loss_of_the_dense_teacher_restricted_to_its_top_k(tmp_path, logprob_dtype, rtol):
    teacher, batches = Teacher(), make_batches()
    cache = write(tmp_path, teacher, batches, logprob_dtype=logprob_dtype)
    student = torch.nn.Embedding(VOCAB_IN, V)
    torch.nn.init.normal_(student.weight, std=2.0, generator=torch.Generator().manual_seed(1))
    assert len(list(cache.iter_batches())) == len(batches)
    for batch, rows in zip(batches, cache.iter_batches()):
        s = student(batch)
        t = teacher(batch)
        on_top_k = torch.zeros_like(t, dtype=torch.bool).scatter(-1, t.topk(K, -1).indices, True)
        dense = kdfast.distill_loss(torch.where(on_top_k, s, -math.inf), torch.where(on_top_k, t, -math.inf),
                                    divergence="jsd", temperature=2.0, backend="torch")
        sparse = topk_distill_loss(s, rows.topk_indices, rows.topk_logprobs, divergence="jsd", temperature=2.0)
        torch.testing.assert_close(sparse, dense, rtol=rtol, atol=1e-6)
        # The bucket with the stored float32 remainder is the dense KL up to the
        # remainder's coarsening: at least the renormalised part's share.
        bucket = topk_distill_loss(s, rows.topk_indices, rows.topk_logprobs, tail="bucket",
                                   tail_logprobs=rows.tail_logprobs)
        assert float(bucket.detach()) <= float(kdfast.distill_loss(s, t, backend="torch").detach()) * (1 + rtol)
