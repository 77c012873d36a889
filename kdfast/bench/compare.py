"""Comparing a new ``kdfast bench`` result payload (schema 1) against an old one.

A timing is called a regression or an improvement only when it moved by
more than the noise the two runs themselves measured: the tolerance of a
row is the sum of the relative interquartile spreads of its old and new
timings, and never less than ``min_tolerance``.  Ratios between payloads of
different machines measure the machines as much as the code, and so do
payloads timed under different timing rules (a method settled before its
turns in one and not in the other, another warm-up): such a comparison
carries a warning.

This module does not import torch: a comparison can be made wherever the
two JSON files are.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Optional, TextIO

from .keys import VARIANT_FIELDS, case_key, loss_label, variant_of

BENCHMARK_NAME = "kdfast bench"
SCHEMA_VERSION = 1

# The settings a runner needs to measure the very same cases again.
RERUN_SETTINGS = ("losses", "shapes", "dtypes", "device", "baselines", "backends", "runs", "warmup",
                  "temperature", "topk", "tails", "hidden", "phases", "compile_backend", "memory", "threads")

# Machine fields that change timings by themselves: a difference in one makes ratios incomparable.
MACHINE_FIELDS_COMPARED = ("device", "cpu", "torch_threads", "kdfast_cpu_capability", "gpu")

# Settings that change how a method is timed (not what is timed): a difference makes ratios incomparable.
# A payload from before the runner settled fast methods has no settle_below_s (None).
TIMING_SETTINGS_COMPARED = ("settle_below_s", "warmup", "compile_backend")

# What the comparison says about the old payload it was made against.
MACHINE_SUMMARY_FIELDS = ("device", "cpu", "gpu", "torch_threads", "kdfast_cpu_capability", "torch", "kdfast")

REGRESSION = "regression"
IMPROVEMENT = "improvement"
SAME = "same"


def check_payload(payload, source: str = "payload") -> None:
    """Raise ValueError unless ``payload`` is a schema-1 ``kdfast bench`` result; ``source`` names it in the message."""
    if not isinstance(payload, dict):
        raise ValueError(f"{source} is not a kdfast bench result: expected a JSON object, got {type(payload).__name__}")
    if payload.get("benchmark") != BENCHMARK_NAME:
        raise ValueError(f"{source} is not a kdfast bench result: its 'benchmark' is {payload.get('benchmark')!r}, "
                         f"expected {BENCHMARK_NAME!r}")
    if payload.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{source} is a kdfast bench result of schema {payload.get('schema')!r}; "
                         f"this version reads schema {SCHEMA_VERSION}")


def cases_of(payload: dict) -> dict:
    """The settings that re-run the cases of ``payload`` (a copy: changing it leaves the payload alone).

    Settings missing from the payload are left out, so that the runner's
    defaults apply to them.
    """
    check_payload(payload)
    settings = payload.get("settings")
    if not isinstance(settings, dict):
        raise ValueError("payload is not a complete kdfast bench result: it has no 'settings' object")
    return {key: copy.deepcopy(settings[key]) for key in RERUN_SETTINGS if key in settings}


def load_payload(path) -> dict:
    """Read a ``kdfast bench`` result JSON from ``path``.

    Raises FileNotFoundError naming the path when it does not exist, and
    ValueError when the file is not JSON or not a kdfast bench result.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no kdfast bench result at {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError both are ValueErrors
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    check_payload(payload, source=str(path))
    return payload


def _failed(record: dict) -> bool:
    return "error" in record or "skipped" in record


def _failure_reason(record: dict) -> str:
    return record.get("error") or record.get("skipped") or "failed"


def _record_key(record: dict) -> tuple:
    """``(loss, shape, dtype, tail, topk, method)``: one method of one case (None where a field does not apply)."""
    return (*case_key(record), record["method"])


def _median(phase) -> Optional[float]:
    """The phase's median in seconds, or None when it has none usable (a ratio needs a positive one)."""
    if not isinstance(phase, dict):
        return None
    median = phase.get("median_s")
    return float(median) if isinstance(median, (int, float)) and median > 0 else None


def _spread(phase: dict) -> float:
    """The relative interquartile spread (q3 - q1) / median: the payload's, else computed, else 0."""
    spread = phase.get("spread")
    if isinstance(spread, (int, float)) and spread >= 0:
        return float(spread)
    q1, q3, median = phase.get("q1_s"), phase.get("q3_s"), _median(phase)
    if median is not None and isinstance(q1, (int, float)) and isinstance(q3, (int, float)):
        return max(0.0, (q3 - q1) / median)
    return 0.0


def verdict_of(ratio: float, tolerance: float) -> str:
    """``regression`` past ``1 + t`` slower, ``improvement`` past ``1 + t`` faster, else ``same``.

    Symmetric in log space, so that swapping the two payloads swaps the verdicts.
    """
    if ratio > 1 + tolerance:
        return REGRESSION
    if ratio < 1 / (1 + tolerance):
        return IMPROVEMENT
    return SAME


def compare_phase(old_phase: dict, new_phase: dict, min_tolerance: float) -> dict:
    """old_s, new_s, ratio, tolerance and verdict of one phase measured in both payloads."""
    old_s, new_s = _median(old_phase), _median(new_phase)
    ratio = new_s / old_s
    tolerance = max(min_tolerance, _spread(old_phase) + _spread(new_phase))
    return {"old_s": old_s, "new_s": new_s, "ratio": ratio, "tolerance": tolerance,
            "verdict": verdict_of(ratio, tolerance)}


def machine_differences(old_machine: dict, new_machine: dict) -> dict:
    """``{field: [old, new]}`` for the machine fields that differ and would change timings by themselves."""
    return _differences(old_machine, new_machine, MACHINE_FIELDS_COMPARED)


def timing_differences(old_settings: dict, new_settings: dict) -> dict:
    """``{setting: [old, new]}`` for the timing rules (``TIMING_SETTINGS_COMPARED``) that differ."""
    return _differences(old_settings, new_settings, TIMING_SETTINGS_COMPARED)


def _differences(old: dict, new: dict, fields: tuple) -> dict:
    return {field: [old.get(field), new.get(field)] for field in fields if old.get(field) != new.get(field)}


def _describe(key: tuple) -> str:
    """``"loss shape dtype method"``, the loss with its top-k variant (``topk[bucket,k=64]``) where it has one."""
    loss, shape, dtype, *variant, method = key
    record = dict(zip(VARIANT_FIELDS, variant), loss=loss, shape=shape, dtype=dtype)
    return f"{loss_label(record)} {shape} {dtype} {method}"


def compare(old: dict, new: dict, min_tolerance: float = 0.05) -> dict:
    """Compare every (case, method, phase) timed in both ``old`` and ``new``.

    Returns ``{"against", "rows", "regressions", "improvements", "missing",
    "machine_differences", "timing_differences", "warning"}`` (JSON-serialisable:
    the runner stores it as the new payload's ``compare``).  ``rows`` follow
    the old payload's order; ``missing`` lists, as short strings, what old
    timed and new did not (absent, failed or skipped in new, or a phase
    without a median).  ``warning`` is None unless the machines or the timing
    rules differ.
    """
    check_payload(old, source="old payload")
    check_payload(new, source="new payload")
    new_records = {_record_key(r): r for r in new.get("records", [])}
    rows, missing = [], []
    for old_record in old.get("records", []):
        if _failed(old_record):
            continue
        key = _record_key(old_record)
        new_record = new_records.get(key)
        if new_record is None:
            missing.append(f"{_describe(key)}: absent in new")
        elif _failed(new_record):
            missing.append(f"{_describe(key)}: failed in new ({_failure_reason(new_record)})")
        else:
            _compare_phases(old_record, new_record, min_tolerance, rows, missing)
    old_machine, new_machine = old.get("machine") or {}, new.get("machine") or {}
    differences = machine_differences(old_machine, new_machine)
    timing = timing_differences(old.get("settings") or {}, new.get("settings") or {})
    return {
        "against": {"created": old.get("created"), **{f: old_machine.get(f) for f in MACHINE_SUMMARY_FIELDS}},
        "rows": rows,
        "regressions": sum(row["verdict"] == REGRESSION for row in rows),
        "improvements": sum(row["verdict"] == IMPROVEMENT for row in rows),
        "missing": missing,
        "machine_differences": differences,
        "timing_differences": timing,
        "warning": _warning(differences, timing),
    }


def _compare_phases(old_record: dict, new_record: dict, min_tolerance: float, rows: list, missing: list) -> None:
    key = _record_key(old_record)
    new_phases = new_record.get("phases") or {}
    for phase_name, old_phase in (old_record.get("phases") or {}).items():
        if _median(old_phase) is None:
            continue
        new_phase = new_phases.get(phase_name)
        if _median(new_phase) is None:
            missing.append(f"{_describe(key)} {phase_name}: no median in new")
            continue
        row = dict(loss=old_record["loss"], shape=old_record["shape"], dtype=old_record["dtype"],
                   **variant_of(old_record), method=old_record["method"], phase=phase_name)
        row.update(compare_phase(old_phase, new_phase, min_tolerance))
        rows.append(row)


def _changes(differences: dict) -> str:
    return ", ".join(f"{field} {old!r} -> {new!r}" for field, (old, new) in differences.items())


def _warning(machine: dict, timing: dict) -> Optional[str]:
    parts = []
    if machine:
        parts.append(f"the two results come from different machines ({_changes(machine)}): their ratios measure "
                     "the machines as much as the code and are not regressions of kdfast")
    if timing:
        parts.append(f"the two results were timed under different rules ({_changes(timing)}): their ratios "
                     "measure the rules as much as the code")
    return "; ".join(parts) or None


def _format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


VERDICT_MARKS = {REGRESSION: "REGRESSION", IMPROVEMENT: "improvement", SAME: "same"}


def print_comparison(result: dict, file: Optional[TextIO] = None) -> None:
    """Print ``result`` of :func:`compare`: one line per row, a summary line, the missing cases and the warning.

    ``file`` defaults to the ``sys.stdout`` of the moment of the call (not of
    the import), so that redirections made later are honoured.
    """
    if file is None:
        file = sys.stdout
    header = ("loss", "shape", "dtype", "method", "phase", "old ms", "new ms", "ratio", "noise", "verdict")
    lines = [header] + [
        (loss_label(row), row["shape"], row["dtype"], row["method"], row["phase"], _format_ms(row["old_s"]),
         _format_ms(row["new_s"]), f"{row['ratio']:.3f}x", f"{100 * row['tolerance']:.0f}%",
         VERDICT_MARKS.get(row["verdict"], row["verdict"]))
        for row in result["rows"]
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {5, 6, 7, 8}  # right-aligned columns
    for line in lines:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        print("  ".join(cells).rstrip(), file=file)
    print(_summary_line(result), file=file)
    for item in result.get("missing", []):
        print(f"missing: {item}", file=file)
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=file)


def _summary_line(result: dict) -> str:
    rows = result["rows"]
    same = sum(row["verdict"] == SAME for row in rows)
    against = (result.get("against") or {}).get("created") or "an unknown date"
    return (f"{len(rows)} timings compared against the result of {against}: {result['regressions']} regressions, "
            f"{result['improvements']} improvements, {same} same, {len(result.get('missing', []))} missing")
