# SPDX-License-Identifier: LGPL-3.0-only
"""``blend_method``: another registered mergekit method combines the two role soups in
transition layers and averaged non-layer tensors (instead of the paper's weighted average).

Methods whose every output value depends only on the input values at the same position
(``ELEMENTWISE_METHODS``) run block by block of rows, so their float32 working memory stays
small; every other method (ties, dare, della, breadcrumbs, model_stock, sce, nuslerp, ...)
needs whole-tensor statistics or random masks and gets the whole tensors.

Its parameters come from flat ``blend_<name>`` recipe keys (mergekit 0.1.5's recipe schema
rejects nested dictionaries); they are checked against the method's own parameter spec.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional, Tuple

import torch

from mergekit_layerswap.adapter.mixing import Members, active_roles, mix_roles, row_blocks, weighted_sum
from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.parameters import BLEND_PREFIX
from mergekit_layerswap.core.recipe import is_scalar

# mergekit methods that are elementwise over tensor positions (no norms, top-k, random masks)
ELEMENTWISE_METHODS = frozenset({"linear", "task_arithmetic"})


def _blend_method(name: str):
    import mergekit.merge_methods.registry  # noqa: F401

    registry = sys.modules["mergekit.merge_methods.registry"]
    known = sorted(m.spec.name for m in registry.registered_methods())
    if name not in known or name == METHOD_NAME:
        raise RecipeError(
            f"parameters.blend_method {name!r} is not a registered mergekit method usable for blends; "
            f"use average (the paper's weighted average) or one of: {', '.join(n for n in known if n != METHOD_NAME)}"
        )
    return registry.get(name)


def check_blend(name: str, settings: Dict[str, Any], base) -> Tuple[Tuple[Tuple[str, Any], ...], bool]:
    """Check a ``blend_method`` other than average and its ``blend_<parameter>`` settings
    against mergekit's registry; return the options and whether the method reads the base."""
    from mergekit.merge_methods.base import BasePolicy

    method = _blend_method(name)
    contract = method.spec.contract
    if contract.base == BasePolicy.REQUIRED and base is None:
        raise RecipeError(
            f"blend_method {name} needs base_model (it merges differences from a base); add base_model "
            f"or choose a method without a base such as linear"
        )
    ids = ["task", "language"] + (["base"] if base is not None and contract.base != BasePolicy.IGNORED else [])
    try:
        contract.validate_ids(ids, "base" if "base" in ids else None)
    except ValueError as error:
        raise RecipeError(
            f"blend_method {name} cannot blend the two experts ({error}); choose another method"
        ) from None
    accepted = {p.name: p for p in method.spec.parameters if p.name != "weight"}
    options = []
    for key, value in settings.items():
        inner = key[len(BLEND_PREFIX) :]
        if inner not in accepted:
            raise RecipeError(
                f"parameters.{key}: {name} has no parameter {inner!r} (its parameters: "
                f"{', '.join(sorted(accepted)) or 'none'})"
            )
        if not is_scalar(value):
            raise RecipeError(f"parameters.{key} must be one value; got {value!r}")
        try:
            options.append((inner, accepted[inner].validate(value)))
        except Exception:
            raise RecipeError(f"parameters.{key}: {value!r} is not a valid {inner} for {name}") from None
    return tuple(sorted(options)), contract.base in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)


def blend_roles(
    members: Members,
    shares: Dict[str, float],
    method_name: str,
    options: Dict[str, Any],
    base: Optional[torch.Tensor],
    metadata,
) -> torch.Tensor:
    """Like ``mix_roles``, but two role soups are combined by another registered mergekit
    method (``blend_method``), which sees each soup with weight ``s_r * W_r``."""
    from mergekit.merge_methods.base import BasePolicy

    active = active_roles(members, shares, metadata.name)
    if len(active) == 1:
        return mix_roles(members, shares, metadata.name)
    out_dtype = members[active[0]][0][0].dtype
    method = sys.modules["mergekit.merge_methods.registry"].get(method_name)
    if base is not None and method.spec.contract.base == BasePolicy.IGNORED:
        base = None
    shape = members[active[0]][0][0].shape
    if method_name not in ELEMENTWISE_METHODS:
        return _blend_block(members, shares, active, method, options, base, metadata, ...).to(out_dtype)
    out = torch.empty(shape, dtype=out_dtype, device=members[active[0]][0][0].device)
    for rows in row_blocks(shape):
        out[rows] = _blend_block(members, shares, active, method, options, base, metadata, rows)
    return out


def _blend_block(
    members: Members,
    shares: Dict[str, float],
    active,
    method,
    options: Dict[str, Any],
    base: Optional[torch.Tensor],
    metadata,
    rows,
) -> torch.Tensor:
    """The method's result for rows ``rows`` of the tensor, in float32 or wider."""
    from mergekit.merge_methods.base import TensorEntry, TensorGroup

    acc_dtype = torch.promote_types(members[active[0]][0][0].dtype, torch.float32)
    entries, weights = [], {}
    for r in active:
        soup_weight = sum(w for _, w in members[r])
        soup = weighted_sum([(t[rows], w / soup_weight) for t, w in members[r]], acc_dtype)
        entries.append(TensorEntry(id=r, tensor=soup))
        weights[r] = shares[r] * soup_weight / len(members[r])
    if base is not None:
        entries.append(TensorEntry(id="base", tensor=base[rows].to(acc_dtype), is_base=True))
    parameters = dict(options)
    if any(p.name == "weight" for p in method.spec.parameters):
        parameters["weight"] = weights
    (result,) = method((TensorGroup(entries=tuple(entries), metadata=metadata),), parameters=parameters)
    return result
