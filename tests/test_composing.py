# SPDX-License-Identifier: LGPL-3.0-only
"""layer_swap composed with mergekit's other features: role soups, linear transitions,
other blend methods, LoRA experts, mergekit-multi stages."""

import os

import pytest
import torch
from checkpoints import load_tensors, make_model
from click.testing import CliRunner
from expectations import check_swap
from helpers import merge, refused, run_yaml_inprocess, swap_recipe, write_recipe


@pytest.fixture(scope="module")
def soup_family(families, tmp_path_factory):
    fam = families("qwen2")  # 6 layers
    root = tmp_path_factory.mktemp("soups")
    fam.task2 = make_model(fam.arch, str(root / "task2"), seed=21, base_path=fam.base, noise=0.03)
    fam.lang2 = make_model(fam.arch, str(root / "lang2"), seed=22, base_path=fam.base, noise=0.04)
    return fam


def test_several_experts_per_role_are_averaged_then_swapped(soup_family, tmp_path):
    fam = soup_family
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.task2, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 1.0}},
        {"model": fam.lang2, "parameters": {"role": "language", "weight": 3.0}},
    ]
    out = load_tensors(
        merge(tmp_path, swap_recipe(fam, models=models, bottom_layers=2, top_layers=1, bottom_transition=1))
    )
    t1, t2, l1, l2 = (load_tensors(p) for p in (fam.task, fam.task2, fam.lang, fam.lang2))
    sources = "LLBTTL"
    for name, tensor in out.items():
        layer = fam.arch.layer_of(name)
        task_soup = (t1[name].double() + t2[name].double()) / 2  # carries weight (1+1)/2 = 1
        lang_soup = (l1[name].double() + 3 * l2[name].double()) / 4  # carries weight (1+3)/2 = 2
        kind = sources[layer] if layer is not None else "B"
        expected = {"L": lang_soup, "T": task_soup, "B": (1 * task_soup + 2 * lang_soup) / 3}[kind]
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name


def test_one_expert_per_role_is_unchanged_by_the_soup_rule(soup_family, tmp_path):
    fam = soup_family
    out = merge(tmp_path, swap_recipe(fam, bottom_layers=2, top_layers=1, bottom_transition=1))
    check_swap(out, fam, "LLBTTL")


def test_linear_transition_shape(families, tmp_path):
    fam = families("qwen2")  # b=1, t_b=2, t_u=2, u=0: layers 1,2 and 5,4 are the j=1,2 transition layers
    out = merge(
        tmp_path,
        swap_recipe(
            fam, bottom_layers=1, top_layers=0, bottom_transition=2, top_transition=2, transition_shape="linear"
        ),
    )
    task_share = {1: 1 / 3, 2: 2 / 3, 5: 1 / 3, 4: 2 / 3}
    check_swap(out, fam, "LBBTBB", blend_share=lambda layer: task_share[layer])


def test_linear_shape_with_one_layer_zone_equals_flat(families, tmp_path):
    fam = families("qwen2")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    zones = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
    flat = load_tensors(merge(tmp_path / "a", swap_recipe(fam, **zones)))
    linear = load_tensors(merge(tmp_path / "b", swap_recipe(fam, transition_shape="linear", **zones)))
    assert all(torch.equal(flat[name], linear[name]) for name in flat)


def test_blend_with_task_arithmetic_uses_the_base(families, tmp_path):
    fam = families("llama")  # 8 layers: b=2,u=1,t_b=1,t_u=1 -> L L B T T T B L
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 3.0}},
    ]
    recipe = swap_recipe(
        fam,
        models=models,
        base=True,
        bottom_layers=2,
        top_layers=1,
        bottom_transition=1,
        top_transition=1,
        blend_method="task_arithmetic",
    )
    out = load_tensors(merge(tmp_path, recipe))
    task, lang, base = load_tensors(fam.task), load_tensors(fam.lang), load_tensors(fam.base)
    for name, tensor in out.items():
        layer = fam.arch.layer_of(name)
        kind = "LLBTTTBL"[layer] if layer is not None else "B"
        if kind == "B":  # each role's weight times its share 1/2: base + 0.5 dT + 1.5 dL
            b = base[name].double()
            expected = b + 0.5 * (task[name].double() - b) + 1.5 * (lang[name].double() - b)
            assert torch.allclose(tensor.double(), expected, atol=1e-5), name
        else:
            assert torch.equal(tensor, (lang if kind == "L" else task)[name]), name


def test_blend_with_linear_equals_the_default_average(families, tmp_path):
    fam = families("llama")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    zones = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
    plain = load_tensors(merge(tmp_path / "a", swap_recipe(fam, **zones)))
    linear = load_tensors(merge(tmp_path / "b", swap_recipe(fam, blend_method="linear", blend_normalize=True, **zones)))
    assert all(torch.allclose(plain[n], linear[n], atol=1e-6) for n in plain)


def test_blend_with_ties_matches_mergekits_own_ties(families, tmp_path):
    from mergekit.merge_methods.api import merge_tensors

    fam = families("llama")
    recipe = swap_recipe(
        fam,
        base=True,
        bottom_layers=2,
        top_layers=1,
        bottom_transition=1,
        top_transition=1,
        blend_method="ties",
        blend_density=0.5,
    )
    out = load_tensors(merge(tmp_path, recipe))
    task, lang, base = load_tensors(fam.task), load_tensors(fam.lang), load_tensors(fam.base)
    name = "model.layers.2.mlp.down_proj.weight"  # a transition layer
    expected = merge_tensors(
        [task[name], lang[name], base[name]],
        "ties",
        ids=["t", "l", "b"],
        base_index=2,
        parameters={"weight": 0.5, "density": 0.5},
    )
    assert torch.allclose(out[name], expected, atol=1e-6)
    assert not torch.allclose(out[name], (task[name] + lang[name]) / 2, atol=1e-4)


