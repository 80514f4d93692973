# SPDX-License-Identifier: LGPL-3.0-only
"""Fails loudly when the mergekit internals adapter/adaptation.py adapts move.

Exercises them, not only version strings: a real plan is built with mergekit's
MergePlanner and every planned tensor is checked for the inputs it reads.
"""

import os
from importlib.metadata import version

import torch
from checkpoints import load_tensors
from helpers import merge, swap_recipe
from mergekit.common import ModelReference


def test_the_pin_and_the_verified_versions_agree():
    """pyproject.toml pins exactly the mergekit versions the adaptation table was verified with."""
    import os
    import re

    from mergekit_layerswap.adapter.adaptation import VERIFIED_MERGEKIT_VERSIONS

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), encoding="utf-8") as handle:
        pins = re.findall(r'"mergekit==([^"]+)"', handle.read())
    assert pins == list(VERIFIED_MERGEKIT_VERSIONS)
    assert version("mergekit") in VERIFIED_MERGEKIT_VERSIONS


def test_an_unverified_mergekit_is_named_in_a_warning(caplog):
    from mergekit_layerswap.adapter.adaptation import check_version

    with caplog.at_level("WARNING", logger="mergekit_layerswap.adapter.adaptation"):
        check_version("0.1.5")
        assert not caplog.records
        check_version("0.2.0")
    assert len(caplog.records) == 1 and "0.2.0" in caplog.records[0].getMessage()


def test_every_row_of_the_adaptation_table_is_in_place():
    from mergekit_layerswap.adapter.adaptation import PATCHES, in_place

    assert {p.part for p in PATCHES} >= {"planner", "executor", "writer", "loader", "card", "multimerge", "click"}
    assert not [f"{p.module}.{p.owner}.{p.attribute}" for p in PATCHES if not in_place(p)]


def test_a_moved_attribute_is_named_in_one_error():
    import types

    import pytest

    from mergekit_layerswap.adapter.adaptation import PATCHES, check_present

    rows = [p for p in PATCHES if p.module == "mergekit.plan"]
    stand_in = types.SimpleNamespace(__name__="mergekit.plan", MergePlanner=type("MergePlanner", (), {}))
    with pytest.raises(RuntimeError, match="mergekit.plan.MergePlanner.normalize_config, .*plan_to_disk"):
        check_present(stand_in, rows)


def test_no_mergekit_function_is_replaced_outside_the_table():
    """Only adaptation.on_load wraps mergekit attributes: every patch is a row."""
    import ast
    import os

    package = os.path.join(os.path.dirname(__file__), "..", "mergekit_layerswap")
    offenders = []
    for folder, _dirs, files in os.walk(package):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            for node in ast.walk(tree):
                called = isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                if called == "wrap" and not path.endswith(os.path.join("adapter", "adaptation.py")):
                    offenders.append(f"{os.path.relpath(path, package)}:{node.lineno} {called}")
                if isinstance(node, ast.Assign) and any(getattr(t, "attr", None) == "callback" for t in node.targets):
                    offenders.append(f"{os.path.relpath(path, package)}:{node.lineno} .callback =")
    assert offenders == [], offenders


def _plan(recipe, out_path):
    import mergekit.merge as merge
    from mergekit.config import MergeConfiguration
    from mergekit.graph import Executor
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(quiet=True)
    arch_info = merge.get_architecture_info(config, options)
    out_config = merge._model_out_config(config, arch_info)
    # (mergekit 0.1.5's plan_in_memory cannot build its ReturnTensor tasks for any method)
    targets = MergePlanner(config, arch_info, options=options, out_model_config=out_config).plan_to_disk(out_path)
    return [t for t in targets if hasattr(t, "tensor_name")], Executor(targets)


