# SPDX-License-Identifier: LGPL-3.0-only
"""Propose zone sizes for a layer swap from where the two experts changed.

Inputs: each expert's per-layer profile ``m[l]``, the mean row MAV against the base
over all rows of all tensors of decoder layer ``l`` (``ExpertDelta.layer_profile``).

The rule, for ``L`` layers numbered ``0 .. L-1`` (bottom to top):

1. Relative change: ``r[l] = m[l] / mean(m[0..L-1])`` for each expert, so the two
   experts are compared by the *shape* of their change, whatever their learning rates.
2. Layer ``l`` is *language-led* when ``r_language[l] > r_task[l]`` (strictly).
3. ``b`` = the number of consecutive language-led layers counted up from layer 0;
   ``u`` = the number of consecutive language-led layers counted down from layer
   ``L-1``, never reaching into the bottom zone (so ``b + u <= L``).
4. Transitions: exactly one layer is examined at each boundary: layer ``b`` (just above
   the bottom zone) for ``t_b`` and layer ``L-1-u`` (just below the top zone) for
   ``t_u``. Such a layer becomes a transition layer (``t = 1``) when it belongs to no
   zone yet and the two relative changes are within a factor of 1.5 of each other
   (``max(r) <= 1.5 * min(r)``; two unchanged layers count as close). Otherwise
   ``t = 0``. By construction ``b + t_b + t_u + u <= L``.
5. Clipping (default): each size is clipped to the range the paper searched on its
   32-layer models: ``b`` in 3..5, ``u`` in 0..2, ``t_b`` and ``t_u`` in 0..2. If the
   clipped zones no longer fit the model, ``t_u``, ``t_b``, ``u`` and then ``b`` are
   reduced, in that order, until ``b + t_b + t_u + u <= L``. Every change is reported.
   ``clip=False`` returns the raw rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.files import atomic_write_text
from mergekit_layerswap.core.layers import SwapZones, layer_source
from mergekit_layerswap.core.parameters import BY_NAME, DEFAULTS, ZONE_PARAMETERS

CLOSE_FACTOR = 1.5
PAPER_RANGES: Dict[str, Tuple[int, int]] = {name: BY_NAME[name].paper_range for name in ZONE_PARAMETERS}
SHRINK_ORDER = ("top_transition", "bottom_transition", "top_layers", "bottom_layers")


@dataclass
class Suggestion:
    num_layers: int
    r_language: np.ndarray
    r_task: np.ndarray
    raw: SwapZones
    zones: SwapZones  # after clipping (equal to raw with clip=False)
    notes: List[str] = field(default_factory=list)  # what clipping changed

    def zone_of(self, layer: int, zones: Optional[SwapZones] = None) -> str:
        return layer_source(layer, self.num_layers, zones or self.zones)


def relative_change(profile: Sequence[float]) -> np.ndarray:
    values = np.asarray(profile, dtype=np.float64)
    mean = float(np.mean(values))
    if not np.all(np.isfinite(values)):
        raise ValueError("an expert's per-layer change is not finite")
    if mean <= 0.0:
        raise ValueError("an expert's layers do not differ from the base (mean change 0)")
    return values / mean


def _close(a: float, b: float) -> bool:
    return max(a, b) <= CLOSE_FACTOR * min(a, b)


def raw_zones(r_language: np.ndarray, r_task: np.ndarray) -> SwapZones:
    """Steps 2-4 of the rule on two relative profiles of equal length."""
    count = len(r_language)
    led = [bool(r_language[layer] > r_task[layer]) for layer in range(count)]
    bottom = 0
    while bottom < count and led[bottom]:
        bottom += 1
    top = 0
    while top < count - bottom and led[count - 1 - top]:
        top += 1
    first_free, last_free = bottom, count - 1 - top  # the layers no zone holds yet
    t_bottom = int(first_free <= last_free and _close(r_language[first_free], r_task[first_free]))
    below_top = count - 1 - top
    t_top = int(first_free + t_bottom <= below_top and _close(r_language[below_top], r_task[below_top]))
    return SwapZones(bottom, top, t_bottom, t_top)


def clip_zones(zones: SwapZones, num_layers: int) -> Tuple[SwapZones, List[str]]:
    """Step 5: clip to the paper's ranges, then make the zones fit."""
    sizes = {name: getattr(zones, name) for name in PAPER_RANGES}
    notes = []
    for name, (low, high) in PAPER_RANGES.items():
        clipped = min(max(sizes[name], low), high)
        if clipped != sizes[name]:
            notes.append(f"{name} {sizes[name]} -> {clipped} (the paper searched {low}..{high})")
            sizes[name] = clipped
    for name in SHRINK_ORDER:
        excess = sum(sizes.values()) - num_layers
        if excess <= 0:
            break
        reduced = max(0, sizes[name] - excess)
        if reduced != sizes[name]:
            notes.append(f"{name} {sizes[name]} -> {reduced} (the zones must fit {num_layers} layers)")
            sizes[name] = reduced
    return SwapZones(**sizes), notes


