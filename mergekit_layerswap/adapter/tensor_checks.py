# SPDX-License-Identifier: LGPL-3.0-only
"""Validation stage 4, the tensors: what the ``layer_swap`` kernel refuses rather than
computing a silently wrong tensor.

* A tensor whose decoder-layer position nobody gave is not a non-layer tensor: the
  planner marks non-layer tensors explicitly (``NON_LAYER``), so a missing position
  means the kernel was called without the planner (mergekit's in-memory API,
  ``mergekit-pytorch``) and the swap cannot be computed.
* Every input needs a role; mergekit's API binds ``None`` for a missing one.
* An average that is not finite names the model and tensor that made it so. The check
  sums the finished output block by block (a NaN or inf anywhere makes a block's sum
  non-finite); only a block whose sum is not finite gets the exact ``isfinite`` test (a
  sum of finite values can overflow), and the inputs are searched only when that fails.
  A tensor taken whole from one expert is not checked (it is copied as is).
* Integer (and boolean) tensors are never averaged: taken whole from one expert they
  are copied; where the rule blends they must be equal in every expert used.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from mergekit_layerswap.adapter.mixing import row_blocks
from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.errors import RecipeError

NON_LAYER = "non_layer"
VISION = "vision"  # core.layers.VISION: outside a vision-language model's text decoder
HOW_TO_MERGE = (
    "merge with a recipe through mergekit-yaml (or mergekit.merge.run_merge), or pass "
    "layer_index and num_layers explicitly"
)


def layer_position(layer_index, num_layers, name: Optional[str]) -> Optional[int]:
    """The decoder layer of this tensor, None for a tensor marked non-layer."""
    if layer_index is None:
        raise RecipeError(
            f"{METHOD_NAME} does not know whether tensor {name} lies in a decoder layer (no layer "
            f"position was given, and the swap depends on it); {HOW_TO_MERGE}"
        )
    if layer_index == NON_LAYER:
        return None
    if layer_index == VISION:
        return VISION
    if num_layers is None or not 0 <= layer_index < num_layers:
        raise RecipeError(
            f"{METHOD_NAME}: tensor {name} has layer_index {layer_index} but num_layers is "
            f"{num_layers}; give num_layers, the model's number of decoder layers"
        )
    return layer_index


def role_of(roles, input_id: Any, name: Optional[str]) -> str:
    role = roles[input_id]
    if role is None:
        raise RecipeError(
            f"{METHOD_NAME}: input {input_id} has no role (tensor {name}); give every model a role, "
            f"task or language (in a recipe: parameters: {{role: task}}; in mergekit's Python API: "
            f"parameters={{'role': {{<id>: 'task', ...}}}})"
        )
    return role


def _label(entry) -> str:
    return f"base model {entry.id}" if entry.is_base else f"model {entry.id}"


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in blocks of rows: a block's sum in float32 or wider
    is one cheap pass with no full-size boolean mask (``isfinite`` on a bf16 tensor was
    a fifth of a merge's time, and its mask ~1 GB for a 70B-width embedding)."""
    sum_dtype = torch.promote_types(tensor.dtype, torch.float32)
    for rows in row_blocks(tensor.shape):
        block = tensor[rows]
        if not bool(torch.isfinite(block.sum(dtype=sum_dtype))) and not bool(torch.isfinite(block).all()):
            return False
    return True


def check_finite(result: torch.Tensor, used: Sequence[Any], name: Optional[str]) -> None:
    """Refuse an average with NaN or inf, naming the input (TensorEntry) that holds one."""
    if all_finite(result):
        return
    for entry in used:
        if entry.tensor.is_floating_point() and not bool(torch.isfinite(entry.tensor).all()):
            bad = entry.tensor[~torch.isfinite(entry.tensor)].flatten()[0].item()
            raise RecipeError(
                f"{_label(entry)} has a non-finite value ({bad}) in tensor {name}, which {METHOD_NAME} "
                f"averages here; repair or re-export that checkpoint (a tensor copied whole from one "
                f"expert would pass through unchanged)"
            )
    raise RecipeError(
        f"the {METHOD_NAME} average of tensor {name} is not finite although every input is; "
        f"the weights are too large or too small for the dtype: use weights near 1"
    )


def copied_integer_tensor(used: Sequence[Any], name: Optional[str]) -> torch.Tensor:
    """An integer tensor is copied from the expert the rule picks; where the rule blends,
    every expert it blends must store the same values."""
    if not used:
        raise RecipeError(f"{METHOD_NAME}: no expert supplies integer tensor {name}")
    first = used[0]
    for entry in used[1:]:
        tensor = entry.tensor
        if (
            tensor.dtype != first.tensor.dtype
            or tensor.shape != first.tensor.shape
            or not torch.equal(tensor, first.tensor)
        ):
            raise RecipeError(
                f"integer tensor {name} differs between {_label(first)} and {_label(entry)}, and "
                f"{METHOD_NAME} never averages integers; it can only blend it where both store the "
                f"same values: make them equal, or choose zones that take this tensor from one expert"
            )
    return first.tensor


# ------------------------------------------------------------ planner merges (mergekit-yaml)
def is_integer_dtype(stored_dtype: str) -> bool:
    """True for an integer or boolean dtype as a safetensors header ("I32", "BOOL") or
    torch ("torch.int64") names it."""
    name = stored_dtype.upper().replace("TORCH.", "")
    return name.startswith(("I", "U", "BOOL"))


def integer_tensors(models, stored: dict) -> dict:
    """Stored tensor name -> dtype, for every integer tensor any of ``models`` stores;
    ``stored`` maps each model to its stored tensors (``checks.check_tensors`` returns it)."""
    found = {}
    for model in models:
        for name, (_shape, dtype) in stored[model].items():
            if is_integer_dtype(dtype):
                found.setdefault(name, dtype)
    return found


def check_blended_integers(recipe, info, integers: dict) -> None:
    """Before anything is written: an integer tensor the rule blends (transition layers,
    averaged non-layer tensors, several experts of one role) must be equal in every
    expert it blends."""
    if not integers:
        return
    from mergekit.io.tasks import LoaderCache

    positions = info.layer_of(recipe.experts[0].model)
    for name in sorted(integers):
        if name not in positions:
            continue  # not part of the architecture: mergekit does not write it
        sources = recipe.rule.sources(positions[name], info.num_layers)
        used = [expert.model for expert in recipe.experts if sources.reads(expert.role)]
        if len(used) < 2:
            continue
        first = LoaderCache().get(used[0]).get_tensor(name)
        for model in used[1:]:
            other = LoaderCache().get(model).get_tensor(name)
            if other.dtype != first.dtype or other.shape != first.shape or not torch.equal(other, first):
                raise RecipeError(
                    f"integer tensor {name} differs between model {used[0]} and model {model}, and "
                    f"{METHOD_NAME} never averages integers; it can only blend it where both store the "
                    f"same values: make them equal, or choose zones that take this tensor from one expert"
                )
