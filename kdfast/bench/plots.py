"""PNG pictures of a ``kdfast bench`` result payload (schema 1).

Two figures, each answering one question:

* ``<stem>-time-vs-vocab.png``: how does the forward+backward time of each
  method grow with the vocabulary size V?  One panel per (loss, dtype, N).
* ``<stem>-roofline.png``: how close does each method get to the memory
  bandwidth of the machine?  See :func:`plot_roofline` for how to read it.

matplotlib is optional: it is imported only when a picture is asked for, and
without it :func:`write_plots` returns ``[]`` (nothing else depends on the
pictures).  This module does not import torch, so a result file can be
plotted on a machine without it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .keys import loss_label

# More panels than this make each one too small to read; the figure says when some were left out.
MAX_PANELS = 12
PANEL_COLUMNS = 3
# Methods past this many share a legend row.
LEGEND_COLUMNS = 6


def write_plots(payload: dict, out_dir: Path, stem: str) -> list[Path]:
    """Write the time-vs-vocabulary and roofline PNGs of ``payload`` into ``out_dir``.

    Returns the paths written, in that order.  The roofline figure is left out
    when no record has ``bytes_moved`` (e.g. only ``fused_linear`` cases), and
    the time figure when no record has a forward+backward median.  Without
    matplotlib, returns ``[]``: the JSON result is the product, the pictures
    are a convenience.
    """
    plt = _pyplot_or_none()
    if plt is None:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = usable_records(payload)
    machine = payload.get("machine") or {}
    written = []
    time_path = out_dir / f"{stem}-time-vs-vocab.png"
    if plot_time_vs_vocab(plt, records, machine, time_path):
        written.append(time_path)
    roofline_path = out_dir / f"{stem}-roofline.png"
    if plot_roofline(plt, records, machine, roofline_path):
        written.append(roofline_path)
    return written


def _pyplot_or_none():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def usable_records(payload: dict) -> list[dict]:
    """The records of methods that ran: those with an ``error`` or ``skipped`` have no times to draw."""
    return [r for r in payload.get("records", []) if "error" not in r and "skipped" not in r]


def forward_backward_median(record: dict) -> Optional[float]:
    """The forward+backward median in seconds, or None when the record has none (or a non-positive one)."""
    phase = (record.get("phases") or {}).get("forward_backward") or {}
    median = phase.get("median_s")
    if isinstance(median, (int, float)) and median > 0:
        return float(median)
    return None


def methods_in_order(records: list[dict]) -> list[str]:
    """Method names in order of first appearance, so that a method keeps its colour across panels."""
    return list(dict.fromkeys(r["method"] for r in records))


def _method_colours(plt, methods: list[str]) -> dict:
    palette = plt.get_cmap("tab10").colors
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _machine_label(machine: dict) -> str:
    device = machine.get("device") or "?"
    name = machine.get("gpu") if device == "cuda" else machine.get("cpu")
    return f"{device}: {name}" if name else device


def group_by_loss_dtype_n(records: list[dict]) -> dict:
    """Records with a forward+backward median, grouped by (loss, dtype, N) in record order.

    Within a group only V varies, so a group is one panel of time against V.
    The loss is its label: a top-k loss's tails and ks are panels of their own.
    """
    groups: dict = {}
    for record in records:
        if forward_backward_median(record) is None:
            continue
        key = (loss_label(record), record["dtype"], record["N"])
        groups.setdefault(key, []).append(record)
    return groups


def plot_time_vs_vocab(plt, records: list[dict], machine: dict, path: Path) -> bool:
    """Forward+backward median time (ms) against V, both axes logarithmic; one line per method.

    On log-log axes a method whose time is proportional to the bytes it
    reads is a line of slope 1; the vertical distance between two lines is
    their speed ratio, the same at every V.  A group measured at a single V
    shows one marker per method.  Returns False (writes nothing) when no
    record has a forward+backward median.
    """
    groups = group_by_loss_dtype_n(records)
    if not groups:
        return False
    shown = list(groups.items())[:MAX_PANELS]
    methods = methods_in_order([r for _, group in shown for r in group])
    colours = _method_colours(plt, methods)
    columns = min(PANEL_COLUMNS, len(shown))
    rows = math.ceil(len(shown) / columns)
    legend_rows = math.ceil(len(methods) / LEGEND_COLUMNS)
    legend_inches = 0.3 * legend_rows + 0.2
    height = 3.0 * rows + 0.6 + legend_inches
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, height), squeeze=False)
    try:
        for ax, ((loss, dtype, n), group) in zip(axes.flat, shown):
            _draw_time_panel(ax, group, colours)
            ax.set_title(f"{loss} {dtype} N={n}", fontsize="medium")
        for ax in list(axes.flat)[len(shown):]:
            ax.set_visible(False)
        title = f"kdfast bench: forward+backward median time vs vocabulary size ({_machine_label(machine)})"
        if len(groups) > len(shown):
            title += f"\nfirst {len(shown)} of {len(groups)} (loss, dtype, N) groups shown"
        fig.suptitle(title, fontsize="medium")
        handles = [plt.Line2D([], [], color=colours[m], marker="o", label=m) for m in methods]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(methods), LEGEND_COLUMNS), fontsize="small",
                   frameon=False)
        fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)
    return True


def _draw_time_panel(ax, group: list[dict], colours: dict) -> None:
    for method in methods_in_order(group):
        points = sorted((r["V"], forward_backward_median(r) * 1e3) for r in group if r["method"] == method)
        ax.plot([v for v, _ in points], [ms for _, ms in points], marker="o", color=colours[method], label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("fwd+bwd median (ms)")
    ax.grid(True, which="both", alpha=0.3)


def throughput_GBps(record: dict) -> Optional[float]:
    """Achieved bandwidth: the minimal bytes the loss must move over its forward+backward median, in GB/s."""
    median = forward_backward_median(record)
    moved = record.get("bytes_moved")
    if median is None or not moved:
        return None
    return moved / median / 1e9


def _positive_or_none(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def plot_roofline(plt, records: list[dict], machine: dict, path: Path) -> bool:
    """Achieved throughput (GB/s) per case and method as horizontal bars, against the copy bandwidth.

    How to read it: ``bytes_moved`` is the least traffic the loss needs
    (read the logits once, write the gradient once, ...), so a bar that
    reaches the "copy roofline" line means the kernel moves its minimal
    bytes as fast as a plain memory copy does on this machine; it cannot
    do better without moving fewer bytes.  The percentage next to each
    kdfast bar is its ``roofline_fraction``: how close it gets.  A bar past
    the line (above 100%) is possible only where the copy measurement
    under-estimates what the memory system delivers, e.g. small shapes that
    stay in cache.  The dashed "nominal" line, when the machine reports
    one, is the datasheet bandwidth, which copies rarely reach.

    Returns False (writes nothing) when no record has both ``bytes_moved``
    and a forward+backward median.
    """
    measured = [r for r in records if throughput_GBps(r) is not None]
    if not measured:
        return False
    cases = list(dict.fromkeys((loss_label(r), r["shape"], r["dtype"]) for r in measured))
    methods = methods_in_order(measured)
    colours = _method_colours(plt, methods)
    bar_height = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9.5, 0.5 * len(cases) * max(1.0, 0.45 * len(methods)) + 1.8))
    try:
        for record in measured:
            y = cases.index((loss_label(record), record["shape"], record["dtype"]))
            y += (methods.index(record["method"]) - (len(methods) - 1) / 2) * bar_height
            _draw_throughput_bar(ax, record, y, bar_height, colours[record["method"]])
        _draw_bandwidth_lines(ax, machine)
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([f"{loss} {shape} {dtype}" for loss, shape, dtype in cases], fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel("achieved throughput: bytes_moved / fwd+bwd median (GB/s)")
        ax.grid(axis="x", alpha=0.3)
        bars = [plt.Rectangle((0, 0), 1, 1, color=colours[m]) for m in methods]
        lines, line_labels = ax.get_legend_handles_labels()
        ax.legend(bars + lines, methods + line_labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  fontsize="small", frameon=False)
        ax.set_title(f"kdfast bench: throughput against the memory roofline ({_machine_label(machine)})",
                     fontsize="medium")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)
    return True


def _draw_throughput_bar(ax, record: dict, y: float, height: float, colour) -> None:
    speed = throughput_GBps(record)
    ax.barh(y, speed, height=height, color=colour, edgecolor="black", linewidth=0.4)
    fraction = record.get("roofline_fraction")
    if record.get("kind") == "kdfast" and isinstance(fraction, (int, float)):
        ax.annotate(f"{100 * fraction:.0f}%", (speed, y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize="x-small")


def _draw_bandwidth_lines(ax, machine: dict) -> None:
    copy = _positive_or_none(machine.get("copy_bandwidth_GBps"))
    if copy is not None:
        ax.axvline(copy, color="red", linewidth=1.5, label=f"copy roofline ({copy:.1f} GB/s)")
    nominal = _positive_or_none(machine.get("nominal_bandwidth_GBps"))
    if nominal is not None:
        ax.axvline(nominal, color="gray", linestyle="--", linewidth=1.2, label=f"nominal ({nominal:.1f} GB/s)")
