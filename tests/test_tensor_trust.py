# SPDX-License-Identifier: LGPL-3.0-only
"""Tensors the swap must not trust: non-finite values in averages, integer tensors,
and merges through mergekit's Python API, which runs the kernel without our planner.

Every expectation is computed here from the input files (the layer of a tensor from
the test's own ``Arch.layer_of``), never by the package.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from checkpoints import SPECIAL, load_tensors
from helpers import (
    Family,
    assert_one_line_error,
    run_yaml_inprocess,
    run_yaml_subprocess,
    swap_recipe,
    write_recipe,
)
from safetensors.torch import load_file, save_file

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------- helpers
def tree_digest(path) -> str:
    """sha256 over every file under ``path`` (names and bytes)."""
    digest = hashlib.sha256()
    for root, _dirs, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def edit_weights(model_dir, edit) -> None:
    """Rewrite a checkpoint's single safetensors file with ``edit(tensors)`` applied."""
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def copy_family(fam: Family, root) -> Family:
    """A private copy of a session family, safe to corrupt."""
    root = str(root)
    copies = {}
    for role in ("base", "task", "lang"):
        copies[role] = shutil.copytree(getattr(fam, role), os.path.join(root, role))
    return Family(arch=fam.arch, root=root, **copies)


def poke(name, index, value):
    def edit(tensors):
        tensors[name].view(-1)[index] = value

    return edit


# ---------------------------------------------------------------- non-finite values
# llama, 8 layers; bottom 2, top 1, transitions 1 + 1: sources L L B T T T B L
ZONES = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
SOURCES = "LLBTTTBL"

# (expert holding the bad value, tensor, value, extra recipe parameters): all are averaged
REFUSED = [
    ("lang", "model.embed_tokens.weight", NAN, {}),  # non-layer, averaged
    ("task", "model.layers.2.mlp.up_proj.weight", INF, {}),  # bottom transition layer
    ("lang", "model.layers.6.self_attn.q_proj.weight", -INF, {"transition_shape": "linear"}),
    ("task", "model.norm.weight", NAN, {"non_layer": "average"}),
    ("lang", "lm_head.weight", NAN, {"blend_method": "linear"}),  # another mergekit method blends
]


@pytest.mark.parametrize("bad_model,tensor,value,extra", REFUSED, ids=[c[1] + str(c[2]) for c in REFUSED])
def test_non_finite_value_in_an_average_is_refused_in_one_line(families, tmp_path, bad_model, tensor, value, extra):
    fam = copy_family(families("llama"), tmp_path / "models")
    edit_weights(getattr(fam, bad_model), poke(tensor, 5, value))
    before = tree_digest(fam.root)
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, **ZONES, **extra))
    out = tmp_path / "out"
    result = run_yaml_inprocess(recipe, out)
    message = assert_one_line_error(result, getattr(fam, bad_model), tensor, "non-finite")
    assert "Traceback" not in result.output
    assert tree_digest(fam.root) == before, "an input changed"
    assert not out.exists(), message


def test_role_soup_with_a_non_finite_value_is_refused(families, tmp_path):
    """Two task experts are averaged even in a task-only layer."""
    fam = copy_family(families("llama"), tmp_path / "models")
    second = shutil.copytree(fam.task, str(tmp_path / "models" / "task2"))
    edit_weights(second, poke("model.layers.4.mlp.down_proj.weight", 0, NAN))
    models = [
        {"model": fam.task, "parameters": {"role": "task"}},
        {"model": second, "parameters": {"role": "task"}},
        {"model": fam.lang, "parameters": {"role": "language"}},
    ]
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, models=models, **ZONES))
    result = run_yaml_inprocess(recipe, tmp_path / "out")
    assert_one_line_error(result, second, "model.layers.4.mlp.down_proj.weight", "non-finite")


