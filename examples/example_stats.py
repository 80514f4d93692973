# SPDX-License-Identifier: LGPL-3.0-only
"""Confidence intervals for the example: accuracy (Wilson) and per-problem means (normal).

All variants are scored on the same problems, so a difference between two variants is
best judged problem by problem (paired), not from their two separate intervals.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson(correct: int, n: int, z: float = Z95) -> Dict[str, float]:
    """Accuracy with its Wilson score interval (sensible even at 0 or n correct)."""
    if n <= 0:
        raise ValueError("wilson needs at least one problem")
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact bounds at the edges
    high = 1.0 if correct == n else min(1.0, centre + half)
    return {"value": p, "low": low, "high": high, "n": n}


def mean_ci(values: Sequence[float], z: float = Z95) -> Dict[str, float]:
    """Mean with a normal-approximation interval, mean +- z * sd / sqrt(n) (sd with n - 1)."""
    n = len(values)
    if n < 2:
        raise ValueError("mean_ci needs at least two values")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return {"value": mean, "low": mean - half, "high": mean + half, "n": n}


def paired_difference(values: Sequence[float], reference: Sequence[float], z: float = Z95) -> Dict[str, float]:
    """Mean of values[i] - reference[i] with its interval; both lists are over the same problems."""
    if len(values) != len(reference):
        raise ValueError("paired values must cover the same problems")
    return mean_ci([a - b for a, b in zip(values, reference)], z)


def verdict(interval: Dict[str, float], lower_is_better: bool = True) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'within noise'."""
    if interval["low"] <= 0 <= interval["high"]:
        return "within noise"
    improved = interval["high"] < 0 if lower_is_better else interval["low"] > 0
    return "better" if improved else "worse"
