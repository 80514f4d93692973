# SPDX-License-Identifier: LGPL-3.0-only
"""Mixture-of-experts decoders: a layer (router, every expert, shared experts, norms) is
taken whole from the expert the rule picks; transition layers and soups blend elementwise.

transformers saves one 2-D tensor per expert (``mixtral``, ``qwen3_moe``, ``glm4_moe``);
the ``*_fused`` checkpoints store the fused 3-D tensors transformers holds in memory.
Expectations are computed here from the files, compared as transformers' own class loads
each checkpoint (so the output must load, whatever the experts' storage).
"""

import json
import os

import pytest
import torch
from checkpoints import ARCHS, fused_copy, load_tensors, make_model, model_tensors
from click.testing import CliRunner
from expectations import check_swap, row_mav_mean
from helpers import Family, merge, swap_recipe, write_recipe

ZONED = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
SOURCES = "LLBTBL"  # 6 layers, written out by hand
MOE = ["mixtral", "mixtral_fused", "qwen3_moe", "qwen3_moe_fused", "glm4_moe"]


def _experts_of(arch_name):
    return 4  # every tiny MoE config in checkpoints.py has four routed experts


@pytest.mark.parametrize("arch", MOE)
def test_each_moe_layer_is_taken_whole_or_blended(families, tmp_path, arch):
    fam = families(arch)
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 3.0}},
    ]
    out = merge(tmp_path, swap_recipe(fam, models=models, **ZONED))
    counts = check_swap(out, fam, SOURCES, w_task=1.0, w_lang=3.0, model_layout=True)
    assert counts["L"] and counts["T"] and counts["B"]
    # every layer's router and expert tensors are among the compared ones, fused or not
    lang = model_tensors(fam.arch, fam.lang)
    for layer in range(1, 6):  # (glm4_moe's layer 0 is dense: first_k_dense_replace=1)
        experts = lang[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        assert experts.dim() == 3 and experts.shape[0] == _experts_of(arch)
        assert f"model.layers.{layer}.mlp.gate.weight" in lang
    if arch == "glm4_moe":
        assert "model.layers.3.mlp.shared_experts.up_proj.weight" in lang
        assert "model.layers.0.mlp.up_proj.weight" in lang  # the dense first layer
    # the output keeps the experts' own layout (one 2-D tensor per expert, or fused 3-D),
    # each stored tensor blended on its own: compared stored tensor by stored tensor too
    stored = load_tensors(out)
    assert set(stored) == set(load_tensors(fam.lang))
    stored_counts = check_swap(out, fam, SOURCES, w_task=1.0, w_lang=3.0)
    assert stored_counts["L"] and stored_counts["T"] and stored_counts["B"]
    assert any(t.dim() == 3 for t in stored.values()) == arch.endswith("_fused")


def test_magnitude_rows_of_fused_experts_are_each_experts_rows(families, tmp_path):
    """The statistic of a fused checkpoint equals that of the same weights stored one
    2-D tensor per expert, and the merge uses it."""
    per_expert = families("mixtral")
    root = tmp_path / "fused"
    fused = Family(
        ARCHS["mixtral_fused"],
        *(fused_copy(per_expert.arch, getattr(per_expert, r), str(root / r)) for r in ("base", "task", "lang")),
    )
    for role in ("task", "lang"):  # the same weights, stored two ways
        assert torch.equal(
            model_tensors(fused.arch, getattr(fused, role))["model.layers.2.mlp.experts.down_proj"],
            model_tensors(per_expert.arch, getattr(per_expert, role))["model.layers.2.mlp.experts.down_proj"],
        )
    for fam in (fused, per_expert):
        m_task, m_lang = row_mav_mean(fam.task, fam.base), row_mav_mean(fam.lang, fam.base)
        (tmp_path / fam.arch.name).mkdir()
        out = merge(tmp_path / fam.arch.name, swap_recipe(fam, base=True, weighting="magnitude", **ZONED))
        check_swap(out, fam, SOURCES, w_task=1 / m_task, w_lang=1 / m_lang, rtol=1e-4, model_layout=True)
    assert row_mav_mean(fused.task, fused.base) == pytest.approx(row_mav_mean(per_expert.task, per_expert.base))
    assert any(t.dim() == 3 for t in load_tensors(fused.task).values())


def test_explain_counts_every_expert_tensor_of_a_layer(families, tmp_path):
    from mergekit_layerswap.cli.main import main

    fam = families("mixtral")
    path = write_recipe(tmp_path / "r.yaml", swap_recipe(fam, non_layer="task", **ZONED))
    result = CliRunner().invoke(main, ["explain", path, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)

    def size(path, keep):
        return sum(t.numel() * t.element_size() for n, t in load_tensors(path).items() if keep(n))

    layer = fam.arch.layer_of  # stored names: model.layers.N.block_sparse_moe.experts.E.w1.weight, ...
    assert report["bytes_to_read"][fam.lang] == size(fam.lang, lambda n: layer(n) in (0, 1, 2, 4, 5))
    assert report["bytes_to_read"][fam.task] == size(fam.task, lambda n: layer(n) is None or 2 <= layer(n) <= 4)


def test_analyze_places_each_expert_in_its_layer(families, tmp_path):
    from mergekit_layerswap.cli.main import main

    fam = families("qwen3_moe")
    out = tmp_path / "analysis"
    result = CliRunner().invoke(
        main, ["analyze", "--base", fam.base, "--expert", fam.lang, "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads((out / "stats.json").read_text())
    rows = {row["tensor"]: row for row in document["rows"]}
    lang, base = load_tensors(fam.lang), load_tensors(fam.base)
    for layer in range(6):
        name = f"model.layers.{layer}.mlp.experts.3.up_proj.weight"
        expected = (lang[name] - base[name]).abs().mean(dim=1)
        assert rows[name]["layer"] == layer and rows[name]["rows"] == expected.numel()
        assert rows[name]["mean_row_mav"] == pytest.approx(expected.double().mean().item(), rel=1e-5)
    profile = document["experts"][0]["layer_profile"]
    for layer in range(6):  # every stored tensor of the layer, experts included
        own = [(lang[n] - base[n]).abs() for n in lang if fam.arch.layer_of(n) == layer]
        per_row = [d.mean(dim=-1).reshape(-1) if d.dim() > 1 else d.mean().reshape(1) for d in own]
        assert profile[layer] == pytest.approx(torch.cat(per_row).double().mean().item(), rel=1e-5)


def test_merge_state_dicts_places_fused_moe_layers(families):
    from mergekit.merge_methods.api import merge_state_dicts

    fam = families("qwen3_moe_fused")
    task, lang = load_tensors(fam.task), load_tensors(fam.lang)
    merged = merge_state_dicts(
        {"task": task, "lang": lang}, "layer_swap", parameters={"role": {"task": "task", "lang": "language"}, **ZONED}
    )
    assert set(merged) == set(task)
    for name, tensor in merged.items():
        letter = SOURCES[fam.arch.layer_of(name)] if fam.arch.layer_of(name) is not None else "B"
        if letter == "L":
            assert torch.equal(tensor, lang[name]), name
        elif letter == "T":
            assert torch.equal(tensor, task[name]), name
        else:
            assert torch.allclose(tensor, (task[name] + lang[name]) / 2, atol=1e-7), name


def test_sweep_assembles_moe_candidates_like_mergekit_yaml(families, tmp_path):
    """The sweep's in-memory assembly reads per-expert checkpoints through mergekit's
    converting loader and gives mergekit-yaml's values, in the fused layout transformers
    holds in memory."""
    import dataclasses

    from mergekit_layerswap.adapter.planner import prepare
    from mergekit_layerswap.core.layers import SwapZones
    from mergekit_layerswap.tools.assemble import LoadedExperts, assemble
    from mergekit_layerswap.tools.recipe_file import load_config

    fam = families("mixtral")
    recipe = swap_recipe(fam, **ZONED)
    out = merge(tmp_path, recipe)
    run = prepare(load_config(write_recipe(tmp_path / "again.yaml", recipe)))
    experts = LoadedExperts(run, dtype="float32")
    assembled = dict(assemble(run, experts, out_dtype="float32"))
    written = model_tensors(fam.arch, out)  # mergekit-yaml keeps the experts' per-expert layout
    assert set(assembled) == set(written)
    for name, tensor in written.items():
        assert torch.equal(assembled[name], tensor), name
    # a second candidate from the same loaded experts: every layer from the task expert
    zeros = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, zones=SwapZones(0, 0, 0, 0)))
    task = model_tensors(fam.arch, fam.task)
    for name, tensor in assemble(zeros, experts, out_dtype="float32"):
        if fam.arch.layer_of(name) is not None:
            assert torch.equal(tensor, task[name]), name
    assert os.path.isdir(out)


def test_suggest_recovers_planted_zones_of_a_moe_pair(tmp_path):
    """The language expert changed layers 0-1 and 5 (every expert matrix of them), the task
    expert 2-4: suggest proposes b=2, u=1 and its recipe merges."""
    import yaml
    from checkpoints import make_model

    from mergekit_layerswap.cli.main import main

    arch = ARCHS["qwen3_moe"]
    base = make_model(arch, str(tmp_path / "base"), seed=1)
    lang = make_model(
        arch, str(tmp_path / "lang"), seed=3, base_path=base, noise_by_layer={0: 0.03, 1: 0.03, 5: 0.03, None: 0.01}
    )
    task = make_model(arch, str(tmp_path / "task"), seed=2, base_path=base, noise_by_layer={2: 0.02, 3: 0.02, 4: 0.02})
    path = tmp_path / "suggested.yaml"
    args = ["suggest", "--base", base, "--task", task, "--language", lang, "--out", str(path), "--quiet", "--no-clip"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(path.read_text())
    zones = recipe["parameters"]
    assert (zones["bottom_layers"], zones["top_layers"]) == (2, 1)
    assert zones.get("bottom_transition", 0) == zones.get("top_transition", 0) == 0
    fam = Family(arch, base, task, lang)
    out = merge(tmp_path, recipe)
    check_swap(
        out,
        fam,
        "LLTTTL",
        non_layer="B" if zones.get("non_layer", "average") == "average" else "L",
        w_task=1 / row_mav_mean(task, base) if zones.get("weighting") == "magnitude" else 1.0,
        w_lang=1 / row_mav_mean(lang, base) if zones.get("weighting") == "magnitude" else 1.0,
        rtol=1e-4,
        model_layout=True,
    )


def test_experts_stored_differently_merge_and_other_expert_counts_are_refused(families, tmp_path):
    """One expert stored one 2-D tensor per expert, the other fused: the same merge. An
    expert with another number of experts is refused in one line before anything is written."""
    from checkpoints import variant
    from helpers import refused

    fam = families("mixtral")
    lang = fused_copy(fam.arch, fam.lang, str(tmp_path / "lang_fused"))
    mixed = Family(fam.arch, fam.base, fam.task, lang)
    (tmp_path / "mixed").mkdir()
    out = merge(tmp_path / "mixed", swap_recipe(mixed, **ZONED))
    check_swap(out, mixed, SOURCES, model_layout=True)

    fewer = variant(fam.arch, "mixtral-3", num_local_experts=3)
    other = make_model(fewer, str(tmp_path / "three"), seed=5)
    (tmp_path / "refused").mkdir()
    wrong = Family(fam.arch, fam.base, fam.task, fused_copy(fewer, other, str(tmp_path / "three_fused")))
    refused(tmp_path / "refused", swap_recipe(wrong, **ZONED), "tensor sizes differ", "experts")
