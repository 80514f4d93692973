# SPDX-License-Identifier: LGPL-3.0-only
"""The LoRA merge cache of a layer_swap merge trusts only entries it can verify
(adapter/lora_cache.py): an adapter retrained in place is merged again, a failed or
altered entry is rebuilt, and the output always equals a merge with a fresh cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
from checkpoints import ARCHS, load_tensors
from helpers import Family, run_yaml_inprocess, swap_recipe, write_recipe

ENTRY_RECORD = "mergekit_layerswap_lora_entry.json"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return Family.build(tmp_path_factory.mktemp("lora-family"), ARCHS["llama"])


def train_adapter(fam, path, seed: int) -> str:
    """A real peft LoRA adapter on q_proj (random, not zero, so it changes the weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(fam.base, dtype=torch.float32)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(str(path))
    return str(path)


def lora_recipe(fam, adapter, root) -> str:
    """The task expert is base+adapter (its q_proj in the task zone comes from the adapter)."""
    models = [
        {"model": f"{fam.base}+{adapter}", "parameters": {"role": "task"}},
        {"model": fam.lang, "parameters": {"role": "language"}},
    ]
    return write_recipe(os.path.join(root, "recipe.yaml"), swap_recipe(fam, models=models, bottom_layers=2))


def weights_digest(out) -> str:
    with open(os.path.join(out, "model.safetensors"), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def merge(recipe, out, cache) -> str:
    result = run_yaml_inprocess(recipe, out, "--lora-merge-cache", str(cache))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return str(out)


def entries(cache) -> list:
    return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


def test_an_adapter_retrained_in_place_is_merged_again(fam, tmp_path):
    adapter = train_adapter(fam, tmp_path / "lora", seed=5)
    recipe = lora_recipe(fam, adapter, tmp_path)
    cache = tmp_path / "cache"
    first = merge(recipe, tmp_path / "first", cache)
    assert len(entries(cache)) == 1
    shutil.rmtree(adapter)
    train_adapter(fam, tmp_path / "lora", seed=6)  # same directory, new weights
    second = merge(recipe, tmp_path / "second", cache)  # same cache, same process
    reference = merge(recipe, tmp_path / "reference", tmp_path / "fresh-cache")
    assert weights_digest(second) == weights_digest(reference)
    assert weights_digest(second) != weights_digest(first)
    q_proj = "model.layers.4.self_attn.q_proj.weight"  # a task-zone layer
    assert not load_tensors(first)[q_proj].equal(load_tensors(second)[q_proj])
    assert len(entries(cache)) == 2  # one entry per adapter content; none building
    for name in entries(cache):
        assert os.path.isfile(cache / name / ENTRY_RECORD)


def test_a_failed_adapter_merge_leaves_no_entry_and_a_fixed_adapter_merges(fam, tmp_path):
    good = train_adapter(fam, tmp_path / "good", seed=7)
    adapter = tmp_path / "lora"
    shutil.copytree(good, adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated adapter: peft fails to load it
    recipe = lora_recipe(fam, str(adapter), tmp_path)
    cache = tmp_path / "cache"
    result = run_yaml_inprocess(recipe, tmp_path / "out", "--lora-merge-cache", str(cache))
    assert result.exit_code != 0
    assert entries(cache) == []  # no empty or partial entry, no building directory
    assert not (tmp_path / "out").exists()
    shutil.rmtree(adapter)
    shutil.copytree(good, adapter)
    out = merge(recipe, tmp_path / "out", cache)
    reference = merge(lora_recipe(fam, good, tmp_path / "good"), tmp_path / "reference", tmp_path / "fresh-cache")
    assert weights_digest(out) == weights_digest(reference)


@pytest.mark.parametrize("damage", ["empty", "truncated", "no record", "foreign record", "extra file", "a file"])
def test_an_incomplete_or_altered_entry_is_rebuilt(fam, tmp_path, damage):
    adapter = train_adapter(fam, tmp_path / "lora", seed=8)
    recipe = lora_recipe(fam, adapter, tmp_path)
    cache = tmp_path / "cache"
    first = merge(recipe, tmp_path / "first", cache)
    (name,) = entries(cache)
    entry = cache / name
    listing = sorted(os.listdir(entry))
    shard = next(p for p in entry.iterdir() if p.name.endswith(".safetensors"))
    if damage == "empty":
        shutil.rmtree(entry)
        entry.mkdir()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "no record":
        (entry / ENTRY_RECORD).unlink()
    elif damage == "a file":
        shutil.rmtree(entry)
        entry.write_bytes(b"not a model")
    elif damage == "foreign record":
        (entry / ENTRY_RECORD).write_text('{"key": "0000", "files": {}}')
    else:
        (entry / "stray.bin").write_bytes(b"x")
    second = merge(recipe, tmp_path / "second", cache)
    assert weights_digest(second) == weights_digest(first)
    assert entries(cache) == [name]
    assert sorted(os.listdir(entry)) == listing  # rebuilt whole: record back, stray file gone


def test_an_entry_named_the_way_mergekit_names_it_is_ignored(fam, tmp_path):
    """mergekit's ``ModelReference.merged`` leaves an empty ``<base>_<crc>_<lora>_<crc>`` after
    a failure; a layer_swap merge never reads that name."""
    from mergekit.common import ModelReference

    adapter = train_adapter(fam, tmp_path / "lora", seed=9)
    recipe = lora_recipe(fam, adapter, tmp_path)
    cache = tmp_path / "cache"
    reference = ModelReference.model_validate(f"{fam.base}+{adapter}")
    stale = cache / (reference.model._unique_id() + "_" + reference.lora._unique_id())
    stale.mkdir(parents=True)
    out = merge(recipe, tmp_path / "out", cache)
    assert weights_digest(out) == weights_digest(merge(recipe, tmp_path / "ref", tmp_path / "fresh-cache"))
    assert os.listdir(stale) == []


def test_a_building_directory_of_a_dead_process_is_removed(fam, tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    adapter = train_adapter(fam, tmp_path / "lora", seed=10)
    cache = tmp_path / "cache"
    (cache / f".building-{dead.pid}").mkdir(parents=True)
    (cache / f".building-{dead.pid}" / "model.safetensors").write_bytes(b"half")
    merge(lora_recipe(fam, adapter, tmp_path), tmp_path / "out", cache)
    assert not any(name.startswith(".building-") for name in entries(cache))
    assert len(entries(cache)) == 1
