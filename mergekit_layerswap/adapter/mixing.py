"""The paper's weighted average of role soups, in float32 or wider (torch only).

Shared by the kernel (``blend_method: average``) and ``blend.py`` (role soups before
another mergekit method combines them).
"""

from __future__ import annotations

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


def weighted_sum(terms: List[Tuple[torch.Tensor, float]], dtype: torch.dtype) -> torch.Tensor:
    """sum(coefficient * tensor) in ``dtype``, with one working buffer and no temporaries
    beyond each input's conversion."""
    (first, c0), rest = terms[0], terms[1:]
    total = first.to(dtype=dtype, copy=True).mul_(c0)
    for tensor, coefficient in rest:
        total.add_(tensor.to(dtype), alpha=coefficient)
    return total


def mix_roles(members: Members, shares: Dict[str, float], name: Optional[str] = None) -> torch.Tensor:
    """Average each role's experts, then blend the roles (the paper's weighted average).

    A role's soup is the weighted mean of its experts and carries the mean of their
    weights; the output is ``sum(s_r * W_r * soup_r) / sum(s_r * W_r)`` over roles
    with share ``s_r > 0``. A single expert taken whole is returned untouched
    (bit-identical); every average is computed in float32 or wider.
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
    return weighted_sum(terms, acc_dtype).div_(denominator).to(out_dtype)
