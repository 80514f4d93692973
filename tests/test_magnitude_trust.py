# SPDX-License-Identifier: LGPL-3.0-only
"""The magnitude statistic cannot lie: a changed weight file is measured again, a bad
cache entry is recomputed, an unwritable cache only warns, a NaN or inf is refused; and
the base is read once for all experts."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil

import pytest
from helpers import merge, refused, swap_recipe
from safetensors.torch import load_file, save_file

ZONES = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
LAYER_TENSOR = "model.layers.3.mlp.up_proj.weight"


class Copy:
    """A writable copy of a family (base, task, lang), so its files can be changed."""

    def __init__(self, family, root):
        for role in ("base", "task", "lang"):
            path = os.path.join(str(root), role)
            shutil.copytree(getattr(family, role), path)
            setattr(self, role, path)


@pytest.fixture
def family(families, tmp_path):
    return Copy(families("llama"), tmp_path / "models")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("MERGEKIT_LAYERSWAP_CACHE", str(path))
    monkeypatch.delenv("MERGEKIT_LAYERSWAP_NO_CACHE", raising=False)
    return path


def recipe_of(family):
    return swap_recipe(family, base=True, weighting="magnitude", **ZONES)


def output_digest(out):
    return {
        os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
        for p in sorted(glob.glob(os.path.join(out, "*.safetensors")))
    }


def fresh(tmp_path, name):
    path = tmp_path / name
    path.mkdir()
    return path


def no_cache_merge(tmp_path, family, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("MERGEKIT_LAYERSWAP_NO_CACHE", "1")
        return merge(fresh(tmp_path, "nocache"), recipe_of(family))


def weight_file(model):
    (path,) = glob.glob(os.path.join(model, "*.safetensors"))
    return path


def rewrite(path, change):
    """Rewrite a safetensors file in place with ``change`` applied to its tensors."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_same_size_rewrite_with_the_old_mtime_is_measured_again(family, cache, tmp_path, monkeypatch):
    first = merge(fresh(tmp_path, "first"), recipe_of(family))
    path = weight_file(family.task)
    before = os.stat(path)

    def double_the_change(tensors):  # same names, shapes, dtypes: the same file size
        base = load_file(weight_file(family.base))
        for name, tensor in tensors.items():
            tensor.add_(tensor - base[name])

    rewrite(path, double_the_change)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    second = merge(fresh(tmp_path, "second"), recipe_of(family))
    expected = no_cache_merge(tmp_path, family, monkeypatch)
    assert output_digest(second) == output_digest(expected)
    assert output_digest(second) != output_digest(first)  # the rewrite matters


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), 0.0, "0.1", None])
def test_an_invalid_cached_value_is_recomputed(family, cache, tmp_path, monkeypatch, caplog, value):
    expected = merge(fresh(tmp_path, "first"), recipe_of(family))
    entries = glob.glob(str(cache / "magnitude-*.json"))
    assert len(entries) == 2  # one per expert
    for entry in entries:
        data = json.load(open(entry))
        data["mean_row_mav"] = value
        json.dump(data, open(entry, "w"))
    with caplog.at_level(logging.WARNING):
        second = merge(fresh(tmp_path, "second"), recipe_of(family))
    assert output_digest(second) == output_digest(expected)
    assert "recomputing" in caplog.text
    for entry in entries:  # and the entry is repaired
        assert json.load(open(entry))["mean_row_mav"] > 0


@pytest.mark.parametrize("content", [b"\x00garbage{", b"", b"[1, 2]", b'{"mean_row_mav": 0.1}'])
def test_a_garbage_cache_file_is_recomputed_with_a_warning(family, cache, tmp_path, caplog, content):
    expected = merge(fresh(tmp_path, "first"), recipe_of(family))
    for entry in glob.glob(str(cache / "magnitude-*.json")):
        open(entry, "wb").write(content)
    with caplog.at_level(logging.WARNING):
        second = merge(fresh(tmp_path, "second"), recipe_of(family))
    assert output_digest(second) == output_digest(expected)
    assert "magnitude cache entry" in caplog.text and "recomputing" in caplog.text


def test_an_unwritable_cache_only_warns(family, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MERGEKIT_LAYERSWAP_CACHE", str(blocker / "cache"))  # makedirs fails, even as root
    monkeypatch.delenv("MERGEKIT_LAYERSWAP_NO_CACHE", raising=False)
    with caplog.at_level(logging.WARNING):
        out = merge(fresh(tmp_path, "out"), recipe_of(family))
    assert "cannot be written" in caplog.text
    assert output_digest(out) == output_digest(no_cache_merge(tmp_path, family, monkeypatch))


@pytest.mark.parametrize(
    "role,value", [("task", float("nan")), ("lang", float("inf")), ("base", float("nan")), ("task", float("-inf"))]
)
def test_a_non_finite_weight_is_refused_naming_model_and_tensor(family, cache, tmp_path, role, value):
    def poison(tensors):
        tensors[LAYER_TENSOR][1, 2] = value

    rewrite(weight_file(getattr(family, role)), poison)
    recipe = recipe_of(family)
    model = getattr(family, role)
    message = refused(tmp_path, recipe, model, LAYER_TENSOR, "non-finite")
    assert ("base_model" in message) == (role == "base")
    assert not glob.glob(str(cache / "magnitude-*.json"))  # nothing cached either


def test_the_base_is_read_once_for_both_experts(family, cache, tmp_path, monkeypatch):
    """Count the tensors the cold magnitude pass loads from each model (through mergekit's
    own loader, which every read goes through)."""
    from mergekit.io.lazy_tensor_loader import LazyTensorLoader

    import mergekit_layerswap.adapter.magnitude as magnitude

    loads = {}
    original = LazyTensorLoader.get_tensor

    def counting(self, key, *args, **kwargs):
        loads.setdefault((self.index.base_path, key), 0)
        loads[(self.index.base_path, key)] += 1
        return original(self, key, *args, **kwargs)

    from mergekit.common import ModelReference

    monkeypatch.setattr(LazyTensorLoader, "get_tensor", counting)
    experts = [ModelReference.parse(family.task), ModelReference.parse(family.lang)]
    stats = magnitude.magnitudes(experts, ModelReference.parse(family.base))
    assert set(stats) == set(experts)
    stored = load_file(weight_file(family.base)).keys()
    for model in (family.base, family.task, family.lang):
        counts = {key: n for (path, key), n in loads.items() if os.path.samefile(path, model)}
        assert set(counts) == set(stored)
        assert set(counts.values()) == {1}, model
    # and each expert's statistic equals the one measured on its own
    monkeypatch.setenv("MERGEKIT_LAYERSWAP_NO_CACHE", "1")
    for expert in experts:
        alone = magnitude.compute_magnitude(expert, ModelReference.parse(family.base))
        assert alone == stats[expert]
