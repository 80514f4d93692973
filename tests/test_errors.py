# SPDX-License-Identifier: LGPL-3.0-only
"""Every bad recipe: one `Error:` line naming the parameter, non-zero exit, nothing written."""

import os

import pytest
from checkpoints import ARCHS, make_model, variant
from helpers import refused, run_yaml_subprocess, swap_recipe, write_recipe


def experts(fam, task_params=None, lang_params=None):
    return [
        {"model": fam.task, "parameters": task_params if task_params is not None else {"role": "task"}},
        {"model": fam.lang, "parameters": lang_params if lang_params is not None else {"role": "language"}},
    ]


@pytest.fixture
def fam(families):
    return families("llama")


def test_model_without_role(fam, tmp_path):
    refused(tmp_path, swap_recipe(fam, models=experts(fam, task_params={})), "models[0]", "role")


def test_unknown_role(fam, tmp_path):
    refused(tmp_path, swap_recipe(fam, models=experts(fam, lang_params={"role": "swahili"})), "role", "language")


def test_role_at_top_level(fam, tmp_path):
    recipe = swap_recipe(fam, role="task")
    refused(tmp_path, recipe, "parameters.role", "each model")


@pytest.mark.parametrize(
    "name,value",
    [
        ("bottom_layers", [1, 3]),
        ("top_transition", [{"filter": "mlp", "value": 1}]),
        ("weighting", ["uniform", "magnitude"]),
        ("non_layer", [{"filter": "embed", "value": "language"}]),
    ],
)
def test_per_tensor_lists_or_filters_for_whole_model_parameters(fam, tmp_path, name, value):
    refused(tmp_path, swap_recipe(fam, **{name: value}), f"parameters.{name}", "one value")


@pytest.mark.parametrize("weight", [0, -1.0, [1.0, 0.0], [{"filter": "mlp", "value": -2}]])
def test_non_positive_weights(fam, tmp_path, weight):
    refused(
        tmp_path,
        swap_recipe(fam, models=experts(fam, lang_params={"role": "language", "weight": weight})),
        "weight",
        "positive",
    )


def test_base_listed_as_expert(fam, tmp_path):
    recipe = swap_recipe(fam, models=experts(fam), base=True)
    recipe["base_model"] = fam.lang
    refused(tmp_path, recipe, "base_model", "revert")


@pytest.mark.parametrize("missing", ["task", "language"])
def test_missing_role(fam, tmp_path, missing):
    other = "language" if missing == "task" else "task"
    models = [{"model": fam.task, "parameters": {"role": other}}, {"model": fam.lang, "parameters": {"role": other}}]
    refused(tmp_path, swap_recipe(fam, models=models), f"no {missing} expert")


@pytest.mark.parametrize("value", [-1, 2.5, True, "3"])
def test_bad_zone_sizes(fam, tmp_path, value):
    refused(tmp_path, swap_recipe(fam, bottom_layers=value), "parameters.bottom_layers", "whole number")


def test_zones_larger_than_model(fam, tmp_path):
    refused(
        tmp_path,
        swap_recipe(fam, bottom_layers=4, top_layers=3, bottom_transition=1, top_transition=1),
        "= 9",
        "8 decoder layers",
    )


@pytest.mark.parametrize(
    "name,value", [("weighting", "inverse"), ("non_layer", "base"), ("transition_shape", "cosine")]
)
def test_unknown_choice(fam, tmp_path, name, value):
    refused(tmp_path, swap_recipe(fam, **{name: value}), f"parameters.{name}", "one of")


def test_magnitude_without_base(fam, tmp_path):
    refused(tmp_path, swap_recipe(fam, weighting="magnitude"), "base_model", "weighting: uniform")


@pytest.mark.parametrize("where", ["top", "model", "planner"])
def test_unknown_parameter_names(fam, tmp_path, where):
    if where == "top":
        refused(tmp_path, swap_recipe(fam, bottom_layer=3), "parameters.bottom_layer", "known:")
    elif where == "model":
        refused(
            tmp_path,
            swap_recipe(fam, models=experts(fam, task_params={"role": "task", "bottom_layers": 3})),
            "bottom_layers",
            "top-level",
        )
    else:
        refused(tmp_path, swap_recipe(fam, layer_index=3), "layer_index", "cannot be set")


def test_slices_are_refused(fam, tmp_path):
    recipe = {
        "merge_method": "layer_swap",
        "slices": [
            {
                "sources": [
                    {"model": fam.task, "layer_range": [0, 8], "parameters": {"role": "task"}},
                    {"model": fam.lang, "layer_range": [0, 8], "parameters": {"role": "language"}},
                ]
            }
        ],
    }
    refused(tmp_path, recipe, "models:", "slices")


def test_duplicate_expert(fam, tmp_path):
    models = experts(fam) + [{"model": fam.lang, "parameters": {"role": "language"}}]
    refused(tmp_path, swap_recipe(fam, models=models), "listed twice")


def test_missing_model_path(fam, tmp_path):
    models = experts(fam)
    models[0]["model"] = str(tmp_path / "nowhere")
    refused(tmp_path, swap_recipe(fam, models=models), "does not exist", "nowhere")


def test_different_architectures(families, tmp_path):
    llama, qwen = families("llama"), families("qwen2")
    models = [
        {"model": qwen.task, "parameters": {"role": "task"}},
        {"model": llama.lang, "parameters": {"role": "language"}},
    ]
    refused(tmp_path, swap_recipe(llama, models=models), "architectures differ", "Qwen2ForCausalLM")


def _variant(tmp_path, name, **overrides):
    return make_model(variant(ARCHS["llama"], name, **overrides), str(tmp_path / name), seed=11)


def test_different_layer_counts(fam, tmp_path):
    other = _variant(tmp_path, "six", num_hidden_layers=6)
    refused(
        tmp_path,
        swap_recipe(fam, models=experts(fam)[:1] + [{"model": other, "parameters": {"role": "language"}}]),
        "layer counts differ",
    )


def test_different_tensor_shapes(fam, tmp_path):
    other = _variant(tmp_path, "wide", intermediate_size=64)
    refused(
        tmp_path,
        swap_recipe(fam, models=experts(fam)[:1] + [{"model": other, "parameters": {"role": "language"}}]),
        "shapes differ",
        "mlp",
    )


def test_different_vocabularies_point_at_tokenizer(fam, tmp_path):
    other = _variant(tmp_path, "vocab", vocab_size=100)
    message = refused(
        tmp_path,
        swap_recipe(fam, models=experts(fam)[:1] + [{"model": other, "parameters": {"role": "language"}}]),
        "vocabulary sizes differ",
    )
    assert "tokenizer:" in message


def test_tied_and_untied_experts(fam, tmp_path):
    other = _variant(tmp_path, "tied", tie_word_embeddings=True)
    refused(
        tmp_path,
        swap_recipe(fam, models=experts(fam)[:1] + [{"model": other, "parameters": {"role": "language"}}]),
        "lm_head.weight",
        "untie",
    )


def test_cli_prints_one_line_without_traceback(fam, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, models=experts(fam, task_params={})))
    result = run_yaml_subprocess(path, tmp_path / "out")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("Error: ") and "role" in lines[-1], result.stderr
    assert not os.path.exists(tmp_path / "out")
