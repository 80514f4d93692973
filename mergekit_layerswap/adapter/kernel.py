# SPDX-License-Identifier: LGPL-3.0-only
"""The ``layer_swap`` merge method: one kernel, the recipe's parameters as its arguments.

The planner adapter (``planner.py``) adds two values mergekit's kernel interface
cannot know by itself: the tensor's decoder-layer position (``layer_index`` of
``num_layers``, or ``NON_LAYER`` for a tensor outside the layers, taken from mergekit's
architecture definitions) and, under ``weighting: magnitude``, each expert's mean row
change against ``base_model`` (``magnitude``). A recipe cannot set either.

A tensor whose position nobody gave (``layer_index`` left out: mergekit's in-memory API,
``mergekit-pytorch``) is refused, never treated as a non-layer tensor; ``inmemory.py`` fills
the positions in for ``merge_state_dicts`` from mergekit's architecture definitions.
Every average is checked for non-finite values and integer tensors are never averaged
(``tensor_checks.py``).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    OptionalTensorPolicy,
    PerInput,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method
from pydantic import NonNegativeInt, PositiveFloat
from typing_extensions import Literal

from mergekit_layerswap.adapter import tensor_checks
from mergekit_layerswap.adapter.blend import blend_roles
from mergekit_layerswap.adapter.mixing import Members, mix_roles
from mergekit_layerswap.core import METHOD_NAME, PAPER_URL
from mergekit_layerswap.core.layers import ROLES, SwapRule, SwapZones

Role = Literal["task", "language"]
NON_LAYER = tensor_checks.NON_LAYER  # layer_index of a tensor outside the decoder layers
VISION = tensor_checks.VISION  # layer_index of a vision tower / projector tensor (vision-language models)


@merge_method(
    name=METHOD_NAME,
    pretty_name="Layer Swapping",
    reference_url=PAPER_URL,
    contract=InputContract(base=BasePolicy.IGNORED, min_inputs=1),
    optional_tensor_policy=OptionalTensorPolicy.ERROR,
    uses_accelerator=True,
)
def layer_swap(
    group: TensorGroup,
    role: PerInput[Optional[Role]] = None,
    weight: PerInput[PositiveFloat] = 1.0,
    bottom_layers: NonNegativeInt = 5,
    top_layers: NonNegativeInt = 2,
    bottom_transition: NonNegativeInt = 0,
    top_transition: NonNegativeInt = 0,
    weighting: Literal["uniform", "magnitude"] = "uniform",
    non_layer: Literal["average", "language", "task"] = "average",
    vision: Literal["language", "task", "average"] = "language",
    transition_shape: Literal["flat", "linear"] = "flat",
    blend_method: str = "average",
    blend_options: Optional[Tuple[Tuple[str, Any], ...]] = None,
    layer_index: Union[NonNegativeInt, Literal["non_layer", "vision"], None] = None,
    num_layers: Optional[NonNegativeInt] = None,
    magnitude: PerInput[PositiveFloat] = 1.0,
) -> torch.Tensor:
    name = group.metadata.name
    layer = tensor_checks.layer_position(layer_index, num_layers, name)
    rule = SwapRule(
        SwapZones(bottom_layers, top_layers, bottom_transition, top_transition), non_layer, transition_shape, vision
    )
    sources = rule.sources(layer, num_layers)
    shares = sources.shares
    members: Members = {r: [] for r in ROLES}
    used = []  # the entries whose tensors this output is made of
    for entry in group.non_base:
        entry_role = tensor_checks.role_of(role, entry.id, name)
        w = weight[entry.id]
        if weighting == "magnitude":
            w = w / magnitude[entry.id]
        members[entry_role].append((entry.tensor, w))
        if sources.reads(entry_role):
            used.append(entry)
    if any(not entry.tensor.is_floating_point() for entry in group.entries):
        return tensor_checks.copied_integer_tensor(used, name)
    if blend_method == "average":
        result = mix_roles(members, shares, name=name)
    else:
        base = group.base.tensor if group.base is not None else None
        result = blend_roles(members, shares, blend_method, dict(blend_options or ()), base, group.metadata)
        if group.base is not None and sources.blends:
            used.append(group.base)
    if len(used) > 1:
        tensor_checks.check_finite(result, used, name)
    return result


def _with_positions(method):
    """The method object mergekit registers: positions filled in for its in-memory API."""
    from mergekit_layerswap.adapter.inmemory import LayerSwapMethod

    return LayerSwapMethod(method.spec, method.implementation)


layer_swap = _with_positions(layer_swap)