@pytest.mark.parametrize(
    "parameters,words",
    [
        ({"blend_method": "ties"}, ("ties needs base_model",)),
        ({"blend_method": "no_such_method"}, ("blend_method", "average")),
        ({"blend_method": "linear", "blend_density": 0.5}, ("blend_density", "linear has no parameter")),
        ({"blend_density": 0.5}, ("blend_density", "blend_method")),
        ({"blend_method": "linear", "blend_normalize": [True, False]}, ("blend_normalize", "one value")),
    ],
)
def test_bad_blend_settings(families, tmp_path, parameters, words):
    refused(tmp_path, swap_recipe(families("llama"), **parameters), *words)


def test_blend_method_that_cannot_take_two_experts(families, tmp_path):
    refused(
        tmp_path, swap_recipe(families("llama"), base=True, blend_method="slerp", blend_t=0.5), "slerp cannot blend"
    )


def test_lora_language_expert(families, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    fam = families("llama")
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter = tmp_path / "adapter"
    lora.save_pretrained(str(adapter))
    models = [
        {"model": fam.task, "parameters": {"role": "task"}},
        {"model": f"{fam.base}+{adapter}", "parameters": {"role": "language"}},
    ]
    out = load_tensors(
        merge(
            tmp_path,
            swap_recipe(fam, models=models, bottom_layers=2, top_layers=1),
            "--lora-merge-cache",
            str(tmp_path / "lora-cache"),
        )
    )
    base, task = load_tensors(fam.base), load_tensors(fam.task)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    scale = 8 / 4
    for name, tensor in out.items():
        layer = fam.arch.layer_of(name)
        if layer is None or 2 <= layer <= 6:
            continue  # non-layer tensors are averages; 2..6 are the task expert's
        expected = base[name]
        for module in ("q_proj", "v_proj"):
            if f"self_attn.{module}.weight" in name:
                stem = f"base_model.model.{name[: -len('.weight')]}"
                expected = base[name] + scale * weights[f"{stem}.lora_B.weight"] @ weights[f"{stem}.lora_A.weight"]
                assert not torch.allclose(expected, base[name])
        assert torch.allclose(tensor, expected, atol=1e-5), name
    assert torch.equal(out["model.layers.4.self_attn.q_proj.weight"], task["model.layers.4.self_attn.q_proj.weight"])


def test_lora_recipe_is_validated_before_the_lora_is_merged(families, tmp_path):
    fam = families("llama")
    models = [
        {"model": fam.task, "parameters": {"role": "task"}},
        {"model": f"{fam.base}+{tmp_path / 'adapter'}", "parameters": {"role": "language"}},
    ]
    cache = tmp_path / "lora-cache"
    path = write_recipe(tmp_path / "r.yaml", swap_recipe(fam, models=models, bottom_layers=9))
    result = run_yaml_inprocess(path, tmp_path / "out", "--lora-merge-cache", str(cache))
    assert result.exit_code != 0 and "8 decoder layers" in result.output
    assert not cache.exists() or not os.listdir(cache)


def test_mergekit_multi_soups_then_swap(soup_family, tmp_path):
    import yaml
    from mergekit.scripts.multimerge import main as multimerge

    fam = soup_family
    stages = [
        {
            "name": "lang-soup",
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": fam.lang, "parameters": {"weight": 1.0}},
                {"model": fam.lang2, "parameters": {"weight": 1.0}},
            ],
        },
        {
            "name": "math-soup",
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": fam.task, "parameters": {"weight": 1.0}},
                {"model": fam.task2, "parameters": {"weight": 1.0}},
            ],
        },
        {
            "merge_method": "layer_swap",
            "dtype": "float32",
            "models": [
                {"model": "math-soup", "parameters": {"role": "task"}},
                {"model": "lang-soup", "parameters": {"role": "language"}},
            ],
            "parameters": {"bottom_layers": 2, "top_layers": 1, "bottom_transition": 1},
        },
    ]
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    result = CliRunner().invoke(
        multimerge, [str(path), "-I", str(tmp_path / "stages"), "--out-path", str(tmp_path / "final"), "--quiet"]
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    out = load_tensors(str(tmp_path / "final"))
    t1, t2, l1, l2 = (load_tensors(p) for p in (fam.task, fam.task2, fam.lang, fam.lang2))
    for name, tensor in out.items():
        layer = fam.arch.layer_of(name)
        task_soup = (t1[name].double() + t2[name].double()) / 2
        lang_soup = (l1[name].double() + l2[name].double()) / 2
        kind = "LLBTTL"[layer] if layer is not None else "B"
        expected = {"L": lang_soup, "T": task_soup, "B": (task_soup + lang_soup) / 2}[kind]
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name


def test_mergekit_multi_refuses_a_bad_swap_before_any_stage_runs(soup_family, tmp_path):
    import yaml
    from mergekit.scripts.multimerge import main as multimerge

    fam = soup_family
    stages = [
        {
            "name": "lang-soup",
            "merge_method": "linear",
            "models": [
                {"model": fam.lang, "parameters": {"weight": 1.0}},
                {"model": fam.lang2, "parameters": {"weight": 1.0}},
            ],
        },
        {
            "merge_method": "layer_swap",
            "models": [{"model": fam.task}, {"model": "lang-soup", "parameters": {"role": "language"}}],
        },
    ]
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    result = CliRunner().invoke(
        multimerge, [str(path), "-I", str(tmp_path / "stages"), "--out-path", str(tmp_path / "final"), "--quiet"]
    )
    assert result.exit_code != 0 and "has no role" in result.output
    assert not (tmp_path / "stages" / "lang-soup").exists() and not (tmp_path / "final").exists()
