# SPDX-License-Identifier: LGPL-3.0-only
"""Paired bootstrap confidence intervals: every model is scored on the same problems,
so a difference between two models is resampled problem by problem."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

RESAMPLES = 10_000
SEED = 0


def paired_bootstrap(
    values: Sequence[float],
    reference: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = 0.95,
) -> Dict[str, float]:
    """Mean of ``values[i] - reference[i]`` with a percentile bootstrap interval: the
    problems are drawn with replacement ``resamples`` times (numpy's PCG64 seeded with
    ``seed``), the mean difference taken each time, and the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear interpolation)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired values must be two lists over the same problems")
    if len(a) < 2:
        raise ValueError("a bootstrap needs at least two problems")
    differences = a - b
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {
        "difference": float(differences.mean()),
        "low": float(low),
        "high": float(high),
        "n": int(len(differences)),
        "resamples": resamples,
        "seed": seed,
    }


def reading(interval: Dict[str, float], lower_is_better: bool) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'within noise'."""
    if interval["low"] <= 0 <= interval["high"]:
        return "within noise"
    improved = interval["high"] < 0 if lower_is_better else interval["low"] > 0
    return "better" if improved else "worse"