def test_non_finite_value_in_a_copied_tensor_passes_through(families, tmp_path):
    """A tensor taken whole from one expert is copied as is (the rule averages nothing)."""
    fam = copy_family(families("llama"), tmp_path / "models")
    edit_weights(fam.lang, poke("model.layers.0.mlp.up_proj.weight", 7, NAN))
    edit_weights(fam.task, poke("model.layers.4.mlp.up_proj.weight", 7, INF))
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, **ZONES))
    result = run_yaml_inprocess(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out, lang, task = load_tensors(tmp_path / "out"), load_tensors(fam.lang), load_tensors(fam.task)
    assert (
        torch.equal(out["model.layers.0.mlp.up_proj.weight"], lang["model.layers.0.mlp.up_proj.weight"]) is False
    )  # NaN != NaN: compare bit patterns instead
    assert torch.equal(
        out["model.layers.0.mlp.up_proj.weight"].view(torch.int32),
        lang["model.layers.0.mlp.up_proj.weight"].view(torch.int32),
    )
    assert torch.equal(out["model.layers.4.mlp.up_proj.weight"], task["model.layers.4.mlp.up_proj.weight"])


def test_installed_mergekit_yaml_prints_the_non_finite_refusal_in_one_line(families, tmp_path):
    fam = copy_family(families("llama"), tmp_path / "models")
    edit_weights(fam.task, poke("model.embed_tokens.weight", 11, NAN))
    before = tree_digest(fam.root)
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, **ZONES))
    proc = run_yaml_subprocess(recipe, tmp_path / "out", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert fam.task in lines[0] and "model.embed_tokens.weight" in lines[0] and "non-finite" in lines[0]
    assert tree_digest(fam.root) == before
    out = tmp_path / "out"
    assert not out.exists()


# ---------------------------------------------------------------- integer tensors
# GPT-NeoX checkpoints as EleutherAI published Pythia store, in every decoder layer, the
# causal mask ``attention.bias`` as a boolean buffer (plus ``masked_bias`` and
# ``rotary_emb.inv_freq``); mergekit's gpt-neox definition lists all three as layer
# tensors. Today's transformers no longer saves them, so the generated checkpoints get
# them added the way those files hold them. int32 is the same case with another dtype.
NEOX = SPECIAL["gpt_neox"]
NEOX_LAYERS = NEOX.num_layers
NEOX_POSITIONS = NEOX.make_config().max_position_embeddings


def _mask(dtype):
    return torch.tril(torch.ones(NEOX_POSITIONS, NEOX_POSITIONS)).to(dtype).view(1, 1, NEOX_POSITIONS, NEOX_POSITIONS)


def _add_buffers(dtype):
    def edit(tensors):
        for layer in range(NEOX_LAYERS):
            prefix = f"gpt_neox.layers.{layer}.attention."
            tensors[prefix + "bias"] = _mask(dtype)
            tensors[prefix + "masked_bias"] = torch.tensor(-1e9)
            tensors[prefix + "rotary_emb.inv_freq"] = torch.tensor([1.0])

    return edit


@pytest.fixture(scope="module")
def neox_family(tmp_path_factory):
    return Family.build(tmp_path_factory.mktemp("neox"), NEOX)


def neox_copy(neox_family, root, dtype) -> Family:
    fam = copy_family(neox_family, root)
    for model in (fam.base, fam.task, fam.lang):
        edit_weights(model, _add_buffers(dtype))
    return fam


# bottom 2, top 1, bottom transition 1: sources L L B T T L
NEOX_ZONES = dict(bottom_layers=2, top_layers=1, bottom_transition=1)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32])
def test_integer_tensors_are_copied_not_averaged(neox_family, tmp_path, dtype):
    fam = neox_copy(neox_family, tmp_path / "models", dtype)
    recipe = swap_recipe(fam, **NEOX_ZONES)
    recipe["out_dtype"] = "bfloat16"  # neither dtype: float32 nor out_dtype may touch integers
    result = run_yaml_inprocess(write_recipe(tmp_path / "recipe.yaml", recipe), tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = load_tensors(tmp_path / "out")
    for layer in range(NEOX_LAYERS):  # the transition layer 2 included
        mask = out[f"gpt_neox.layers.{layer}.attention.bias"]
        assert mask.dtype == dtype and torch.equal(mask, _mask(dtype)), layer
    assert out["gpt_neox.layers.2.attention.dense.weight"].dtype == torch.bfloat16


def test_integer_tensor_that_differs_where_the_rule_blends_is_refused(neox_family, tmp_path):
    fam = neox_copy(neox_family, tmp_path / "models", torch.int32)
    edit_weights(fam.task, poke("gpt_neox.layers.2.attention.bias", 1, 7))  # layer 2: transition
    before = tree_digest(fam.root)
    out = tmp_path / "out"
    result = run_yaml_inprocess(write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, **NEOX_ZONES)), out)
    assert_one_line_error(result, "integer tensor gpt_neox.layers.2.attention.bias", "differs", "never averages")
    assert tree_digest(fam.root) == before
    assert not out.exists(), "refused before planning, so nothing may be written"


