# SPDX-License-Identifier: LGPL-3.0-only
"""Per-module zone sizes: mergekit's filter form for the four zone parameters."""

import pytest

from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.zones import check_zone_value, module_classes, resolve, text, to_recipe

ATTN = "model.layers.0.self_attn.q_proj.weight"
MLP = "model.layers.0.mlp.down_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"


def test_filter_list_resolves_like_mergekit():
    """The value this package resolves is the one mergekit's own evaluate_setting hands the
    kernel, for every tensor and every shape of filter list."""
    from mergekit.config import ConditionalParameter, evaluate_setting

    written = [
        [{"filter": "self_attn", "value": 5}, {"value": 3}],
        [{"filter": "q_proj", "value": 1}, {"filter": "self_attn", "value": 2}, {"filter": "*", "value": 4}],
        [{"filter": "mlp", "value": 0}, {"filter": "layernorm", "value": 7}, {"value": 2}],
        [{"value": 6}],
    ]
    for setting in written:
        ours = check_zone_value("bottom_layers", setting, 5)
        theirs = [ConditionalParameter(**entry) for entry in setting]
        for name in (ATTN, MLP, NORM, "model.layers.0.self_attn.k_proj.weight"):
            assert resolve(ours, name) == evaluate_setting(name, theirs, validate=int), (setting, name)


def test_plain_integers_stay_integers_and_parsed_objects_are_accepted():
    from mergekit.config import ConditionalParameter

    assert check_zone_value("top_layers", 2, 2) == 2
    assert check_zone_value("top_layers", [{"value": 2}], 2) == 2
    parsed = [ConditionalParameter(filter="self_attn", value=5), ConditionalParameter(value=3)]
    assert check_zone_value("bottom_layers", parsed, 5) == (("self_attn", 5), (None, 3))
    assert to_recipe(check_zone_value("bottom_layers", parsed, 5)) == [
        {"filter": "self_attn", "value": 5},
        {"value": 3},
    ]
    assert text(((("self_attn", 5), (None, 3)))) == "[self_attn:5, other:3]"


@pytest.mark.parametrize(
    "setting, words",
    [
        (-1, ["parameters.bottom_layers", "non-negative whole number"]),
        ([{"filter": "self_attn", "value": 2.5}, {"value": 3}], ["bottom_layers[0].value", "2.5"]),
        ([{"filter": "self_attn", "value": 5}], ["bottom_layers", "last entry without `filter:`"]),
        ([{"value": 3}, {"filter": "self_attn", "value": 5}], ["bottom_layers[0]", "put the entry without"]),
        ([3, 5], ["bottom_layers", "gradient"]),
        ([], ["bottom_layers", "empty list"]),
        ([{"filter": "self_attn", "layers": 5}, {"value": 3}], ["bottom_layers[0]", "{filter: NAME, value: LAYERS}"]),
        ([{"filter": 3, "value": 5}, {"value": 3}], ["bottom_layers[0].filter"]),
        ([{"filter": "mlp", "value": True}, {"value": 3}], ["bottom_layers[0].value", "True"]),
    ],
)
def test_bad_zone_values_name_the_parameter(setting, words):
    with pytest.raises(RecipeError) as caught:
        check_zone_value("bottom_layers", setting, 5)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_module_classes_group_a_layer_by_its_sizes():
    values = (
        check_zone_value("bottom_layers", [{"filter": "self_attn", "value": 5}, {"value": 3}], 5),
        2,
        check_zone_value("bottom_transition", [{"filter": "mlp", "value": 1}, {"value": 0}], 0),
        0,
    )
    classes = module_classes(values, [NORM, ATTN, MLP, "model.layers.0.self_attn.o_proj.weight"])
    assert [(c.label, c.sizes) for c in classes] == [
        ("self_attn", (5, 2, 0, 0)),
        ("mlp", (3, 2, 1, 0)),
        ("other", (3, 2, 0, 0)),  # always last
    ]
    assert classes[0].names == (ATTN, "model.layers.0.self_attn.o_proj.weight")


PER_MODULE = dict(
    bottom_layers=[{"filter": "self_attn", "value": 3}, {"value": 1}],
    top_layers=[{"filter": "mlp", "value": 2}, {"value": 1}],
    bottom_transition=[{"filter": "self_attn", "value": 1}, {"value": 0}],
    top_transition=0,
)


def _expected_source(layer, num_layers, name):
    """Written out by hand for PER_MODULE: attention tensors b=3, t_b=1; MLP tensors u=2;
    everything else b=1, u=1."""
    b = 3 if "self_attn" in name else 1
    u = 2 if "mlp" in name else 1
    t_b = 1 if "self_attn" in name else 0
    if layer < b or layer >= num_layers - u:
        return "language"
    if layer < b + t_b:
        return "blend"
    return "task"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_per_module_zones_merge_every_tensor_from_its_own_zone(families, tmp_path, arch):
    import torch
    from checkpoints import load_tensors
    from helpers import merge, swap_recipe

    fam = families(arch)
    out = merge(tmp_path, swap_recipe(fam, **PER_MODULE, non_layer="task"))
    merged, task, lang = load_tensors(out), load_tensors(fam.task), load_tensors(fam.lang)
    num_layers = fam.arch.num_layers
    seen = set()
    for name, tensor in merged.items():
        layer = fam.arch.layer_of(name)
        if layer is None:
            assert torch.equal(tensor, task[name]), name  # non_layer: task
            continue
        source = _expected_source(layer, num_layers, name)
        seen.add(("self_attn" in name, "mlp" in name, source))
        if source == "blend":
            torch.testing.assert_close(tensor, (task[name] + lang[name]) / 2, rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, {"task": task, "language": lang}[source][name]), (name, source)
    # every kind of tensor met every zone it has (so the test cannot pass on a uniform rule)
    assert {
        (True, False, "blend"),
        (True, False, "language"),
        (False, True, "language"),
        (False, False, "task"),
    } <= seen


