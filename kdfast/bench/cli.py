"""The options of ``kdfast bench`` (and of ``benchmarks/bench_losses.py``, which is this with another default folder)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .families import BASELINES, LOSSES, Settings, cases_of, family_of
from .runner import PHASES

LLM_SHAPES = {"cpu": ["4096x32000", "1024x128256"], "cuda": ["8192x32000", "8192x128256", "4096x256000"]}
CLASSIFICATION_SHAPES = [f"{n}x{v}" for n in (256, 1024, 8192) for v in (100, 1000)]
# --quick: each family once at 256x8192 and KL also at 256x2048 (a line in the time-vs-vocabulary
# plot), float32, 3 runs, memory measured in this process: under a minute on 2 cores with cold
# torch.compile caches, where each compiled case costs seconds and each fresh interpreter more.
QUICK_CASES = [("kl", "256x2048"), *((loss, "256x8192") for loss in ("kl", "jsd", "wttm", "dkd", "topk", "fused_linear"))]
QUICK = dict(dtypes=["float32"], runs=3, memory="in-process")
DTYPES = ("float32", "bfloat16", "float16", "float64")

EXAMPLES = """\
examples:
  kdfast bench --quick --out results/            # every family at small shapes, under a minute on 2 cores
  kdfast bench --losses kl jsd --shapes 4096x32000 --dtypes float32 bfloat16
  kdfast bench --classification --losses kl dkd dist
  kdfast bench --device cuda --losses kl jsd tvd  # with Liger-Kernel side by side when it is installed
  kdfast bench --losses topk --topk 64,256 --tail renormalize,bucket --backends cpu torch  # a case per k and tail
  kdfast bench --compare results/kdfast-bench-cpu-2026-11-30-101500.json   # the same cases, as ratios

The columns: eager = the plain PyTorch code users write (F.kl_div(F.log_softmax(...)) and friends),
compile = the same under torch.compile, liger = Liger-Kernel, kdfast = the fused kernel of the device,
kdfast[torch] = kdfast's validating reference (--backends cpu torch).  A speed-up is the baseline's
median time over kdfast's.  roofline: the least bytes the loss must move (read both logits, write the
gradient; top-k: the teacher's top-k, the student logits its tail reads, the gradient) per second, as a
fraction of a plain copy's bandwidth measured in the same run.  A top-k case is named with its tail and k:
topk[bucket,k=64].
"""


def add_arguments(parser: argparse.ArgumentParser, default_out: str = ".") -> None:
    """The options of a benchmark run (``default_out``: the folder of its files)."""
    parser.add_argument("--losses", nargs="+", metavar="LOSS",
                        help=f"the losses to run (default: all): {', '.join(LOSSES)}")
    parser.add_argument("--shapes", nargs="+", metavar="NxV",
                        help="rows x vocabulary, e.g. 4096x32000 (default: LLM shapes of the device; "
                             "fused_linear, fused_linear_topk: hidden size --hidden; commas also separate)")
    parser.add_argument("--classification", action="store_true",
                        help=f"the classification shapes {', '.join(CLASSIFICATION_SHAPES)}")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, metavar="DTYPE",
                        help=f"default float32 bfloat16; one of {', '.join(DTYPES)}")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, metavar="BASELINE",
                        help=f"default all of {', '.join(BASELINES)} that run here; none: only kdfast")
    parser.add_argument("--backends", nargs="+", metavar="BACKEND",
                        help="kdfast's backends: cpu, triton, torch (default: the device's fused one)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--runs", type=int, help="timed runs of every method and phase (default 7; --quick 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them (compile: one more)")
    parser.add_argument("--phases", nargs="+", choices=("forward", "backward", "forward_backward"),
                        default=["forward", "backward", "forward_backward"])
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--topk", nargs="+", default=["64"], metavar="K",
                        help="the teacher's entries per row of the top-k losses (topk, fused_linear_topk); several "
                             "(64 256 or 64,256): a case per k (default 64)")
    parser.add_argument("--tail", nargs="+", default=["renormalize"], metavar="TAIL",
                        help="the top-k losses' tail: renormalize, bucket; both (renormalize,bucket): a case per "
                             "tail (default renormalize)")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size of the fused-linear loss's heads")
    parser.add_argument("--memory", choices=("auto", "subprocess", "in-process", "cuda", "off"),
                        help="peak extra memory per method (default auto: a fresh subprocess per method on CPU, "
                             "max_memory_allocated on CUDA; --quick: in-process)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for 'compile' ('aot_eager': trace only, a quick check)")
    parser.add_argument("--quick", action="store_true",
                        help="a minute: " + ", ".join(f"{loss} {shape}" for loss, shape in QUICK_CASES)
                             + f"; float32, {QUICK['runs']} runs, memory in-process (options given still win; "
                               "--losses or --shapes replace the case list)")
    parser.add_argument("--compare", metavar="OLD.json",
                        help="re-run the cases of an earlier result and show the new times as ratios of the old")
    parser.add_argument("--out", default=default_out, metavar="DIR",
                        help=f"folder of the JSON and the plots (default: {default_out})")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots (they need matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_shape(text: str) -> tuple:
    """``"4096x32000"`` -> ``(4096, 32000)``; ValueError naming the bad text otherwise."""
    parts = text.lower().split("x")
    try:
        N, V = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"a shape is NxV (rows x vocabulary), e.g. 4096x32000; got {text!r}") from None
    if N < 1 or V < 2:
        raise ValueError(f"a shape needs at least 1 row and a vocabulary of at least 2; got {text!r}")
    return N, V


def parse_list(values, convert=str, option: str = "") -> tuple:
    """The items of an option's values, spaces or commas between them: ``["64,256"]`` -> ``(64, 256)``."""
    items = [item for value in values for item in str(value).split(",") if item]
    try:
        return tuple(dict.fromkeys(convert(item) for item in items))
    except ValueError:
        raise ValueError(f"{option} takes a list of {convert.__name__}s; got {' '.join(map(str, values))!r}") from None


