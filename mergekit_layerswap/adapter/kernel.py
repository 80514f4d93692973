"""The ``layer_swap`` merge method: one kernel, the recipe's parameters as its arguments.

The planner adapter (``planning.py``) adds two values mergekit's kernel interface
cannot know by itself: the tensor's decoder-layer position (``layer_index`` of
``num_layers``, ``None`` for non-layer tensors, taken from mergekit's architecture
definitions) and, under ``weighting: magnitude``, each expert's mean row change
against ``base_model`` (``magnitude``). A recipe cannot set either.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

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
    members: Dict[str, List[Tuple[torch.Tensor, float]]] = {r: [] for r in ROLES}
    for entry in group.non_base:
        w = weight[entry.id]
        if weighting == "magnitude":
            w = w / magnitude[entry.id]
        members[role[entry.id]].append((entry.tensor, w))
    if blend_method == "average":
        return mix_roles(members, shares, name=group.metadata.name)
    from mergekit_layerswap.adapter.blend import blend_roles

    base = group.base.tensor if group.base is not None else None
    return blend_roles(members, shares, blend_method, dict(blend_options or ()), base, group.metadata)


Members = Dict[str, List[Tuple[torch.Tensor, float]]]


def active_roles(members: Members, shares: Dict[str, float], name: Optional[str]) -> List[str]:
    active = [r for r in ROLES if shares[r] > 0]
    for r in active:
        if not members[r]:
            raise ValueError(f"{name}: no {r} expert tensor was loaded")
    return active


# float32 values per block of rows: a blend's working memory (one accumulator block plus
# one converted input block) stays about 32 MB whatever the tensor's size
BLOCK_ELEMENTS = 1 << 22


def row_blocks(shape, block_elements: Optional[int] = None):
    """Slices of whole rows (along dim 0) of about ``block_elements`` values each; a
    0-d tensor is one block. Every blend here is elementwise, so blocks give the same
    bits as the whole tensor."""
    if len(shape) == 0:
        yield ...
        return
    per_row = 1
    for size in shape[1:]:
        per_row *= size
    step = max(1, (block_elements or BLOCK_ELEMENTS) // max(per_row, 1))
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))


def weighted_sum(terms: List[Tuple[torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """sum(coefficient * tensor) in ``dtype``, with one working buffer and no temporaries
    beyond each input's conversion (whole tensor: for methods that need it whole)."""
    (first, c0), rest = terms[0], terms[1:]
    total = first.to(dtype=dtype, copy=True).mul_(c0)
    for tensor, coefficient in rest:
        total.add_(tensor.to(dtype), alpha=coefficient)
    return total


def weighted_average(terms: List[Tuple[torch.Tensor, float]], denominator: float, acc_dtype: torch.dtype,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """``weighted_sum(terms, acc_dtype) / denominator`` rounded to ``out_dtype``, computed
    in blocks of rows with the same operations in the same order (so the same bits), so
    the accumulator never holds more than one block."""
    shape = terms[0][0].shape
    out = torch.empty(shape, dtype=out_dtype, device=terms[0][0].device)
    for rows in row_blocks(shape):
        block = weighted_sum([(tensor[rows], c) for tensor, c in terms], acc_dtype).div_(denominator)
        out[rows] = block
    return out


def mix_roles(members: Members, shares: Dict[str, float], name: Optional[str] = None) -> torch.Tensor:
    """Average each role's experts, then blend the roles (the paper's weighted average).

    A role's soup is the weighted mean of its experts and carries the mean of their
    weights; the output is ``sum(s_r * W_r * soup_r) / sum(s_r * W_r)`` over roles
    with share ``s_r > 0``. A single expert taken whole is returned untouched
    (bit-identical); every average is computed in float32 or wider, block by block.
    """
    active = active_roles(members, shares, name)
    if len(active) == 1 and len(members[active[0]]) == 1:
        return members[active[0]][0][0]
    out_dtype = members[active[0]][0][0].dtype
    acc_dtype = torch.promote_types(out_dtype, torch.float32)
    terms = []
    denominator = 0.0
    for r in active:
        soup_weight = sum(w for _, w in members[r])
        coefficient = shares[r] * soup_weight / len(members[r])
        terms += [(tensor, coefficient * w / soup_weight) for tensor, w in members[r]]
        denominator += coefficient
    return weighted_average(terms, denominator, acc_dtype, out_dtype)