def test_integer_tensor_that_differs_outside_the_blend_is_taken_from_the_chosen_expert(neox_family, tmp_path):
    fam = neox_copy(neox_family, tmp_path / "models", torch.int32)
    edit_weights(fam.lang, poke("gpt_neox.layers.0.attention.bias", 1, 7))  # layer 0: language
    edit_weights(fam.task, poke("gpt_neox.layers.3.attention.bias", 2, 9))  # layer 3: task
    result = run_yaml_inprocess(
        write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, **NEOX_ZONES)), tmp_path / "out"
    )
    assert result.exit_code == 0, result.output
    out, lang, task = load_tensors(tmp_path / "out"), load_tensors(fam.lang), load_tensors(fam.task)
    assert torch.equal(out["gpt_neox.layers.0.attention.bias"], lang["gpt_neox.layers.0.attention.bias"])
    assert torch.equal(out["gpt_neox.layers.3.attention.bias"], task["gpt_neox.layers.3.attention.bias"])
    assert out["gpt_neox.layers.3.attention.bias"].dtype == torch.int32


# ---------------------------------------------------------------- mergekit's Python API
def api_expected(fam: Family, sources: str):
    """The swap computed here: L language, T task, B the 1:1 average; non-layer averaged."""
    task, lang = load_tensors(fam.task), load_tensors(fam.lang)
    expected = {}
    for name in task:
        layer = fam.arch.layer_of(name)
        kind = sources[layer] if layer is not None else "B"
        expected[name] = {"L": lang[name], "T": task[name]}.get(kind, (task[name] + lang[name]) / 2)
    return expected


def assert_matches(merged, expected):
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert torch.allclose(merged[name], tensor, rtol=1e-6, atol=1e-7), name


