"""Summaries of the runs: mean ± std over seeds, the printed table, results.json and the bar chart."""

from __future__ import annotations

import math
import statistics
from typing import Dict, Iterable, List, Optional, Sequence

from .methods import get_method

METRICS = ("accuracy", "nll", "ece", "agreement")
TEACHER_TITLES = {"mse": "MSE-trained", "ce": "CE-trained"}


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std", "n"}``; ``std`` is the sample standard deviation, None for fewer than 2 values."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def row_title(method: Optional[str], teacher: Optional[str]) -> str:
    """The table label of a group: ``"KD (MSE-trained teacher)"``, ``"teacher (CE-trained)"``, ``"CE only"``."""
    if method is None:
        return f"teacher ({TEACHER_TITLES[teacher]})"
    title = get_method(method).title
    return f"{title} ({TEACHER_TITLES[teacher]} teacher)" if teacher else title


def summarise(records: Iterable[dict]) -> List[dict]:
    """One row per (method, teacher) in first-seen order, each metric as :func:`mean_std` over the seeds."""
    groups: Dict[tuple, List[dict]] = {}
    for record in records:
        groups.setdefault((record["method"], record["teacher"]), []).append(record)
    rows = []
    for (method, teacher), members in groups.items():
        row = {"title": row_title(method, teacher), "method": method, "teacher": teacher,
               "seeds": [m["seed"] for m in members]}
        for metric in METRICS:
            values = [m[metric] for m in members if m.get(metric) is not None]
            row[metric] = mean_std(values) if values else None
        rows.append(row)
    return rows


def _cell(stat: Optional[dict], scale: float, digits: int) -> str:
    if stat is None:
        return "-"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['std'] * scale:.{digits}f}" if stat["std"] is not None else "")


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table: accuracy and ECE in percent, NLL in nats, agreement with the teacher in percent."""
    header = ("run", "accuracy %", "NLL", "ECE %", "agrees w/ teacher %")
    body = [(r["title"], _cell(r["accuracy"], 100, 2), _cell(r["nll"], 1, 3), _cell(r["ece"], 100, 2),
             _cell(r["agreement"], 100, 1)) for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def all_finite(rows: Sequence[dict]) -> bool:
    """True when every reported mean and std is a finite number."""
    return all(math.isfinite(v) for r in rows for m in METRICS if r[m] is not None
               for v in (r[m]["mean"], r[m]["std"]) if v is not None)


def plot_results(rows: Sequence[dict], path: str, subtitle: str = "") -> Optional[str]:
    """A PNG with held-out accuracy and ECE per run (bars: mean over seeds, error bars: std).

    Needs matplotlib; returns None without it (the caller says so), else ``path``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colours = {None: "#7f7f7f", "mse": "#1f77b4", "ce": "#ff7f0e"}
    titles = [r["title"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.6), sharey=True)
    panels = ((axes[0], "accuracy", "held-out accuracy (%)"), (axes[1], "ece", "ECE (%), lower is better"))
    for ax, metric, label in panels:
        means = [100 * r[metric]["mean"] for r in rows]
        errors = [100 * (r[metric]["std"] or 0.0) for r in rows]
        ax.barh(range(len(rows)), means, xerr=errors, capsize=3, color=[colours[r["teacher"]] for r in rows],
                edgecolor="black", linewidth=0.5)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
        if metric == "accuracy":
            low = min(m - e for m, e in zip(means, errors))
            start = max(0.0, low - 2.0)
            ax.set_xlim(start, min(100.0, max(m + e for m, e in zip(means, errors)) + 1.0))
            if start > 0:  # the differences are a few points: say so rather than hide them at full scale
                ax.set_xlabel(f"{label}; the axis starts at {start:.0f}")
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(titles)
    axes[0].invert_yaxis()
    fig.suptitle("kdfast distill: students on MNIST-5k" + (f" ({subtitle})" if subtitle else ""))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path
