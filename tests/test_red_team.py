"""Issue 20's red team: what a fresh user tried across the package's commands and options.
Every case ends in one ``Error:`` line (or correct output), nothing half-written and every
input byte-identical; the helpers are the bad-input matrix's own (``test_bad_inputs.py``)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import run_yaml_inprocess
from safetensors.torch import load_file, save_file
from test_bad_inputs import RECIPE, _digest, check_refusal, make_world, write


# ------------------------------------------------------------ LoRA experts with broken adapters
@pytest.fixture(scope="module")
def adapter(families, tmp_path_factory):
    """A real peft LoRA adapter of the llama family's base (q_proj, v_proj, r=4)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_pretrained(families("llama").base, dtype=torch.float32)
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    path = str(tmp_path_factory.mktemp("adapter") / "adapter")
    lora.save_pretrained(path)
    return path


def _edit_config(**changes):
    def change(path):
        config_path = os.path.join(path, "adapter_config.json")
        with open(config_path) as handle:
            config = json.load(handle)
        config.update(changes)
        with open(config_path, "w") as handle:
            json.dump(config, handle)

    return change


def _edit_weights(edit):
    def change(path):
        weights = os.path.join(path, "adapter_model.safetensors")
        if edit is None:
            os.remove(weights)
            return
        with open(weights, "rb") as handle:
            data = handle.read()
        with open(weights, "wb") as handle:
            handle.write(edit(data))

    return change


def _for_a_wider_model(path):
    """An adapter trained on a model with hidden size 64, not this base's 32."""
    weights = os.path.join(path, "adapter_model.safetensors")
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n.endswith("q_proj.lora_A.weight"))
    tensors[name] = torch.zeros(4, 64)
    save_file(tensors, weights, metadata={"format": "pt"})


LORA_CASES = (
    ("adapter directory missing", lambda p: shutil.rmtree(p), ("LoRA adapter", "not a directory")),
    ("adapter weights truncated", _edit_weights(lambda b: b[:-9]), ("adapter_model.safetensors", "truncated")),
    ("adapter weights garbage", _edit_weights(lambda b: os.urandom(len(b))), ("adapter_model.safetensors",)),
    ("adapter weights empty", _edit_weights(lambda b: b""), ("adapter_model.safetensors", "empty")),
    ("adapter weights missing", _edit_weights(None), ("LoRA adapter", "no weight file")),
    ("adapter config missing", lambda p: os.remove(os.path.join(p, "adapter_config.json")), ("no adapter_config",)),
    (
        "adapter config not JSON",
        lambda p: open(os.path.join(p, "adapter_config.json"), "w").write("{"),
        ("adapter_config.json is damaged",),
    ),
    ("adapter rank differs from its config", _edit_config(r=8), ("has rank 4", "r=8")),
    ("adapter targets modules the model lacks", _edit_config(target_modules=["nope_proj"]), ("nope_proj",)),
    ("adapter of another model", _for_a_wider_model, ("does not fit the model", "[4, 64]", "[32, 32]")),
)


def _lora_world(families, tmp_path, adapter):
    world = make_world(families, tmp_path)
    copy = os.path.join(world.root, "models", "adapter")
    shutil.copytree(adapter, copy)
    world.text = RECIPE.replace("model: {lang}", "model: {base}+" + copy)
    return world, copy


@pytest.mark.parametrize("change,words", [c[1:] for c in LORA_CASES], ids=[c[0] for c in LORA_CASES])
def test_broken_lora_adapter_is_one_line(families, tmp_path, adapter, change, words):
    """peft answered each of these with a traceback, after mergekit had created an (empty,
    later trusted) LoRA merge cache entry."""
    world, copy = _lora_world(families, tmp_path, adapter)
    change(copy)
    write(world)
    before = _digest(world.root)
    out, cache = tmp_path / "out", tmp_path / "lora-cache"
    result = run_yaml_inprocess(world.recipe, out, "--lora-merge-cache", str(cache))
    check_refusal(result, out, before, world, words)
    assert not cache.exists() or not os.listdir(cache), "a refused adapter left a LoRA merge cache entry"


def test_the_unbroken_adapter_merges(families, tmp_path, adapter):
    world, _ = _lora_world(families, tmp_path, adapter)
    write(world)
    result = run_yaml_inprocess(world.recipe, tmp_path / "out", "--lora-merge-cache", str(tmp_path / "lora-cache"))
    assert result.exit_code == 0, result.output
    assert os.path.exists(tmp_path / "out" / "model.safetensors")