ROLES = {"task": "task", "lang": "language"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_merge_state_dicts_places_layers_from_mergekit_architectures(families, arch):
    from mergekit.merge_methods.api import merge_state_dicts

    fam = families(arch)
    n = fam.arch.num_layers
    sources = "LL" + "B" + "T" * (n - 5) + "B" + "L"
    merged = merge_state_dicts(
        {"task": load_tensors(fam.task), "lang": load_tensors(fam.lang)},
        "layer_swap",
        parameters={"role": ROLES, **ZONES},
    )
    assert_matches(merged, api_expected(fam, sources))


def test_merge_state_dicts_with_explicit_positions(families):
    from mergekit.merge_methods.api import merge_state_dicts
    from mergekit.merge_methods.base import PerGroupValues

    fam = families("llama")
    task, lang = load_tensors(fam.task), load_tensors(fam.lang)
    positions = [fam.arch.layer_of(name) for name in task]
    merged = merge_state_dicts(
        {"task": task, "lang": lang},
        "layer_swap",
        parameters={
            "role": ROLES,
            **ZONES,
            "num_layers": 8,
            "layer_index": PerGroupValues(["non_layer" if p is None else p for p in positions]),
        },
    )
    assert_matches(merged, api_expected(fam, SOURCES))


def test_merge_state_dicts_without_roles_takes_the_documented_order(families):
    """No roles: the inputs are base (when given), task expert, language expert, in order."""
    from mergekit.merge_methods.api import merge_state_dicts

    fam = families("llama")
    task, lang = load_tensors(fam.task), load_tensors(fam.lang)
    explicit = merge_state_dicts({"task": task, "lang": lang}, "layer_swap", parameters={"role": ROLES, **ZONES})
    ordered = merge_state_dicts([task, lang], "layer_swap", parameters=ZONES)
    assert_matches(ordered, api_expected(fam, SOURCES))
    swapped = merge_state_dicts([lang, task], "layer_swap", parameters=ZONES)  # order decides
    assert ordered.keys() == explicit.keys()
    for name in explicit:
        assert torch.equal(ordered[name], explicit[name]), name
    assert any(not torch.equal(swapped[name], explicit[name]) for name in explicit)


def test_merge_state_dicts_without_roles_needs_exactly_two_experts(families):
    from mergekit.merge_methods.api import merge_state_dicts

    from mergekit_layerswap.core.errors import RecipeError

    fam = families("llama")
    task, lang = load_tensors(fam.task), load_tensors(fam.lang)
    with pytest.raises(
        RecipeError,
        match=r"got 3 non-base inputs and no roles.*the base \(base=...\), the task expert and the language",
    ):
        merge_state_dicts([task, lang, lang], "layer_swap", parameters=ZONES)
    with pytest.raises(RecipeError, match="got 1 non-base inputs and no roles"):
        merge_state_dicts([task, lang], "layer_swap", base=0, parameters=ZONES)


@pytest.mark.parametrize(
    "names",
    [
        ["model.embed_tokens.weight", "model.layers.0.not_in_llama.weight"],
        ["model.embed_tokens.weight"],
        ["model.layers.7.mlp.up_proj.weight"],
    ],
)
def test_merge_state_dicts_refuses_tensors_no_architecture_places(names):
    """Names some definition knows but that are not a whole model: refused, never guessed."""
    from mergekit.merge_methods.api import merge_state_dicts

    from mergekit_layerswap.core.errors import RecipeError

    models = {key: {name: torch.ones(2) for name in names} for key in ROLES}
    with pytest.raises(RecipeError, match="mergekit-yaml"):
        merge_state_dicts(models, "layer_swap", parameters={"role": ROLES})


def test_merge_state_dicts_of_no_known_model_follows_the_non_layer_rule(caplog):
    """Tensors no definition names at all (mergekit's own method tests use ``w``) hold no
    decoder layer: each follows ``non_layer``, with a warning that says how to swap layers."""
    from mergekit.merge_methods.api import merge_state_dicts

    models = [
        {"w": torch.full((2, 3), 1.0), "b": torch.full((3,), 2.0)},
        {"w": torch.full((2, 3), 3.0), "b": torch.zeros(3)},
    ]
    with caplog.at_level("WARNING"):
        averaged = merge_state_dicts(models, "layer_swap")
    assert torch.equal(averaged["w"], torch.full((2, 3), 2.0)) and torch.equal(averaged["b"], torch.ones(3))
    assert "treated as a non-layer tensor" in caplog.text and "layer_index" in caplog.text
    language = merge_state_dicts(models, "layer_swap", parameters={"non_layer": "language"})
    assert torch.equal(language["w"], models[1]["w"]) and torch.equal(language["b"], models[1]["b"])


def test_merge_tensors_alone_cannot_know_the_layer_count():
    from mergekit.merge_methods.api import merge_tensors

    from mergekit_layerswap.core.errors import RecipeError

    with pytest.raises(RecipeError, match="cannot place tensor"):
        merge_tensors(
            [torch.ones(2), torch.zeros(2)],
            "layer_swap",
            parameters={"role": ["task", "language"]},
            name="model.layers.0.mlp.up_proj.weight",
        )


def test_kernel_without_the_planner_never_guesses_non_layer(tmp_path):
    """mergekit-pytorch's graph calls the kernel with no layer position: refused, not averaged."""
    from mergekit.options import MergeOptions
    from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig, plan_flat_merge

    from mergekit_layerswap.core.errors import RecipeError

    paths = []
    for i, role in enumerate(("task", "language")):
        path = tmp_path / f"{i}.safetensors"
        save_file({"model.layers.0.mlp.up_proj.weight": torch.full((2,), float(i))}, str(path))
        paths.append((str(path), role))
    config = RawPyTorchMergeConfig(
        merge_method="layer_swap", models=[{"model": p, "parameters": {"role": r}} for p, r in paths]
    )
    tasks = plan_flat_merge(config, str(tmp_path / "out"), False, False, MergeOptions())
    task = next(t.tensor_task for t in tasks if hasattr(t, "tensor_task"))
    with pytest.raises(RecipeError, match="does not know whether tensor model.layers.0.mlp.up_proj.weight"):
        task.execute({ref: torch.full((2,), float(i)) for i, ref in enumerate(task.model_order)})


def test_strided_weights_are_merged_without_mutation(families):
    """mergekit's test_state_dict_methods_accept_strided_weights_without_mutation, for layer_swap
    (which needs roles, so mergekit's own parametrisation cannot pass them)."""
    from mergekit.merge_methods.api import merge_state_dicts

    fam = families("llama")
    contiguous = {"task": load_tensors(fam.task), "lang": load_tensors(fam.lang)}
    strided = {
        key: {name: t.T.contiguous().T if t.dim() == 2 else t[::1] for name, t in sd.items()}
        for key, sd in contiguous.items()
    }
    assert not any(
        t.is_contiguous()
        for sd in strided.values()
        for t in sd.values()
        if t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1
    )
    copies = {key: {name: t.clone() for name, t in sd.items()} for key, sd in strided.items()}
    parameters = {"role": ROLES, "weight": {"task": 1.0, "lang": 1.0}, **ZONES}
    expected = merge_state_dicts(contiguous, "layer_swap", parameters=parameters)
    actual = merge_state_dicts(strided, "layer_swap", parameters=parameters)
    for name in expected:
        assert actual[name].isfinite().all()
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)
    for key in strided:
        for name, tensor in strided[key].items():
            torch.testing.assert_close(tensor, copies[key][name], rtol=0, atol=0)


