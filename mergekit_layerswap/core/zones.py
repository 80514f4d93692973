# SPDX-License-Identifier: LGPL-3.0-only
"""Zone sizes per module: each zone parameter also takes mergekit's filter form.

``bottom_layers: [{filter: self_attn, value: 5}, {value: 3}]`` takes the attention
tensors of the bottom 5 layers and every other tensor of the bottom 3 from the language
expert. The paper's analysis (and module-level swaps such as 00HS/layer-wise_swapping)
finds that the language expert changes attention most in the outer layers, which one
number per zone cannot express.

A filter selects the tensors whose name contains it, exactly as mergekit resolves every
other filtered parameter (``mergekit.config.evaluate_setting``: the first entry that
matches wins; an entry without ``filter`` or with ``filter: "*"`` matches every tensor).
mergekit hands the kernel the value it resolved for each tensor; this module resolves
the same value for the planner, the checks, ``explain``, the model card and the sweep.
The last entry must have no filter, so every tensor has a value.

Pure Python, like ``layers.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from mergekit_layerswap.core.errors import RecipeError

# one number of layers, or ((filter or None, layers), ...) with a last filterless entry
ZoneValue = Union[int, Tuple[Tuple[Optional[str], int], ...]]

EVERYTHING_ELSE = "other"  # explain's name for the tensors no filter selects


def _layers(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RecipeError(f"parameters.{name}{where} must be a non-negative whole number of layers; got {value!r}")
    return value


def check_zone_value(name: str, setting: Any, example: int) -> ZoneValue:
    """A zone parameter as written in a recipe (an int, or mergekit's filter list, parsed
    by mergekit as ``ConditionalParameter`` objects or left as dicts) -> ``ZoneValue``."""
    if not isinstance(setting, (list, tuple)):
        if hasattr(setting, "value"):  # a single ConditionalParameter
            setting = [setting]
        else:
            return _layers(name, setting, "")
    form = f"e.g. `{name}: [{{filter: self_attn, value: {example}}}, {{value: {example}}}]`"
    if not setting:
        raise RecipeError(f"parameters.{name} is an empty list; give a number of layers or a filter list, {form}")
    entries = []
    for index, entry in enumerate(setting):
        if isinstance(entry, dict):
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise RecipeError(
                    f"parameters.{name}[{index}] must be {{filter: NAME, value: LAYERS}} or {{value: LAYERS}}; "
                    f"got {entry!r}"
                )
            filt, value = entry.get("filter"), entry["value"]
        elif hasattr(entry, "value"):
            filt, value = getattr(entry, "filter", None), entry.value
        else:  # a bare number in a list: mergekit's gradient form
            raise RecipeError(
                f"parameters.{name} is a gradient (a list of numbers); a zone is a whole number of layers, "
                f"one value or a filter list, {form}"
            )
        if filt is not None and (not isinstance(filt, str) or not filt):
            raise RecipeError(f"parameters.{name}[{index}].filter must be a piece of a tensor name; got {filt!r}")
        if filt == "*":
            filt = None
        entries.append((filt, _layers(name, value, f"[{index}].value")))
    for index, (filt, _) in enumerate(entries[:-1]):
        if filt is None:
            raise RecipeError(
                f"parameters.{name}[{index}] has no filter, so the entries after it never apply; "
                f"put the entry without `filter:` last"
            )
    if entries[-1][0] is not None:
        raise RecipeError(
            f"parameters.{name} needs a last entry without `filter:` (the layers for every other tensor), {form}"
        )
    if len(entries) == 1:
        return entries[0][1]
    return tuple(entries)


def resolve(value: ZoneValue, tensor_name: Optional[str]) -> int:
    """The number of layers ``value`` gives the tensor ``tensor_name`` (mergekit's rule)."""
    if isinstance(value, int):
        return value
    for filt, layers in value:
        if filt is None or (tensor_name and filt in tensor_name):
            return layers
    raise AssertionError("a checked zone value ends with a filterless entry")


def matched_filter(value: ZoneValue, tensor_name: str) -> Optional[str]:
    """The filter that decides ``value`` for ``tensor_name`` (None: the filterless entry)."""
    if isinstance(value, int):
        return None
    for filt, _ in value:
        if filt is None or filt in tensor_name:
            return filt
    return None


def filters(value: ZoneValue) -> Tuple[str, ...]:
    return () if isinstance(value, int) else tuple(f for f, _ in value if f is not None)


def to_recipe(value: ZoneValue) -> Any:
    """``value`` as a recipe writes it (an int, or a list of filter dicts)."""
    if isinstance(value, int):
        return value
    return [({"filter": f, "value": v} if f is not None else {"value": v}) for f, v in value]


def text(value: ZoneValue) -> str:
    """Short form for tables: ``5`` or ``[self_attn:5, other:3]``."""
    if isinstance(value, int):
        return str(value)
    return "[" + ", ".join(f"{f if f is not None else EVERYTHING_ELSE}:{v}" for f, v in value) + "]"


@dataclass(frozen=True)
class ModuleClass:
    """Tensors of a layer that get the same zone sizes."""

    label: str  # the filters that select them, or EVERYTHING_ELSE
    sizes: Tuple[int, int, int, int]  # bottom_layers, top_layers, bottom_transition, top_transition
    names: Tuple[str, ...]  # the layer-0 tensor names in it


def module_classes(values: Iterable[ZoneValue], tensor_names: Iterable[str]) -> List[ModuleClass]:
    """Group one layer's tensor names by the zone sizes they resolve to, in first-seen order."""
    values = tuple(values)
    groups: Dict[Tuple[int, ...], List[str]] = {}
    labels: Dict[Tuple[int, ...], List[str]] = {}
    for name in tensor_names:
        sizes = tuple(resolve(v, name) for v in values)
        groups.setdefault(sizes, []).append(name)
        seen = labels.setdefault(sizes, [])
        for v in values:
            filt = matched_filter(v, name)
            label = filt if filt is not None else None
            if label is not None and label not in seen:
                seen.append(label)
    classes = [
        ModuleClass(label=" + ".join(labels[s]) or EVERYTHING_ELSE, sizes=s, names=tuple(names))
        for s, names in groups.items()
    ]
    return sorted(classes, key=lambda c: c.label == EVERYTHING_ELSE)  # the rest last


def with_layers(value: ZoneValue, filt: Optional[str], layers: int) -> ZoneValue:
    """``value`` with the layers of one filter set (``filt=None``: the tensors no filter
    selects); a new filter goes first, so it wins over the ones already there."""
    if filt is None:
        if isinstance(value, int):
            return layers
        return value[:-1] + ((None, layers),)
    entries = ((None, value),) if isinstance(value, int) else value
    if any(f == filt for f, _ in entries):
        return tuple((f, layers if f == filt else v) for f, v in entries)
    return ((filt, layers),) + tuple(entries)
