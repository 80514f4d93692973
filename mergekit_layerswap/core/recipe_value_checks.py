# SPDX-License-Identifier: LGPL-3.0-only
"""Validation stage 2, the recipe values: expert weights a merge can actually use.

Weights are relative (each output tensor is ``sum(w_i * t_i) / sum(w_i)``), but the kernel
multiplies float32 tensors by them before dividing: ``weight: .inf`` or ``1e308`` overflows,
``1e-320`` rounds to 0, and both end as 0/0 = NaN in every averaged tensor. So every weight
(and, under ``weighting: magnitude``, every effective weight ``weight / m``) must be a
finite number inside float32's range with room to spare, and every expert's normalised
weight ``w_i / sum(w)`` must stay positive in float32 (else that expert silently vanishes).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

from mergekit_layerswap.core.errors import RecipeError

# float32 holds 1.2e-38 .. 3.4e38; the margin leaves room for role shares and counts
SMALLEST_WEIGHT = 1e-30
LARGEST_WEIGHT = 1e30


def _number(value: Any) -> Optional[float]:
    """A weight value as a float; YAML 1.1 reads ``1e-3`` (no dot) as text, which
    mergekit's own parameter validation turns into a number, so this does too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def weight_values(setting: Any) -> Optional[List[float]]:
    """Every value a weight setting can take (a scalar, a gradient list, filters), or
    None when one of them is not a number."""
    if isinstance(setting, list):
        values: List[float] = []
        for item in setting:
            inner = weight_values(getattr(item, "value", item))
            if inner is None:
                return None
            values.extend(inner)
        return values or None
    if hasattr(setting, "value") and not isinstance(setting, (str, bytes)):
        return weight_values(setting.value)
    number = _number(setting)
    return None if number is None else [number]


def check_weight(setting: Any, where: str) -> List[float]:
    """The values of one weight setting; refused unless each is a finite positive number
    (the range float32 arithmetic can use is checked with all weights: check_normalised)."""
    values = weight_values(setting)
    if values is None or any(not v > 0 for v in values):
        raise RecipeError(
            f"weight of {where} must be a positive number (or a gradient/filter list of "
            f"positive numbers); got {setting!r}"
        )
    for value in values:
        if not math.isfinite(value):
            raise RecipeError(f"weight of {where} is {value!r}; a weight must be a finite positive number, e.g. 1.0")
    return values


def check_normalised(weights: Sequence[Tuple[str, Sequence[float]]], what: str = "weight") -> None:
    """Each entry is (where, possible values of one expert's weight). The smallest share
    any expert can get, ``min(w_i) / (min(w_i) + sum of the others' max)``, must stay
    positive in float32; the sum of all weights must stay finite."""
    if not weights:
        return
    for where, values in weights:
        for value in values:
            if not (math.isfinite(value) and SMALLEST_WEIGHT <= value <= LARGEST_WEIGHT):
                raise RecipeError(
                    f"{what} of {where} is {value!r}, outside {SMALLEST_WEIGHT:g} .. {LARGEST_WEIGHT:g}; "
                    f"weights are relative and the merge multiplies float32 tensors by them, so rescale "
                    f"every weight (e.g. to around 1.0)"
                )
    largest = [max(values) for _, values in weights]
    total = sum(largest)
    for index, (where, values) in enumerate(weights):
        low = min(values)
        share = low / (low + total - largest[index])
        if not share >= SMALLEST_WEIGHT:
            raise RecipeError(
                f"{what} of {where} ({low!r}) is negligible next to the others (its normalised weight "
                f"{share:.3g} rounds to nothing in float32, so the expert would silently vanish); "
                f"bring the weights closer together"
            )
