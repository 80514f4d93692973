"""Fails loudly when the mergekit internals planning.py adapts move.

Exercises them, not only version strings: a real plan is built with mergekit's
MergePlanner and every planned tensor is checked for the inputs it reads.
"""

from importlib.metadata import version

import torch
from checkpoints import load_tensors
from helpers import swap_recipe


def test_the_pin_and_the_verified_versions_agree():
    """pyproject.toml pins exactly the mergekit versions planner.py was verified with."""
    import os
    import re

    from mergekit_layerswap.adapter.planner import VERIFIED_MERGEKIT_VERSIONS

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), encoding="utf-8") as handle:
        pins = re.findall(r'"mergekit==([^"]+)"', handle.read())
    assert pins == list(VERIFIED_MERGEKIT_VERSIONS)
    assert version("mergekit") in VERIFIED_MERGEKIT_VERSIONS


def test_an_unverified_mergekit_is_named_in_a_warning(caplog):
    from mergekit_layerswap.adapter.planner import _check_version

    with caplog.at_level("WARNING", logger="mergekit_layerswap.adapter.planner"):
        _check_version("0.1.5")
        assert not caplog.records
        _check_version("0.2.0")
    assert len(caplog.records) == 1 and "0.2.0" in caplog.records[0].getMessage()


def test_adapted_functions_are_in_place():
    import mergekit.card
    import mergekit.io.tasks
    import mergekit.merge
    import mergekit.plan

    for owner, name in [
        (mergekit.merge, "get_architecture_info"),
        (mergekit.merge, "_model_out_config"),
        (mergekit.merge, "_get_donor_model"),
        (mergekit.merge, "generate_card"),
        (mergekit.card, "is_hf"),
        (mergekit.plan.MergePlanner, "normalize_config"),
        (mergekit.plan.MergePlanner, "plan_module"),
        (mergekit.plan.MergePlanner, "plan_layer"),
        (mergekit.io.tasks.LoadTensor, "_load_converted_tensor"),
        (mergekit.plan.MergePlanner, "plan_tensor"),
        (mergekit.plan.MergePlanner, "plan_to_disk"),
    ]:
        assert getattr(getattr(owner, name), "__layerswap_original__", None) is not None, name


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
