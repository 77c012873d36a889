"""The embedded default experiment of ``kdfast distill``: distillation methods compared on MNIST-5k.

``run_experiment(ExperimentConfig(...))`` trains an MSE-trained and a
CE-trained MLP teacher on the training split, then small MLP students on a
few hundred labelled images with each method (CE only, KD, TTM, WTTM, DIST,
DKD, entropy-weighted KD, dual student, mean teacher), over several seeds,
and reports held-out accuracy, NLL and ECE as mean ± std.
"""

from .config import ExperimentConfig, load_config_file
from .methods import METHOD_NAMES, METHODS, TEACHER_KINDS, Method, get_method
from .report import format_table, plot_results, summarise
from .runner import Experiment, RunSpec, plan_runs, run_experiment

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "TEACHER_KINDS",
    "Experiment",
    "ExperimentConfig",
    "Method",
    "RunSpec",
    "format_table",
    "get_method",
    "load_config_file",
    "plan_runs",
    "plot_results",
    "run_experiment",
    "summarise",
]
