"""The ``layer_swap`` merge method: one kernel, the recipe's parameters as its arguments.

The planner adapter (``planning.py``) adds two values mergekit's kernel interface
cannot know by itself: the tensor's decoder-layer position (``layer_index`` of
``num_layers``, ``None`` for non-layer tensors, taken from mergekit's architecture
definitions) and, under ``weighting: magnitude``, each expert's mean row change
against ``base_model`` (``magnitude``). A recipe cannot set either.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from pydantic import NonNegativeInt, PositiveFloat
from typing_extensions import Literal

from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    OptionalTensorPolicy,
    PerInput,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method

from mergekit_layerswap.adapter.blend import blend_roles
from mergekit_layerswap.adapter.mixing import Members, mix_roles
from mergekit_layerswap.core import METHOD_NAME, PAPER_URL
from mergekit_layerswap.core.layers import ROLES, SwapZones, role_shares


Role = Literal["task", "language"]


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
    transition_shape: Literal["flat", "linear"] = "flat",
    blend_method: str = "average",
    blend_options: Optional[Tuple[Tuple[str, Any], ...]] = None,
    layer_index: Optional[NonNegativeInt] = None,
    num_layers: Optional[NonNegativeInt] = None,
    magnitude: PerInput[PositiveFloat] = 1.0,
) -> torch.Tensor:
    zones = SwapZones(bottom_layers, top_layers, bottom_transition, top_transition)
    shares = role_shares(layer_index, num_layers, zones, non_layer, transition_shape)
    members: Members = {r: [] for r in ROLES}
    for entry in group.non_base:
        w = weight[entry.id]
        if weighting == "magnitude":
            w = w / magnitude[entry.id]
        members[role[entry.id]].append((entry.tensor, w))
    if blend_method == "average":
        return mix_roles(members, shares, name=group.metadata.name)
    base = group.base.tensor if group.base is not None else None
    return blend_roles(members, shares, blend_method, dict(blend_options or ()), base, group.metadata)
