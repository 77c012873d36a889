"""``kdfast cache build``: run a teacher once over a corpus and store its top-k log-probabilities (resumable).

The library side is :func:`kdfast.llm.cache.build_topk_cache`; its docstring
(and README, "Offline distillation from a cached top-k teacher") describes
the data formats, the packing, the example ids, resume and the checks.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """\
examples:
  kdfast cache build --teacher models/teacher --data corpus.jsonl --seq-len 512 --k 64 --out cache/
  kdfast cache build --teacher SmolLM2-135M-Instruct.Q4_1.gguf --data news.txt --seq-len 256 --k 32 \\
      --out cache/ --max-sequences 100      # a first part; the same command without the limit extends it
  kdfast cache build ... (the same arguments)     # after Ctrl-C or a crash: resumes after the last shard

data: a .txt file (documents separated by blank lines), a .jsonl file (one JSON object per line, the text
under --text-field, default "text") or a datasets save_to_disk folder (needs `pip install datasets`).
Each document is tokenized without special tokens and followed by EOS; the stream is cut into sequences
of --seq-len tokens; sequence i (its example id) is example i of
kdfast.llm.cache.TopKCacheDataset("OUT").  A folder holding a cache of other data or settings is refused.
"""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache", help="build a top-k teacher cache for offline distillation (kdfast cache build)",
        description="Top-k teacher caches: run a teacher once, distill from its stored top-k log-probabilities "
                    "many times.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="cache_command", metavar="ACTION")
    build = actions.add_parser(
        "build", help="run a teacher over a corpus and store its top-k log-probabilities per token",
        description="Run a teacher (a local Hugging Face model folder or a GGUF file) over the packed sequences of "
                    "a corpus and store, per token, its top-k log-probabilities, their indices and the float32 "
                    "log of the remaining mass (kdfast.llm.cache format). Resumable: re-run the same command "
                    "after an interruption.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--teacher", required=True, metavar="PATH",
                       help="a local model folder (config, weights, tokenizer) or a .gguf file")
    build.add_argument("--data", required=True, metavar="PATH",
                       help="a .txt file, a .jsonl file or a datasets save_to_disk folder")
    build.add_argument("--seq-len", required=True, type=int, metavar="T", help="tokens per sequence")
    build.add_argument("--k", required=True, type=int, metavar="K", help="top-k entries kept per token")
    build.add_argument("--out", required=True, metavar="DIR", help="the cache folder (created if needed)")
    build.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per teacher call (default 8)")
    build.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                       help="dtype of the stored log-probabilities (default float16; the tail is always float32)")
    build.add_argument("--teacher-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="dtype the teacher runs in (default float32)")
    build.add_argument("--device", default="cpu", help="where the teacher runs, e.g. cpu or cuda (default cpu)")
    build.add_argument("--max-sequences", type=int, default=None, metavar="N",
                       help="store only the first N sequences (a later run without it extends the cache)")
    build.add_argument("--text-field", default="text", metavar="NAME",
                       help="the JSONL field / datasets column holding the text (default text)")
    build.add_argument("--split", default=None, metavar="NAME",
                       help="the split of a datasets DatasetDict folder (default train)")
    build.add_argument("--tokens-per-shard", type=int, default=None, metavar="N",
                       help="rows per shard, the unit of resume (default 131072)")
    build.add_argument("--overwrite", action="store_true",
                       help="replace a cache already in --out (its own files only) instead of resuming it")
    build.add_argument("--no-progress", action="store_true", help="no progress bar or status lines")


def run(args, extra) -> int:
    if args.cache_command != "build":
        print("usage: kdfast cache build --teacher PATH --data PATH --seq-len T --k K --out DIR [...] "
              "(kdfast cache build --help)", file=sys.stderr)
        return 2
    from ..llm.cache.build import build_topk_cache
    from ..llm.cache.writer import DEFAULT_TOKENS_PER_SHARD

    def log(message: str) -> None:
        print(f"kdfast cache build: {message}", file=sys.stderr, flush=True)

    try:
        result = build_topk_cache(
            args.teacher, args.data, args.out, seq_len=args.seq_len, k=args.k, batch_size=args.batch_size,
            logprob_dtype=args.dtype, teacher_dtype=args.teacher_dtype, device=args.device,
            max_sequences=args.max_sequences, text_field=args.text_field, split=args.split,
            tokens_per_shard=args.tokens_per_shard or DEFAULT_TOKENS_PER_SHARD, overwrite=args.overwrite,
            progress=not args.no_progress, log=None if args.no_progress else log)
    except KeyboardInterrupt:
        print(f"kdfast cache build: interrupted; the shards written so far are kept: run the same command again "
              f"to resume ({args.out})", file=sys.stderr)
        return 130
    print(f"kdfast cache build: done: {result.summary()}")
    return 0