def suggest_zones(language_profile: Sequence[float], task_profile: Sequence[float], clip: bool = True) -> Suggestion:
    """The whole rule (module docstring) on two per-layer profiles."""
    if len(language_profile) != len(task_profile) or not len(task_profile):
        raise ValueError("the two profiles must cover the same, non-zero number of layers")
    r_language, r_task = relative_change(language_profile), relative_change(task_profile)
    raw = raw_zones(r_language, r_task)
    zones, notes = clip_zones(raw, len(r_task)) if clip else (raw, [])
    return Suggestion(len(r_task), r_language, r_task, raw, zones, notes)


def reasoning(suggestion: Suggestion, language_name: str = "language", task_name: str = "task") -> str:
    """The per-layer table behind a suggestion, top layer first, and the result."""
    lines = [f"{'layer':>5}  {'r_lang':>8}  {'r_task':>8}  {'lang/task':>9}  {'rule':<10}  suggested"]
    for layer in reversed(range(suggestion.num_layers)):
        lang, task = suggestion.r_language[layer], suggestion.r_task[layer]
        ratio = f"{lang / task:9.2f}" if task > 0 else f"{'inf' if lang > 0 else '-':>9}"
        lines.append(
            f"{layer:>5}  {lang:8.3f}  {task:8.3f}  {ratio}  "
            f"{suggestion.zone_of(layer, suggestion.raw):<10}  {suggestion.zone_of(layer)}"
        )
    raw, zones = suggestion.raw, suggestion.zones
    lines.append(f"language expert: {language_name}; task expert: {task_name}")
    lines.append(
        "r = mean row MAV of the layer / its mean over all layers; "
        f"language-led when r_lang > r_task; transition when within x{CLOSE_FACTOR:g}"
    )
    lines.append(
        f"rule:      b={raw.bottom_layers} u={raw.top_layers} t_b={raw.bottom_transition} t_u={raw.top_transition}"
    )
    for note in suggestion.notes:
        lines.append(f"clipped:   {note}")
    lines.append(
        f"suggested: b={zones.bottom_layers} u={zones.top_layers} "
        f"t_b={zones.bottom_transition} t_u={zones.top_transition}"
    )
    if zones.total == suggestion.num_layers:
        lines.append("warning: no layer is left for the task expert")
    return "\n".join(lines)


def _model_text(model: Any) -> str:
    text = str(model)
    return os.path.abspath(text) if os.path.isdir(text) else text


def recipe(task: Any, language: Any, base: Any, zones: SwapZones) -> Dict[str, Any]:
    """A ready-to-run layer_swap recipe (a mergekit config) with these zones."""
    return {
        "merge_method": METHOD_NAME,
        "base_model": _model_text(base),
        "models": [
            {"model": _model_text(task), "parameters": {"role": "task"}},
            {"model": _model_text(language), "parameters": {"role": "language"}},
        ],
        "parameters": {
            **{name: getattr(zones, name) for name in ZONE_PARAMETERS},
            "weighting": DEFAULTS["weighting"],
            "non_layer": DEFAULTS["non_layer"],
        },
    }


def recipe_text(suggestion: Suggestion, task: Any, language: Any, base: Any) -> str:
    import yaml

    zones = suggestion.zones
    header = [
        "# Suggested by `mergekit-layerswap suggest` from the experts' per-layer changes.",
        f"# rule: b={suggestion.raw.bottom_layers} u={suggestion.raw.top_layers} "
        f"t_b={suggestion.raw.bottom_transition} t_u={suggestion.raw.top_transition}"
        + ("; clipped to the paper's ranges" if suggestion.notes else ""),
        "# Run: mergekit-yaml <this file> <output directory>",
    ]
    body = yaml.safe_dump(recipe(task, language, base, zones), sort_keys=False)
    return "\n".join(header) + "\n" + body


def write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)