def test_planner_reads_only_the_experts_each_tensor_needs(families, tmp_path):
    fam = families("llama")  # 8 layers, b=2,u=1,t_b=1,t_u=1
    sources = "LLBTTTBL"
    targets, executor = _plan(
        swap_recipe(
            fam,
            base=True,
            weighting="magnitude",
            bottom_layers=2,
            top_layers=1,
            bottom_transition=1,
            top_transition=1,
            non_layer="language",
        ),
        str(tmp_path / "out"),
    )
    wanted = {"L": {fam.lang}, "T": {fam.task}, "B": {fam.task, fam.lang}}
    seen = set()
    for target in targets:
        name = target.tensor_name
        layer = fam.arch.layer_of(name)
        task = target.tensor_task
        read = {str(model) for model in task.gather_tensors.weight_info.keys()}
        kind = sources[layer] if layer is not None else "L"
        assert read == wanted[kind], (name, read)
        assert (
            task.parameters["layer_index"] == (layer if layer is not None else "non_layer")
            and task.parameters["num_layers"] == 8
        )
        seen.add(name)
    assert seen == set(load_tensors(fam.lang))
    executor.execute()
    merged, lang = load_tensors(str(tmp_path / "out")), load_tensors(fam.lang)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], lang["model.layers.0.mlp.up_proj.weight"])


def test_the_gradient_position_is_the_one_mergekits_planner_gives(families, tmp_path, monkeypatch):
    """tools/assemble.py resolves gradient weights at mergekit_parts.gradient_t; a real
    plan must hand every tensor the same t."""
    import mergekit.plan

    from mergekit_layerswap.adapter.mergekit_parts import gradient_t

    fam = families("qwen2")  # 6 layers
    seen = {}
    planned = mergekit.plan.MergePlanner.plan_tensor

    def recording(self, weight, weights_in, models, cfg_reader):
        seen[weight.name] = (self._layer_swap_layer, cfg_reader.t)
        return planned(self, weight, weights_in, models, cfg_reader)

    monkeypatch.setattr(mergekit.plan.MergePlanner, "plan_tensor", recording)
    _plan(swap_recipe(fam, bottom_layers=1, top_layers=1), str(tmp_path / "out"))
    assert len(seen) > 6 * 9 and {layer for layer, _ in seen.values()} == {None, 0, 1, 2, 3, 4, 5}
    expected = {name: gradient_t(layer, 6) for name, (layer, _) in seen.items()}
    assert {name: t for name, (_, t) in seen.items()} == expected


def test_the_executor_loop_runs_mergekits_schedule_with_the_same_results(families, tmp_path):
    """A layer_swap merge runs the schedule with planner._execute (mergekit's loop with
    O(1) bookkeeping per step): the same targets in the same order, the same files."""
    from mergekit_layerswap.adapter import planner

    fam = families("qwen3_moe")
    recipe = swap_recipe(fam, bottom_layers=1, top_layers=1, bottom_transition=1, top_transition=1)
    mergekits_targets, mergekits = _plan(recipe, str(tmp_path / "mergekit"))
    ours_targets, ours = _plan(recipe, str(tmp_path / "ours"))
    original = type(mergekits)._run.__layerswap_original__
    theirs = [handle.task() for handle, _ in original(mergekits, quiet=True)]
    steps, handles = [], []
    for step, handle, _value in planner._execute(ours, True, None):
        steps.append(step)
        handles.append(handle.task())
    assert [getattr(t, "tensor_name", type(t).__name__) for t in handles] == [
        getattr(t, "tensor_name", type(t).__name__) for t in theirs
    ]
    assert len(handles) > 50 and steps == sorted(steps)
    written, expected = load_tensors(str(tmp_path / "ours")), load_tensors(str(tmp_path / "mergekit"))
    assert set(written) == set(expected) and all(torch.equal(written[n], expected[n]) for n in expected)


def test_the_loaders_open_shard_lists_its_names_once(families, tmp_path):
    """During a layer_swap merge mergekit's loader asks the open shard for its names at
    every read: the shard answers from one frozen set, with the shard's own tensors."""
    from mergekit.io.tasks import LoaderCache
    from safetensors import safe_open

    from mergekit_layerswap.adapter import planner

    fam = families("llama")
    merge(tmp_path, swap_recipe(fam))
    loader = LoaderCache().get(ModelReference.parse(fam.lang))
    shard = loader.current_shard
    assert isinstance(shard, planner._ShardKeys)
    path = os.path.join(loader.index.base_path, next(iter(set(loader.index.tensor_paths.values()))))
    with safe_open(path, framework="pt") as direct:
        assert shard.keys() == frozenset(direct.keys())
        name = next(iter(direct.keys()))
        assert torch.equal(loader.get_tensor(name), direct.get_tensor(name))
