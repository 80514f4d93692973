# SPDX-License-Identifier: LGPL-3.0-only
"""The finiteness check on averaged tensors sums blocks of rows (cheap, no full-size mask)
and falls back to an exact test where a block's sum is not finite: a NaN or inf anywhere
is found, and large finite values whose sum overflows are not mistaken for one."""

from __future__ import annotations

import pytest
import torch

import mergekit_layerswap.adapter.mixing as mixing
from mergekit_layerswap.adapter.tensor_checks import all_finite


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(mixing, "BLOCK_ELEMENTS", 10)  # 7 x 3 tensor: 3 rows a block, remainder 1 row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [(0, 0), (4, 1), (6, 2)])  # first block, middle, the remainder row
def test_a_non_finite_value_anywhere_is_found(dtype, bad, where):
    tensor = torch.ones(7, 3, dtype=dtype)
    tensor[where] = bad
    assert not all_finite(tensor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_finite_values_whose_sum_overflows_are_finite(dtype):
    big = torch.finfo(dtype).max
    tensor = torch.full((7, 3), big, dtype=dtype)
    assert not bool(torch.isfinite(tensor[:3].sum(dtype=torch.promote_types(dtype, torch.float32))))
    assert all_finite(tensor)


def test_zero_dim_and_empty_tensors():
    assert all_finite(torch.tensor(1.5))
    assert not all_finite(torch.tensor(float("nan")))
    assert all_finite(torch.empty(0, 3))
