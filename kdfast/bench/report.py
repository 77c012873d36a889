"""The printed table and the files of a run: ``<stem>.json`` and its plots, in the folder the user chose.

The JSON (``schema`` 1)::

    {"benchmark": "kdfast bench", "schema": 1, "created": ISO time,
     "machine": {device, cpu, logical_cpus, torch_threads, torch, kdfast, kdfast_cpu_capability,
                 torch_cpu_capability, gpu, python, load_average_1m, copy_bandwidth_GBps, nominal_bandwidth_GBps},
     "settings": {losses, shapes, dtypes, device, baselines, backends, runs, warmup, settle_below_s,
                  temperature, phases, memory, topk: [k, ...], tails: [tail, ...], hidden, threads, compile_backend},
     "records": [{loss, family, shape, N, V, dtype, [tail, topk,] method, kind ("baseline" | "kdfast"),
                  phases: {forward | backward | forward_backward:
                           {times_s: [...], median_s, q1_s, q3_s, min_s, spread = (q3 - q1) / median}},
                  peak_extra_bytes, bytes_moved, roofline_fraction, nominal_roofline_fraction,
                  value, value_rel_diff, settled (an untimed call began each of its turns)}                       # or "error" / "skipped" instead of the numbers
                 ...],
     "ratios": [{loss, shape, dtype, [tail, topk,] method, baseline, forward, backward, forward_backward}, ...],
     "compare": null or the comparison with an earlier result (kdfast.bench.compare)}

A ratio is the baseline's median time over kdfast's: above 1, kdfast is faster.
``tail`` and ``topk`` name the case of a top-k loss (``topk``,
``fused_linear_topk``: one case per tail and k of the settings) and are absent
from the other records; an earlier result's ``settings.topk`` may be a number.
``roofline_fraction``: the least bytes a forward+backward must move (read both
logits, write the gradient; top-k: the teacher's top-k, the student's logits
that the tail reads and the gradient, ``families.topk_bytes``) over its median
time, as a fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path
from typing import List, Optional

from .keys import case_key, case_label, loss_label
from .machine import describe_machine

PHASE_LABELS = {"forward": "fwd", "backward": "bwd", "forward_backward": "fwd+bwd"}


def _ms(record: Optional[dict], phase: str = "forward_backward") -> str:
    if record is None:
        return f"{'-':>11s}"
    if "error" in record:
        return f"{'OOM' if record['error'] == 'out of memory' else 'failed':>11s}"
    summary = record.get("phases", {}).get(phase)
    if summary is None:
        return f"{'n/a':>11s}"
    return f"{summary['median_s'] * 1e3:8.2f}±{summary['spread'] * 100:2.0f}%"[:11].rjust(11)


def print_table(payload: dict, file=None) -> None:
    """The machine, then per case each method's forward+backward median (± relative spread), kdfast's
    ratios against each baseline (forward / backward / both), its roofline fraction and peak memory."""
    file = file or sys.stdout  # looked up now: a redirected stdout counts
    info, settings, records = payload["machine"], payload["settings"], payload["records"]
    print(f"# {describe_machine(info)}", file=file)
    print(f"# copy bandwidth {info['copy_bandwidth_GBps']:.1f} GB/s (read+write, measured in this run)"
          + (f"; nominal {info['nominal_bandwidth_GBps']:.0f} GB/s" if info.get("nominal_bandwidth_GBps") else "")
          + f"; medians of {settings['runs']} runs per method, taken in turns; T = {settings['temperature']}"
          + f"; memory: {settings['memory']}", file=file)
    cases: dict = {}
    for r in records:
        cases.setdefault(case_key(r), {})[r["method"]] = r
    methods = list(dict.fromkeys(r["method"] for r in records if "skipped" not in r))
    width = max([16] + [len(loss_label(r)) for r in records])  # a top-k case's label names its tail and k
    header = (f"{'loss':{width}s} {'shape':>12s} {'dtype':>9s} " + " ".join(f"{m[:11]:>11s}" for m in methods)
              + f" {'roofline':>8s} {'peak MB':>8s}")
    print("\nforward+backward, ms (± (q3 - q1) / median):", file=file)
    print(header, file=file)
    print("-" * len(header), file=file)
    for by in cases.values():
        first = next(iter(by.values()))
        # kdfast's numbers; where it did not run (a tail without a fused kernel), the other kdfast method's
        ran = [r for m, r in by.items() if m.startswith("kdfast") and "phases" in r]
        kd = next((r for r in ran if r["method"] == "kdfast"), ran[0] if ran else None)
        roof = kd.get("roofline_fraction") if kd else None
        peak = kd.get("peak_extra_bytes") if kd else None
        print(f"{loss_label(first):{width}s} {first['shape']:>12s} {first['dtype']:>9s} "
              + " ".join(_ms(by.get(m)) for m in methods)
              + (f" {roof * 100:7.0f}%" if roof is not None else f" {'-':>8s}")
              + (f" {peak / 2**20:8.1f}" if peak is not None else f" {'-':>8s}"), file=file)
    phases = settings["phases"]
    if payload["ratios"]:
        print(f"\nspeed-up of kdfast (baseline time / kdfast time; {' / '.join(PHASE_LABELS[p] for p in phases)}):",
              file=file)
        for row in payload["ratios"]:
            cells = " / ".join(f"{row[p]:.2f}x" if row.get(p) else "-" for p in phases)
            print(f"  {loss_label(row):{width}s} {row['shape']:>12s} {row['dtype']:>9s} {row['method']} vs "
                  f"{row['baseline']:8s} {cells}", file=file)
    for row in dtype_speedups(records):
        print(f"# {row['loss']} {row['shape']}: kdfast bfloat16 {row['bf16_speedup_over_fp32']:.2f}x faster than "
              f"float32", file=file)
    for r in records:
        if "error" in r:
            print(f"# failed: {case_label(r)} {r['method']}: {r['error']}", file=file)
    skipped = {(r["method"], r["skipped"]) for r in records if "skipped" in r}
    for method, why in sorted(skipped):
        print(f"# not run: {method}: {why}", file=file)


def output_stem(payload: dict, name: Optional[str] = None) -> str:
    """``kdfast-bench-[<name>-]<device>-<date>-<time>``: a name that does not overwrite an earlier run's files
    (``name`` tells apart the runs of one script, which may end within the same second)."""
    created = _dt.datetime.fromisoformat(payload["created"])
    device = payload["machine"]["device"]
    return f"kdfast-bench-{name + '-' if name else ''}{device}-{created:%Y-%m-%d-%H%M%S}"


def write_outputs(payload: dict, out_dir: Path, plots: bool = True, name: Optional[str] = None) -> List[Path]:
    """Writes ``<stem>.json`` and (matplotlib installed, ``plots``) the PNGs into ``out_dir``; their paths."""
    from .plots import write_plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(payload, name)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    written = [json_path]
    if plots:
        written += write_plots(payload, out_dir, stem)
    return written


def dtype_speedups(records: List[dict]) -> List[dict]:
    """Per (loss, shape) measured in float32 and bfloat16: kdfast's float32 time over its bfloat16 time.

    A memory-bound kernel should approach the ratio of the bytes it moves
    (1.5x for KL: two 4-byte reads and a write become 2-byte ones).
    """
    # "loss" is the loss's label here: a top-k case's float32 and bfloat16 runs of one tail and k pair up
    kernel = {(loss_label(r), r["shape"], r["dtype"]): r["phases"]["forward_backward"]["median_s"]
              for r in records if r["method"] == "kdfast" and "forward_backward" in r.get("phases", {})}
    return [{"loss": loss, "shape": shape, "bf16_speedup_over_fp32": fp32 / kernel[(loss, shape, "bfloat16")]}
            for (loss, shape, dtype), fp32 in kernel.items()
            if dtype == "float32" and (loss, shape, "bfloat16") in kernel]


def missing_ratios(payload: dict) -> List[str]:
    """The cases that do not report a speed-up against each baseline that ran (empty: every case does)."""
    measured: dict = {}
    for r in payload["records"]:
        if "phases" in r:
            measured.setdefault(case_key(r), (case_label(r), set()))[1].add(r["method"])
    have = {(case_key(x), x["method"], x["baseline"]) for x in payload["ratios"] if x.get("forward_backward")}
    problems = []
    for case, (label, methods) in measured.items():
        ours = [m for m in methods if m.startswith("kdfast")]
        theirs = [m for m in methods if not m.startswith("kdfast")]
        if not ours:
            problems.append(f"{label}: kdfast did not run")
        if not theirs:
            problems.append(f"{label}: no baseline ran")
        problems += [f"{label}: no ratio of {m} against {b}" for m in ours for b in theirs
                     if (case, m, b) not in have]
    return problems
