"""Statistics over seeds: means, 95 % t-intervals, and paired differences between two runs' results.

Every method starts from the same seeds (the same labelled images, initial
weights and data order), so two methods are compared *paired*: the
difference of their metrics seed by seed, its mean and the 95 % Student-t
interval of that mean (``mean ± t_{0.975, n-1} * sd / sqrt(n)``).  Pairing
removes the seed-to-seed variation both share (which labelled images were
drawn), which is most of it.
"""

from __future__ import annotations

import math
import statistics
from typing import Dict, Mapping, Optional, Sequence

# Two-sided 95 % quantiles of Student's t, t_{0.975, df}, for df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: exact table to df = 30, then the Cornish-Fisher expansion (error < 1e-4)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got df={df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std", "n", "low", "high"}``: sample std and the 95 % t-interval of the mean.

    With one value ``std``, ``low`` and ``high`` are None (no interval).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "std": None, "n": 1, "low": None, "high": None}
    std = statistics.stdev(values)
    half = t_quantile_975(len(values) - 1) * std / math.sqrt(len(values))
    return {"mean": mean, "std": std, "n": len(values), "low": mean - half, "high": mean + half}


def paired_difference(treatment: Mapping[int, float], baseline: Mapping[int, float]) -> Optional[dict]:
    """The paired difference ``treatment - baseline`` over the seeds both have (None if none).

    Returns :func:`interval` of the per-seed differences plus ``"seeds"``
    (those paired) and ``"wins"`` (how many differences are > 0).
    """
    seeds = sorted(set(treatment) & set(baseline))
    if not seeds:
        return None
    diffs = [float(treatment[s]) - float(baseline[s]) for s in seeds]
    return {**interval(diffs), "seeds": seeds, "wins": sum(d > 0 for d in diffs)}


def verdict(difference: Optional[Mapping], direction: int) -> str:
    """``"holds"`` when the 95 % interval lies on the claimed side of 0 (``direction`` +1 or -1),
    ``"reversed"`` when it lies on the other side, ``"not resolved"`` when it contains 0, and
    ``"not run"``/``"one seed"`` when there is no interval."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if difference is None:
        return "not run"
    if difference["low"] is None:
        return "one seed"
    low, high = difference["low"] * direction, difference["high"] * direction
    if direction < 0:
        low, high = high, low
    if low > 0:
        return "holds"
    if high < 0:
        return "reversed"
    return "not resolved"
