# SPDX-License-Identifier: LGPL-3.0-only
"""Algorithm 1 and the mixing shares, as tables written out by hand (no model files)."""

from fractions import Fraction

import pytest
import torch

from mergekit_layerswap.core.layers import SwapZones, layer_source, role_shares

# (L, b, u, t_b, t_u) -> the source of each layer, bottom first: L language, T task, B blend
RULE = [
    (8, 2, 1, 0, 0, "LLTTTTTL"),
    (8, 2, 1, 1, 1, "LLBTTTBL"),
    (8, 0, 0, 0, 0, "TTTTTTTT"),
    (8, 8, 0, 0, 0, "LLLLLLLL"),
    (8, 0, 0, 4, 4, "BBBBBBBB"),
    (8, 0, 0, 2, 0, "BBTTTTTT"),  # b=0 with t_b>0: the outermost layers blend
    (8, 0, 1, 0, 2, "TTTTTBBL"),
    (6, 3, 3, 0, 0, "LLLLLL"),
    (6, 1, 1, 2, 2, "LBBBBL"),
    (32, 5, 2, 0, 0, "L" * 5 + "T" * 25 + "L" * 2),  # the paper's default on Llama-3.1-8B
    (32, 4, 1, 2, 1, "L" * 4 + "BB" + "T" * 24 + "B" + "L"),
    (1, 0, 0, 0, 0, "T"),
    (1, 1, 0, 0, 0, "L"),
]
LETTER = {"language": "L", "task": "T", "blend": "B"}


@pytest.mark.parametrize("L,b,u,tb,tu,expected", RULE)
def test_layer_rule(L, b, u, tb, tu, expected):
    zones = SwapZones(b, u, tb, tu)
    assert "".join(LETTER[layer_source(layer, L, zones)] for layer in range(L)) == expected


# (L, zones, layer) -> task share of a linear transition layer, counted from the language side
LINEAR = [
    (8, SwapZones(1, 1, 2, 2), 1, Fraction(1, 3)),
    (8, SwapZones(1, 1, 2, 2), 2, Fraction(2, 3)),
    (8, SwapZones(1, 1, 2, 2), 6, Fraction(1, 3)),
    (8, SwapZones(1, 1, 2, 2), 5, Fraction(2, 3)),
    (8, SwapZones(0, 0, 1, 0), 0, Fraction(1, 2)),
    (8, SwapZones(2, 0, 3, 0), 4, Fraction(3, 4)),
]


@pytest.mark.parametrize("L,zones,layer,task_share", LINEAR)
def test_linear_transition_shares(L, zones, layer, task_share):
    shares = role_shares(layer, L, zones, transition_shape="linear")
    assert shares["task"] == pytest.approx(float(task_share)) and shares["language"] == pytest.approx(
        1 - float(task_share)
    )


@pytest.mark.parametrize(
    "non_layer,expected", [("average", (0.5, 0.5)), ("language", (0.0, 1.0)), ("task", (1.0, 0.0))]
)
def test_non_layer_shares(non_layer, expected):
    shares = role_shares(None, None, SwapZones(), non_layer=non_layer)
    assert (shares["task"], shares["language"]) == expected


def test_flat_transition_is_an_even_split_and_swapped_layers_are_whole():
    zones = SwapZones(1, 1, 1, 1)
    assert role_shares(1, 6, zones) == {"task": 0.5, "language": 0.5}
    assert role_shares(0, 6, zones) == {"task": 0.0, "language": 1.0}
    assert role_shares(3, 6, zones) == {"task": 1.0, "language": 0.0}


def test_out_of_range_layer_is_an_error():
    with pytest.raises(ValueError):
        layer_source(8, 8, SwapZones())


# role soups: (task experts [(value, weight)], language experts, task share) -> expected value
MIX = [
    ([(1.0, 1.0)], [(3.0, 1.0)], 0.5, 2.0),
    ([(1.0, 1.0)], [(3.0, 3.0)], 0.5, (1 * 1 + 3 * 3) / 4),
    ([(1.0, 1.0), (5.0, 1.0)], [(3.0, 1.0)], 0.5, (3.0 + 3.0) / 2),
    # a role soup is the weighted mean of its experts and carries their mean weight
    ([(1.0, 1.0), (4.0, 2.0)], [(10.0, 1.0)], 0.5, (1.5 * 3.0 + 1.0 * 10.0) / 2.5),
    ([(1.0, 1.0)], [(3.0, 1.0)], 2 / 3, (2 / 3 * 1 + 1 / 3 * 3)),
]


@pytest.mark.parametrize("task,language,task_share,expected", MIX)
def test_mix_roles(task, language, task_share, expected):
    from mergekit_layerswap.adapter.mixing import mix_roles

    members = {
        "task": [(torch.full((3, 5), v), w) for v, w in task],
        "language": [(torch.full((3, 5), v), w) for v, w in language],
    }
    out = mix_roles(members, {"task": task_share, "language": 1 - task_share})
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    assert torch.allclose(out, torch.full((3, 5), expected, dtype=torch.float32))


def test_a_single_expert_taken_whole_is_returned_untouched():
    from mergekit_layerswap.adapter.mixing import mix_roles

    tensor = torch.randn(4, 4, dtype=torch.bfloat16)
    out = mix_roles({"task": [(tensor, 2.0)], "language": [(torch.zeros(4, 4), 1.0)]}, {"task": 1.0, "language": 0.0})
    assert out is tensor


@pytest.mark.parametrize("L,b,u,tb,tu,expected", RULE)
@pytest.mark.parametrize("non_layer", ["average", "task", "language"])
def test_the_rule_object_answers_reads_from_the_same_table(L, b, u, tb, tu, expected, non_layer):
    """SwapRule (the one entry point kernel, planner, checks and explain ask): the roles it
    reads for each layer are the table's letters; a non-layer tensor follows non_layer."""
    from mergekit_layerswap.core.layers import SwapRule

    rule = SwapRule(SwapZones(b, u, tb, tu), non_layer=non_layer, transition_shape="linear")
    for layer, letter in enumerate(expected):
        sources = rule.sources(layer, L)
        read = {"L": ("language",), "T": ("task",), "B": ("task", "language")}[letter]
        assert sources.roles == read and sources.blends == (letter == "B")
        assert [sources.reads(role) for role in ("task", "language")] == [r in read for r in ("task", "language")]
        assert not sources.reads(None)
    outside = rule.sources(None, None)
    assert outside.roles == (("task", "language") if non_layer == "average" else (non_layer,))
