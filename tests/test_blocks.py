# SPDX-License-Identifier: LGPL-3.0-only
"""Elementwise blends run block by block of rows (bounded float32 memory) and give the
same bits as the whole-tensor computation they replace."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from checkpoints import SPECIAL, make_model
from helpers import merge, swap_recipe

import mergekit_layerswap.adapter.mixing as mixing

SMALL_BLOCK = 100  # values: 2 rows of the 97 x 36 embedding (48 blocks and a remainder of 1 row)
WHOLE = 1 << 62


ODD = SPECIAL["llama-odd"]


@pytest.fixture(scope="module")
def odd_family(tmp_path_factory):
    """bf16 experts with odd widths, so float32 -> bf16 rounding is exercised."""
    root = tmp_path_factory.mktemp("odd")
    base = make_model(ODD, str(root / "base"), seed=1, dtype=torch.bfloat16)
    task = make_model(ODD, str(root / "task"), seed=2, base_path=base, noise=0.02, dtype=torch.bfloat16)
    lang = make_model(ODD, str(root / "lang"), seed=3, base_path=base, noise=0.05, dtype=torch.bfloat16)

    class Family:
        pass

    family = Family()
    family.base, family.task, family.lang = base, task, lang
    return family


def whole_tensor_mix(terms, denominator, out_dtype):
    """The computation before blocks existed, written out again: one float32 buffer for
    the whole tensor, then divide, then round."""
    acc = torch.promote_types(out_dtype, torch.float32)
    (first, c0), rest = terms[0], terms[1:]
    total = first.to(dtype=acc, copy=True).mul_(c0)
    for tensor, c in rest:
        total.add_(tensor.to(acc), alpha=c)
    return total.div_(denominator).to(out_dtype)


@pytest.mark.parametrize("shape", [(97, 20), (45,), (7, 3, 5), ()])
def test_blocked_average_equals_whole_tensor_bit_for_bit(shape, monkeypatch):
    monkeypatch.setattr(mixing, "BLOCK_ELEMENTS", 7)
    blocks = list(mixing.row_blocks(shape))
    if len(shape) and shape[0] > 3:
        assert len(blocks) > 2  # several blocks, and the last one shorter
    generator = torch.Generator().manual_seed(0)
    task = [torch.randn(shape, generator=generator).to(torch.bfloat16) for _ in range(2)]
    lang = [torch.randn(shape, generator=generator).to(torch.bfloat16)]
    members = {"task": [(task[0], 0.7), (task[1], 1.9)], "language": [(lang[0], 1.3)]}
    shares = {"task": 0.25, "language": 0.75}
    got = mixing.mix_roles(members, shares, "t")
    # the same coefficients as mix_roles, computed here
    terms, denominator = [], 0.0
    for role in ("task", "language"):
        soup_weight = sum(w for _, w in members[role])
        coefficient = shares[role] * soup_weight / len(members[role])
        terms += [(t, coefficient * w / soup_weight) for t, w in members[role]]
        denominator += coefficient
    expected = whole_tensor_mix(terms, denominator, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def _digest(out):
    digest = {}
    for name in sorted(os.listdir(out)):
        if name.endswith((".safetensors", ".json")) and name != "config.json":
            with open(os.path.join(out, name), "rb") as handle:
                digest[name] = hashlib.sha256(handle.read()).hexdigest()
    return digest


def test_buffers_reused_between_blends_give_the_same_bits():
    """The working buffers are kept from one blend to the next (a fresh one per tensor
    cost most of a small tensor's blend): blends of other shapes and dtypes in between
    leave the bits unchanged."""
    generator = torch.Generator().manual_seed(4)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for shape in [(64, 48), (3, 5), (200, 7), (64, 48), (1,), (9, 2, 4)]:
            terms = [(torch.randn(shape, generator=generator).to(dtype), c) for c in (0.3, 1.1, 0.6)]
            accumulate = torch.promote_types(dtype, torch.float32)
            blended = mixing.weighted_average(terms, 2.0, accumulate, dtype)
            assert torch.equal(blended, whole_tensor_mix(terms, 2.0, dtype)), (dtype, shape)
    kept = mixing._scratch(0, (10, 10), torch.float32, "cpu")
    assert mixing._scratch(0, (5, 4), torch.float32, "cpu").data_ptr() == kept.data_ptr()


@pytest.mark.parametrize(
    "parameters",
    [
        dict(bottom_layers=1, top_layers=1, bottom_transition=1, top_transition=1),  # non_layer: average
        dict(bottom_layers=1, top_layers=1, bottom_transition=2, top_transition=1, transition_shape="linear"),
        dict(bottom_layers=1, top_layers=1, bottom_transition=1, top_transition=1, blend_method="linear"),
        dict(
            bottom_layers=1,
            top_layers=1,
            bottom_transition=1,
            top_transition=1,
            blend_method="task_arithmetic",
            base=True,
        ),
        dict(bottom_layers=0, top_layers=0, bottom_transition=3, top_transition=3, weighting="magnitude", base=True),
    ],
    ids=["average", "linear-shape", "blend-linear", "blend-task-arithmetic", "magnitude-soup"],
)
def test_blocked_merge_files_equal_whole_tensor_merge(odd_family, tmp_path, monkeypatch, parameters):
    parameters = dict(parameters)
    base = parameters.pop("base", False)
    recipe = swap_recipe(odd_family, base=base, **parameters)
    recipe["dtype"] = "bfloat16"
    monkeypatch.setattr(mixing, "BLOCK_ELEMENTS", WHOLE)
    (tmp_path / "whole").mkdir()
    (tmp_path / "blocked").mkdir()
    whole = merge(tmp_path / "whole", recipe)
    monkeypatch.setattr(mixing, "BLOCK_ELEMENTS", SMALL_BLOCK)
    blocked = merge(tmp_path / "blocked", recipe)
    assert _digest(whole) == _digest(blocked)
    assert any(name.endswith(".safetensors") for name in _digest(whole))


def test_whole_tensor_methods_are_not_blocked():
    from mergekit_layerswap.adapter.blend import ELEMENTWISE_METHODS

    # their results depend on statistics of the whole tensor (top-k, norms, random masks)
    for name in ("ties", "dare_linear", "dare_ties", "della", "breadcrumbs", "model_stock", "sce", "nuslerp"):
        assert name not in ELEMENTWISE_METHODS