def test_merge_state_dicts_resolves_per_module_zones_per_tensor(families):
    """mergekit's in-memory API hands the filter list to the method as written: each
    tensor gets its own zone sizes, the same as mergekit-yaml's."""
    import torch
    from checkpoints import load_tensors
    from mergekit.merge_methods.api import merge_state_dicts

    fam = families("llama")
    task, lang = load_tensors(fam.task), load_tensors(fam.lang)
    roles = {"role": {"task": "task", "lang": "language"}, "non_layer": "task"}
    merged = merge_state_dicts({"task": task, "lang": lang}, "layer_swap", parameters={**roles, **PER_MODULE})
    assert set(merged) == set(task)
    sources = set()
    for name, tensor in merged.items():
        layer = fam.arch.layer_of(name)
        source = "task" if layer is None else _expected_source(layer, fam.arch.num_layers, name)
        sources.add(("self_attn" in name, source))
        if source == "blend":
            torch.testing.assert_close(tensor, (task[name] + lang[name]) / 2, rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, {"task": task, "language": lang}[source][name]), (name, source)
    assert {(True, "blend"), (True, "language"), (False, "language"), (False, "task")} <= sources
    with pytest.raises(RecipeError, match="bottom_layers"):
        merge_state_dicts(
            {"task": task, "lang": lang},
            "layer_swap",
            parameters={**roles, "bottom_layers": [{"filter": "mlp", "value": 1}]},
        )


def test_per_module_zone_errors_before_anything_is_written(families, tmp_path):
    from helpers import refused, swap_recipe

    fam = families("llama")  # 8 layers
    refused(
        tmp_path,
        swap_recipe(fam, bottom_layers=[{"filter": "self_atn", "value": 3}, {"value": 1}]),
        "parameters.bottom_layers[0].filter",
        "self_atn",
        "matches no tensor",
    )
    refused(
        tmp_path,
        swap_recipe(fam, bottom_layers=[{"filter": "self_attn", "value": 7}, {"value": 1}], top_layers=2),
        "= 9 for self_attn tensors",
        "8 decoder layers",
    )
    refused(
        tmp_path, swap_recipe(fam, top_layers=[{"filter": "mlp", "value": 2}]), "parameters.top_layers", "last entry"
    )


def test_explain_and_model_card_show_one_column_per_module_class(families, tmp_path):
    import json

    from click.testing import CliRunner
    from helpers import merge, swap_recipe, write_recipe

    from mergekit_layerswap.cli.main import main

    fam = families("llama")
    recipe = swap_recipe(fam, **PER_MODULE)
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = CliRunner().invoke(main, ["explain", path, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [c["tensors"] for c in report["module_classes"]] == ["self_attn", "mlp", "other"]
    assert report["zones"]["bottom_layers"] == PER_MODULE["bottom_layers"]
    num_layers = fam.arch.num_layers
    examples = {"self_attn": "model.layers.0.self_attn.q_proj.weight", "mlp": "model.layers.0.mlp.up_proj.weight"}
    examples["other"] = "model.layers.0.input_layernorm.weight"
    for row in report["layers"]:
        for label, name in examples.items():
            assert row["modules"][label]["source"] == _expected_source(row["layer"], num_layers, name), (row, label)

    text = CliRunner().invoke(main, ["explain", path]).output
    header = next(line for line in text.splitlines() if line.strip().startswith("layer"))
    assert header.split() == ["layer", "self_attn", "mlp", "other"]
    assert "bottom_layers=[self_attn:3, other:1]" in text

    card = open(f"{merge(tmp_path, recipe)}/README.md").read()
    assert "| layers | self_attn tensors | mlp tensors | other tensors |" in card
    assert "| 3 | blend of task and language experts | task expert | task expert |" in card
    assert "| 6 | task expert | language expert | task expert |" in card


def test_the_rule_answers_per_tensor_and_refuses_to_guess_without_a_name():
    from mergekit_layerswap.core.layers import SwapRule, SwapZones

    zones = SwapZones(bottom_layers=(("self_attn", 3), (None, 1)), top_layers=0)
    rule = SwapRule(zones, non_layer="task")
    assert rule.source(2, 8, ATTN) == "language" and rule.source(2, 8, MLP) == "task"
    assert rule.sources(2, 8, ATTN).reads("language") and not rule.sources(2, 8, MLP).reads("language")
    assert rule.sources(None, None).shares == {"task": 1.0, "language": 0.0}  # zones do not apply
    with pytest.raises(ValueError, match="tensor's name"):
        rule.sources(2, 8)
    with pytest.raises(ValueError):
        _ = zones.total
    plain = SwapRule(SwapZones(3, 0))
    assert plain.source(2, 8) == plain.source(2, 8, MLP) == "language"
