# SPDX-License-Identifier: LGPL-3.0-only
"""One source of truth per recipe parameter: the table in core/parameters.py, the kernel's
typed signature (which mergekit turns into the method's spec) and the README must agree."""

import os
import typing

import pytest

from mergekit_layerswap.core import parameters as table

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _spec():
    import mergekit_layerswap

    return {p.name: p for p in mergekit_layerswap.layer_swap.spec.parameters}


def _choices(value_type):
    """The Literal values a (possibly Optional) annotation allows, or None."""
    for arg in (value_type, *typing.get_args(value_type)):
        if typing.get_origin(arg) is typing.Literal:
            return tuple(typing.get_args(arg))
    return None


def test_kernel_signature_names_exactly_the_table_and_the_planner_values():
    recipe_names = [p.name for p in table.PARAMETERS if p.kind != table.OPTION]
    assert list(_spec()) == recipe_names + ["blend_options", "layer_index", "num_layers", "magnitude"]
    assert set(table.PLANNER_PARAMETERS) == set(_spec()) - set(recipe_names)


@pytest.mark.parametrize("parameter", [p for p in table.PARAMETERS if p.kind != table.OPTION], ids=lambda p: p.name)
def test_kernel_default_scope_and_choices_match_the_table(parameter):
    spec = _spec()[parameter.name]
    assert spec.default == parameter.default
    assert spec.scope.value == ("input" if parameter.scope == table.MODEL else "shared")
    if parameter.kind == table.CHOICE:
        assert _choices(spec.value_type) == parameter.choices
    else:
        assert _choices(spec.value_type) is None


def test_readme_parameter_table_is_generated_from_the_table():
    with open(README, encoding="utf-8") as handle:
        readme = handle.read()
    assert table.markdown_table() in readme, (
        "README's parameter table differs from core/parameters.py; paste the output of "
        "`python -m mergekit_layerswap.core.parameters`"
    )


def test_derived_views():
    assert table.ZONE_PARAMETERS == ("bottom_layers", "top_layers", "bottom_transition", "top_transition")
    assert table.SWEEPABLE == table.ZONE_PARAMETERS + ("weighting", "non_layer", "vision", "transition_shape")
    assert table.DEFAULTS == {
        "bottom_layers": 5,
        "top_layers": 2,
        "bottom_transition": 0,
        "top_transition": 0,
        "weighting": "uniform",
        "non_layer": "average",
        "vision": "language",
        "transition_shape": "flat",
        "blend_method": "average",
    }
    assert table.SYMBOLS == {
        "bottom_layers": "b",
        "top_layers": "u",
        "bottom_transition": "t_b",
        "top_transition": "t_u",
    }
