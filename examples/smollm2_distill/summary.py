"""Summaries over seeds, shared by the two studies: mean, range, and paired differences."""

from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence

# Two-sided 95% Student-t quantiles for n - 1 degrees of freedom (n seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def summarize(values: Sequence[float]) -> dict:
    """``mean``, ``min``, ``max``, ``n``, the per-seed ``values`` and (n >= 2) a 95% t-interval of the mean."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0}
    out = {"n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
           "values": values}
    if len(values) >= 2:
        half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def paired_differences(per_seed: Dict[str, Dict[int, dict]], baseline: str, metric: str) -> Dict[str, dict]:
    """For each condition, :func:`summarize` of ``metric(condition) - metric(baseline)`` over the seeds both have."""
    out = {}
    base = per_seed.get(baseline, {})
    for name, seeds in per_seed.items():
        if name == baseline:
            continue
        common = sorted(set(seeds) & set(base))
        if common:
            out[name] = summarize([seeds[s][metric] - base[s][metric] for s in common])
    return out


def format_summary(summary: dict, digits: int = 1, signed: bool = False) -> str:
    """``mean [min, max]`` (n >= 2), or the single value."""
    if not summary or summary.get("n", 0) == 0:
        return "—"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if summary["n"] == 1:
        return fmt.format(summary["mean"])
    return f"{fmt.format(summary['mean'])} [{fmt.format(summary['min'])}, {fmt.format(summary['max'])}]"


def metric_values(records: Dict[int, dict], metric: str) -> List[float]:
    return [records[seed][metric] for seed in sorted(records)]


def maybe_float(value) -> Optional[float]:
    return None if value is None else float(value)