def test_api_refuses_a_non_finite_average_naming_input_and_tensor(families):
    from mergekit.merge_methods.api import merge_state_dicts

    from mergekit_layerswap.core.errors import RecipeError

    fam = families("llama")
    task, lang = load_tensors(fam.task), load_tensors(fam.lang)
    lang["model.layers.2.self_attn.k_proj.weight"][0, 0] = NAN  # a transition layer
    with pytest.raises(RecipeError, match="model lang has a non-finite value .* model.layers.2.self_attn.k_proj"):
        merge_state_dicts({"task": task, "lang": lang}, "layer_swap", parameters={"role": ROLES, **ZONES})


def test_kernel_copies_integers_and_refuses_blending_unequal_ones():
    from mergekit.merge_methods.api import merge_tensors

    from mergekit_layerswap.core.errors import RecipeError

    task, lang = torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1, 2, 4], dtype=torch.int32)
    common = {
        "role": ["task", "language"],
        "num_layers": 4,
        "bottom_layers": 1,
        "top_layers": 1,
        "bottom_transition": 1,
    }  # sources L B T L
    picked = merge_tensors([task, lang], "layer_swap", parameters={**common, "layer_index": 0}, name="x")
    assert picked.dtype == torch.int32 and torch.equal(picked, lang)
    with pytest.raises(RecipeError, match="integer tensor x differs"):
        merge_tensors([task, lang], "layer_swap", parameters={**common, "layer_index": 1}, name="x")
    same = merge_tensors([task, task.clone()], "layer_swap", parameters={**common, "layer_index": 1}, name="x")
    assert same.dtype == torch.int32 and torch.equal(same, task)


# ---------------------------------------------------------------- suggest / analyze
def test_suggest_names_the_non_finite_tensor(families, tmp_path):
    from click.testing import CliRunner

    from mergekit_layerswap.cli.main import main

    fam = copy_family(families("llama"), tmp_path / "models")
    edit_weights(fam.task, poke("model.layers.5.mlp.gate_proj.weight", 3, NAN))
    result = CliRunner().invoke(
        main, ["suggest", "--base", fam.base, "--task", fam.task, "--language", fam.lang, "--quiet"]
    )
    message = assert_one_line_error(result, f"expert {fam.task}", "model.layers.5.mlp.gate_proj.weight", "non-finite")
    assert "do not differ" not in message