def resolve(args) -> tuple:
    """(cases, settings, run options) of parsed arguments (``--compare``: :func:`resolve_compare`)."""
    if args.compare:
        return resolve_compare(args)
    losses, shapes, dtypes, runs, memory = args.losses, args.shapes, args.dtypes, args.runs, args.memory
    pairs = None  # (loss, shape): --quick's list, unless losses or shapes are given
    if args.quick:
        dtypes, runs, memory = dtypes or QUICK["dtypes"], runs or QUICK["runs"], memory or QUICK["memory"]
        if not (losses or shapes or args.classification):
            pairs = QUICK_CASES
        else:
            losses = losses or list(dict.fromkeys(loss for loss, _ in QUICK_CASES))
            shapes = shapes or list(dict.fromkeys(shape for _, shape in QUICK_CASES))
    if pairs is None:
        losses = losses or list(LOSSES)
        shapes = shapes or (CLASSIFICATION_SHAPES if args.classification else LLM_SHAPES[args.device])
        pairs = [(loss, shape) for text in shapes for shape in text.split(",") if shape for loss in losses]
    triples = [(loss, shape, dtype) for loss, shape in pairs for dtype in dtypes or ["float32", "bfloat16"]]
    settings = Settings(device=args.device, temperature=args.temperature, topk=parse_list(args.topk, int, "--topk"),
                        tails=parse_list(args.tail, str, "--tail"), hidden=args.hidden,
                        baselines=tuple(BASELINES if args.baselines is None else args.baselines),
                        backends=tuple(args.backends or ()), compile_backend=args.compile_backend)
    return _checked(triples, settings, dict(runs=runs or 7, warmup=args.warmup, phases=list(args.phases),
                                            memory=memory or "auto", threads=args.threads,
                                            progress=not args.no_progress))


def resolve_compare(args) -> tuple:
    """The cases and settings of the earlier result ``args.compare``, in its order (a top-k loss's cases
    again one per tail and k of its settings); threads and progress as given now (a different thread
    count is the user's experiment)."""
    from .compare import cases_of, load_payload

    payload = load_payload(args.compare)
    old = cases_of(payload)
    triples = list(dict.fromkeys((r["loss"], r["shape"], r["dtype"]) for r in payload["records"]))
    settings = Settings.from_json(old)
    threads = args.threads or old.get("threads")
    return _checked(triples, settings, dict(runs=old.get("runs", 7), warmup=old.get("warmup", 1),
                                            phases=old.get("phases", list(PHASES)),
                                            memory=old.get("memory", "auto"), threads=threads,
                                            progress=not args.no_progress))


def _checked(triples, settings: Settings, options: dict) -> tuple:
    """The cases of (loss, shape, dtype) triples (a top-k loss's: one per tail and k of ``settings``),
    with clear errors for bad names and numbers."""
    for loss, _, _ in triples:
        family_of(loss)
    if options["runs"] < 1 or options["warmup"] < 0:
        raise ValueError(f"--runs must be at least 1 and --warmup at least 0; got {options['runs']} and "
                         f"{options['warmup']}")
    if options["threads"] is not None and options["threads"] < 1:
        raise ValueError(f"--threads must be at least 1; got {options['threads']}")
    cases = [case for loss, shape, dtype in triples for case in cases_of(loss, *parse_shape(shape), dtype, settings)]
    return cases, settings, options


def run_from_args(args, name: Optional[str] = None) -> dict:
    """Run, print, write the files (``name``: in their names, for several runs of one script), compare; the payload."""
    from .report import print_table, write_outputs
    from .runner import run

    cases, settings, options = resolve(args)
    payload = run(cases, settings, **options)
    if args.compare:
        from .compare import compare, load_payload, print_comparison

        payload["compare"] = compare(load_payload(args.compare), payload)
    print_table(payload)
    if payload["compare"]:
        print()
        print_comparison(payload["compare"])
    for path in write_outputs(payload, Path(args.out), plots=not args.no_plots, name=name):
        print(f"# wrote {path}")
    return payload


def main(argv: Optional[List[str]] = None, default_out: str = ".") -> int:
    """``python -m kdfast.bench``: the same as ``kdfast bench``."""
    parser = argparse.ArgumentParser(prog="kdfast bench", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_out)
    args = parser.parse_args(argv)
    try:
        run_from_args(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"kdfast bench: error: {error}", file=sys.stderr)
        return 2
    return 0
