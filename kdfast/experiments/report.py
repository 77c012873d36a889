"""Summaries of the runs: per-row means with 95 % intervals, paired differences, the table and the plots.

A *row* is one scored model of one run group over the seeds: a teacher
(``"teacher:ce"``), a student (``"kd@ce"``, ``"ce"``), or one of a run's
several models (``"dual-student@ce:cnn"``, ``"mean-teacher:ema"``).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .methods import get_method
from .stats import interval, paired_difference

METRICS = ("accuracy", "nll", "ece", "confidence", "agreement")
MODEL_TITLES = {"mlp": "MLP", "cnn": "CNN", "ema": "EMA", "student": "student"}


def teacher_label(kind: Optional[str], labelled: int = 500, more_labels: Optional[int] = None) -> str:
    """A short description of a run's teacher: ``"CE teacher"``, ``"MSE teacher, 3,500 labels"``, ..."""
    if kind is None or kind == "self":
        return ""
    if "+" in kind:
        return " + ".join(k.upper() for k in kind.split("+")) + " teachers"
    if kind == "ce-overconfident":
        return "over-confident CE teacher"
    loss, _, more = kind.partition("-")
    label = f"{loss.upper()} teacher"
    if more == "more":
        label += f", {more_labels:,} labels" if more_labels else ", more labels"
    return label


def row_title(key: str, labelled: int = 500, more_labels: Optional[int] = None) -> str:
    """The table label of a row key: ``"KD (CE teacher)"``, ``"dual student (CE teacher): CNN"``, ..."""
    if key.startswith("teacher:"):
        kind = key.split(":", 1)[1]
        count = more_labels if kind.endswith("-more") else labelled
        extra = ", over-confident" if kind == "ce-overconfident" else ""
        return f"teacher: {kind.split('-')[0].upper()}-trained, {count:,} labels{extra}" if count else \
            f"teacher: {kind}"
    group, _, model = key.partition(":")
    group, _, sweep = group.partition("[")
    name, _, kind = group.partition("@")
    title = get_method(name).title
    label = teacher_label(kind or None, labelled, more_labels)
    title += f" ({label})" if label else ""
    if sweep:
        title += f" [{sweep.rstrip(']').replace('w*', 'w x')}]"
    if model:
        title += f": {MODEL_TITLES.get(model, model)}"
    return title


def _entries(record: Mapping) -> Iterable[tuple]:
    """``(row key, metrics)`` for every model a run scored."""
    models = record.get("models") or {"student": record}
    group = record.get("group") or _group_of(record)
    for name, metrics in models.items():
        yield (group if len(models) == 1 else f"{group}:{name}"), metrics


def _group_of(record: Mapping) -> str:
    if record.get("method") is None:
        return f"teacher:{record['teacher']}"
    return record["method"] + (f"@{record['teacher']}" if record.get("teacher") else "")


def per_seed_values(records: Iterable[Mapping]) -> Dict[str, Dict[str, Dict[int, float]]]:
    """``{row key: {metric: {seed: value}}}`` over the records."""
    values: Dict[str, Dict[str, Dict[int, float]]] = {}
    for record in records:
        for key, metrics in _entries(record):
            row = values.setdefault(key, {})
            for metric in METRICS:
                if metrics.get(metric) is not None:
                    row.setdefault(metric, {})[record["seed"]] = float(metrics[metric])
    return values


def summarise(records: Iterable[Mapping], *, labelled: int = 500, more_labels: Optional[int] = None) -> List[dict]:
    """One row per scored model of a run group (first-seen order): each metric's :func:`.stats.interval`
    over the seeds (with its per-seed ``values``) and the confidence bins summed over the seeds."""
    records = list(records)
    values = per_seed_values(records)
    bins: Dict[str, Dict[str, List[float]]] = {}
    meta: Dict[str, Mapping] = {}
    for record in records:
        for key, metrics in _entries(record):
            meta.setdefault(key, record)
            if metrics.get("bins"):
                total = bins.setdefault(key, {k: [0.0] * len(v) for k, v in metrics["bins"].items()})
                for k, v in metrics["bins"].items():
                    total[k] = [a + b for a, b in zip(total[k], v)]
    rows = []
    for key, by_metric in values.items():
        record = meta[key]
        seeds = sorted(by_metric["accuracy"])
        row = {"key": key, "title": row_title(key, labelled, more_labels), "method": record.get("method"),
               "teacher": record.get("teacher"), "model": key.split(":", 1)[1] if ":" in key and
               not key.startswith("teacher:") else None, "seeds": seeds}
        for metric in METRICS:
            seed_values = by_metric.get(metric)
            row[metric] = ({**interval([seed_values[s] for s in sorted(seed_values)]),
                            "values": [seed_values[s] for s in sorted(seed_values)]} if seed_values else None)
        row["bins"] = bins.get(key)
        rows.append(row)
    return rows


