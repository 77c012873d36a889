"""The embedded default experiment of ``kdfast distill``: distillation claims tested on MNIST-5k.

``run_experiment(ExperimentConfig(...))`` trains teachers on the students'
labelled images (an equal label budget; also, clearly named, on more labels,
and an over-confident one), then small students on a few hundred labelled
images plus the rest of the training images as an unlabelled transfer set,
with each method of :mod:`kdfast.train` at its paper's settings, over five
seeds.  It reports held-out accuracy, NLL, ECE and mean confidence with 95 %
intervals, paired differences against KD and CE only, and a verdict per
claim of the papers (:mod:`.claims`).  ``sweep=True`` instead grids
temperature and weight and scores on a validation split.
"""

from .claims import CLAIMS, Claim, evaluate_claims
from .config import ExperimentConfig, load_config_file
from .methods import METHOD_NAMES, METHODS, Method, get_method
from .report import format_claims, format_table, plot_reliability, plot_results, summarise
from .runner import Experiment, RunSpec, plan_runs, plan_stages, run_experiment
from .teachers import TEACHER_KINDS, TEACHER_NAMES, TRAINED_TEACHERS, get_teacher_kind

__all__ = [
    "CLAIMS",
    "METHODS",
    "METHOD_NAMES",
    "TEACHER_KINDS",
    "TEACHER_NAMES",
    "TRAINED_TEACHERS",
    "Claim",
    "Experiment",
    "ExperimentConfig",
    "Method",
    "RunSpec",
    "evaluate_claims",
    "format_claims",
    "format_table",
    "get_method",
    "get_teacher_kind",
    "load_config_file",
    "plan_runs",
    "plan_stages",
    "plot_reliability",
    "plot_results",
    "run_experiment",
    "summarise",
]
