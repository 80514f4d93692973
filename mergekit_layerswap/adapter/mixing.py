# SPDX-License-Identifier: LGPL-3.0-only
"""The paper's weighted average of role soups, in float32 or wider (torch only).

Shared by the kernel (``blend_method: average``) and ``blend.py`` (role soups before
another mergekit method combines them).
"""

from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Tuple

import torch

from mergekit_layerswap.core.layers import ROLES

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


_SCRATCH = threading.local()
# scratch kept between calls up to this many values each (two per thread and device)
_SCRATCH_KEPT = 4 * BLOCK_ELEMENTS


def _scratch(slot: int, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A working buffer of ``shape``, reused from the previous blend when it fits: a fresh
    buffer per tensor costs page faults that dominate a blend of small tensors (a
    mixture-of-experts layer's 768 x 2048 expert matrices blended 6x faster with reused
    buffers, measured here). Its contents are garbage; every use overwrites it first."""
    needed = math.prod(shape)
    if needed > _SCRATCH_KEPT:
        return torch.empty(shape, dtype=dtype, device=device)
    kept = getattr(_SCRATCH, "buffers", None)
    if kept is None:
        kept = _SCRATCH.buffers = {}
    key = (slot, dtype, str(device))
    buffer = kept.get(key)
    if buffer is None or buffer.numel() < needed:
        buffer = kept[key] = torch.empty(max(needed, BLOCK_ELEMENTS), dtype=dtype, device=device)
    return buffer[:needed].view(shape)


def weighted_sum(terms: List[Tuple[torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """sum(coefficient * tensor) in ``dtype``, with one working buffer and no temporaries
    beyond each input's conversion (whole tensor: for methods that need it whole)."""
    (first, c0), rest = terms[0], terms[1:]
    total = first.to(dtype=dtype, copy=True).mul_(c0)
    for tensor, coefficient in rest:
        total.add_(tensor.to(dtype), alpha=coefficient)
    return total


def weighted_average(
    terms: List[Tuple[torch.Tensor, float]], denominator: float, acc_dtype: torch.dtype, out_dtype: torch.dtype
) -> torch.Tensor:
    """``weighted_sum(terms, acc_dtype) / denominator`` rounded to ``out_dtype``, computed
    in blocks of rows with the same operations in the same order (so the same bits).

    The accumulator and the converted input block are two buffers allocated once and
    reused for every block: a fresh 16 MB allocation per block and input costs page
    faults that took about half of the blend's time (measured in docs/performance.md).
    """
    shape = terms[0][0].shape
    device = terms[0][0].device
    out = torch.empty(shape, dtype=out_dtype, device=device)
    if len(shape) == 0:
        out.copy_(weighted_sum(terms, acc_dtype).div_(denominator))
        return out
    blocks = list(row_blocks(shape))
    most_rows = max(rows.stop - rows.start for rows in blocks)
    accumulator = _scratch(0, (most_rows, *shape[1:]), acc_dtype, device)
    converted = _scratch(1, (most_rows, *shape[1:]), acc_dtype, device) if len(terms) > 1 else None
    (first, first_coefficient), rest = terms[0], terms[1:]
    for rows in blocks:
        count = rows.stop - rows.start
        block = accumulator[:count]
        block.copy_(first[rows]).mul_(first_coefficient)
        for tensor, coefficient in rest:
            converted_block = converted[:count]
            converted_block.copy_(tensor[rows])
            block.add_(converted_block, alpha=coefficient)
        out[rows] = block.div_(denominator)
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