def baseline_keys(key: str, primary_teacher: str = "ce") -> Dict[str, Optional[str]]:
    """The rows a row is compared with: KD with the same single teacher (else the primary one) and CE only."""
    if key.startswith("teacher:"):
        return {"kd": None, "ce": None}
    if "[" in key:  # a sweep point: compare with nothing (the sweep reports validation scores)
        return {"kd": None, "ce": None}
    name, _, kind = key.split(":", 1)[0].partition("@")
    single = kind and "+" not in kind and kind != "self"
    kd = None if name == "kd" else f"kd@{kind if single else primary_teacher}"
    return {"kd": kd, "ce": None if name == "ce" else "ce"}


def add_paired_differences(rows: List[dict], primary_teacher: str = "ce") -> List[dict]:
    """Give every student row ``vs_kd`` and ``vs_ce``: the paired accuracy and ECE differences (95 % intervals)."""
    by_key = {r["key"]: r for r in rows}
    for row in rows:
        for name, other in baseline_keys(row["key"], primary_teacher).items():
            base = by_key.get(other) if other else None
            row[f"vs_{name}"] = None if base is None else {
                "baseline": other,
                **{m: paired_difference(dict(zip(row["seeds"], row[m]["values"])),
                                        dict(zip(base["seeds"], base[m]["values"])))
                   for m in ("accuracy", "ece") if row[m] and base[m]}}
    return rows


# ---------------------------------------------------------------------- text
def _pct(stat: Optional[dict], digits: int = 1, interval_too: bool = True) -> str:
    if stat is None:
        return "-"
    text = f"{100 * stat['mean']:.{digits}f}"
    if interval_too and stat.get("low") is not None:
        text += f" [{100 * stat['low']:.{digits}f}, {100 * stat['high']:.{digits}f}]"
    return text


def _delta(difference: Optional[dict], metric: str = "accuracy") -> str:
    if not difference or not difference.get(metric):
        return "-"
    d = difference[metric]
    if d["low"] is None:
        return f"{100 * d['mean']:+.1f}"
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


TABLE_HEADER = ("run", "accuracy % [95% CI]", "ECE %", "confidence %", "acc. vs KD [95% CI]", "acc. vs CE [95% CI]")


def table_cells(row: Mapping) -> tuple:
    """The cells of a row in :data:`TABLE_HEADER` order (percent; differences are paired, in points)."""
    return (row["title"], _pct(row["accuracy"], 2), _pct(row["ece"], 1, False), _pct(row["confidence"], 1, False),
            _delta(row.get("vs_kd")), _delta(row.get("vs_ce")))


def _align(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(lines)


def format_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table: accuracy with its 95 % interval, ECE and mean confidence in percent, and the
    paired accuracy differences against KD and CE only (points, 95 % intervals)."""
    return _align(TABLE_HEADER, [table_cells(r) for r in rows])


def claim_cells(claim: Mapping) -> tuple:
    d = claim["difference"]
    unit = "ECE" if claim["metric"] == "ece" else "acc."
    diff = "-" if d is None else (f"{100 * d['mean']:+.2f}" + (
        f" [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]" if d["low"] is not None else ""))
    wins = "-" if d is None else f"{d['wins']}/{d['n']}"
    return (claim["claim"], f"{claim['treatment']} - {claim['baseline']}", unit, diff, wins, claim["verdict"])


def format_claims(claims: Sequence[Mapping]) -> str:
    """The claims' paired differences (points, 95 % interval), how many seeds the treatment was higher in,
    and the verdict."""
    header = ("claim", "treatment - baseline", "metric", "difference [95% CI]", "higher", "verdict")
    return _align(header, [claim_cells(c) for c in claims])


def all_finite(rows: Sequence[Mapping]) -> bool:
    """True when every reported mean, std and interval end is a finite number."""
    return all(math.isfinite(v) for r in rows for m in METRICS if r.get(m) is not None
               for v in (r[m]["mean"], r[m]["std"], r[m].get("low"), r[m].get("high")) if v is not None)


# ---------------------------------------------------------------------- pictures
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


COLOURS = {"teacher": ("#7f7f7f", "teachers"), "none": ("#9467bd", "no pre-trained teacher"),
           "ce": ("#ff7f0e", "CE teacher, students' labels"), "mse": ("#1f77b4", "MSE teacher(s), students' labels"),
           "more": ("#2ca02c", "teacher with more labels"), "overconfident": ("#d62728", "over-confident teacher"),
           "self": ("#8c564b", "self-distillation")}


def _colour_kind(row: Mapping) -> str:
    if row["key"].startswith("teacher:"):
        return "teacher"
    teacher = row.get("teacher") or ""
    if "overconfident" in teacher:
        return "overconfident"
    if teacher.endswith("-more"):
        return "more"
    if teacher == "self":
        return "self"
    if teacher.startswith("mse"):
        return "mse"
    return "ce" if teacher else "none"


def _colour(row: Mapping) -> str:
    return COLOURS[_colour_kind(row)][0]


def plot_results(rows: Sequence[Mapping], path: str, subtitle: str = "") -> Optional[str]:
    """A PNG: accuracy (mean and 95 % interval), the paired accuracy differences against CE only and
    against KD (95 % intervals), and ECE next to the gap between mean confidence and accuracy.

    Needs matplotlib; returns None without it (the caller says so), else ``path``.
    """
    plt = _pyplot()
    if plt is None:
        return None
    n = len(rows)
    fig, axes = plt.subplots(1, 4, figsize=(20, 0.36 * n + 1.8), sharey=True,
                             gridspec_kw={"width_ratios": [1.2, 1, 1, 1.1]})
    ys = list(range(n))

    def err(stat):
        if stat is None or stat.get("low") is None:
            return 0.0, 0.0
        return 100 * (stat["mean"] - stat["low"]), 100 * (stat["high"] - stat["mean"])

    acc = [100 * r["accuracy"]["mean"] for r in rows]
    errors = list(zip(*[err(r["accuracy"]) for r in rows]))
    axes[0].barh(ys, acc, xerr=errors, capsize=2, color=[_colour(r) for r in rows], edgecolor="black", linewidth=0.4)
    low = min(a - e for a, e in zip(acc, errors[0]))
    start = max(0.0, math.floor(low - 2.0))
    axes[0].set_xlim(start, min(100.0, max(a + e for a, e in zip(acc, errors[1])) + 1.0))
    axes[0].set_xlabel(f"accuracy (%), 95% CI; the axis starts at {start:.0f}")
    from matplotlib.patches import Patch

    shown = list(dict.fromkeys(_colour_kind(r) for r in rows))
    fig.legend(handles=[Patch(color=COLOURS[k][0], label=COLOURS[k][1]) for k in shown], loc="upper center",
               ncol=len(shown), fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.5 / (0.36 * n + 1.8)))
    for ax, name, label in ((axes[1], "vs_ce", "accuracy - CE only (points, paired 95% CI)"),
                            (axes[2], "vs_kd", "accuracy - KD (points, paired 95% CI)")):
        for y, r in zip(ys, rows):
            d = (r.get(name) or {}).get("accuracy")
            if d is None:
                continue
            lo, hi = err(d)
            colour = "#2ca02c" if d["low"] is not None and d["low"] > 0 else (
                "#d62728" if d["high"] is not None and d["high"] < 0 else "#555555")
            ax.errorbar(100 * d["mean"], y, xerr=[[lo], [hi]], fmt="o", color=colour, capsize=2, markersize=4)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(label)
    ece = [100 * r["ece"]["mean"] for r in rows]
    gap = [100 * (r["confidence"]["mean"] - r["accuracy"]["mean"]) if r.get("confidence") else 0.0 for r in rows]
    axes[3].barh([y - 0.2 for y in ys], ece, height=0.4, xerr=list(zip(*[err(r["ece"]) for r in rows])), capsize=2,
                 color="#17becf", label="ECE")
    axes[3].barh([y + 0.2 for y in ys], gap, height=0.4, color="#bcbd22", label="mean confidence - accuracy")
    axes[3].axvline(0, color="black", linewidth=0.8)
    axes[3].set_xlabel("calibration (%): ECE, and over- (+) / under- (-) confidence")
    axes[3].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys)
    axes[0].set_yticklabels([r["title"] for r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("kdfast distill: MNIST-5k" + (f" ({subtitle})" if subtitle else ""))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / (0.36 * n + 1.8)))
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_reliability(rows: Sequence[Mapping], path: str, subtitle: str = "") -> Optional[str]:
    """One reliability diagram per row (its confidence bins summed over the seeds), on one PNG grid.

    Bars: accuracy per confidence bin; dots: the bin's mean confidence; the
    dashed diagonal is perfect calibration.  Needs matplotlib (None without it).
    """
    plt = _pyplot()
    if plt is None:
        return None
    rows = [r for r in rows if r.get("bins")]
    if not rows:
        return None
    columns = min(5, len(rows))
    lines = math.ceil(len(rows) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.3 * lines), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        count, conf, correct = (row["bins"][k] for k in ("count", "confidence", "correct"))
        n_bins = len(count)
        centres = [(k + 0.5) / n_bins for k in range(n_bins)]
        filled = [k for k in range(n_bins) if count[k] > 0]
        ax.bar([centres[k] for k in filled], [correct[k] / count[k] for k in filled], width=1.0 / n_bins,
               edgecolor="black", linewidth=0.4, color=_colour(row))
        ax.plot([conf[k] / count[k] for k in filled], [correct[k] / count[k] for k in filled], ".", color="black",
                markersize=3)
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{row['title']}\nECE {100 * row['ece']['mean']:.1f}%, conf. "
                     f"{100 * row['confidence']['mean']:.1f}%, acc. {100 * row['accuracy']['mean']:.1f}%",
                     fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("reliability diagrams (bins summed over seeds)" + (f": {subtitle}" if subtitle else ""))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.3 * lines)))
    fig.savefig(path, format="png", dpi=90)
    plt.close(fig)
    return path
