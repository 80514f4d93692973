# SPDX-License-Identifier: LGPL-3.0-only
"""Golden outputs: a digest of every file a handful of representative merges write.

Each case below is a recipe built with the suite's own helpers and merged in-process
with mergekit-yaml's click command; every file of the output directory (weights,
shard index, config.json, tokenizer files, generation config, chat template, the
model card README.md and mergekit_config.yml) is digested and compared with
``tests/golden_outputs.json``. A refactor that is meant to change nothing must keep
every digest.

The inputs are the seeded checkpoints and LoRA adapter of ``checkpoints.py``, written
by torch and safetensors from seeded generators, so every input byte is fixed by the
seeds and not by any library's weight initialisation. The digests say what the merge
wrote, not how a library happened to lay it out:

* a ``.safetensors`` file: each tensor's name, dtype, shape and raw bytes, in name
  order, and the header's metadata (not the header's own layout);
* a ``.json``, ``.yml`` or ``.yaml`` file: the parsed document without its version
  fields (``transformers_version``, ``version``, ...), written back canonically;
* anything else (README.md, the chat template): its bytes.

The only run-dependent bytes are the temporary paths that README.md (the experts, the
donor, the recipe) and mergekit_config.yml (the recipe) name: before digesting, each
temporary root is replaced by a fixed token (``<llama>``, ``<extras>``, ``<tmp>``,
...). Any other output file that mentions a temporary path fails the test outright.

To rewrite the JSON from the current code::

    UPDATE_GOLDEN=1 python -m pytest tests/test_golden_outputs.py

Update it only when an issue says that outputs may change (a deliberate change of
the algorithm or the model card, say), and name in the commit the cases that changed
and why. A refactor must never need it. Running a subset with ``-k`` under
``UPDATE_GOLDEN=1`` rewrites only the cases that ran.

The float results also depend on the arithmetic of torch (and of mergekit, pinned):
the JSON records the versions it was made with (``ENVIRONMENT``); where one differs the
cases are skipped with a message saying so. Under ``CI=true`` any skipped case of this
module is a failure (``conftest.py``): CI installs the pinned versions of
``constraints.txt``, and there the net must run. The
digests also pin the float results of the CPU kernels they were made on: another
instruction set may legitimately round a blend differently.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import yaml
from checkpoints import make_lora, make_model
from helpers import run_yaml_inprocess, swap_recipe, write_recipe

GOLDEN = os.path.join(os.path.dirname(__file__), "golden_outputs.json")
UPDATE = os.environ.get("UPDATE_GOLDEN", "").lower() in ("1", "true", "yes")
NORMALISED = ("README.md", "mergekit_config.yml")  # the files that name input paths
# the record of the files a merge wrote holds digests of README.md, which names input paths;
# tests/test_output_ownership.py checks it
UNPINNED = ("mergekit_layerswap_files.json",)
# distributions whose arithmetic the tensor bytes depend on
ENVIRONMENT = ("mergekit", "torch")

ZONED = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)


class Inputs:
    """The session's families plus the extra experts the cases need, built once."""

    def __init__(self, families, root):
        self._families = families
        self._roots = {str(root): "<extras>"}
        self.root = str(root)
        soup = families("qwen2")
        self.task2 = make_model(soup.arch, os.path.join(self.root, "task2"), seed=21, base_path=soup.base, noise=0.03)
        self.lang2 = make_model(soup.arch, os.path.join(self.root, "lang2"), seed=22, base_path=soup.base, noise=0.04)
        self.adapter = self._lora(families("llama"))

    def _lora(self, fam) -> str:
        return make_lora(fam.base, os.path.join(self.root, "adapter"), seed=5, rank=4, alpha=8)

    def families(self, name):
        fam = self._families(name)
        self._roots[fam.root] = f"<{name}>"
        return fam

    def tokens(self) -> dict:
        """Every temporary input root used so far -> a fixed token."""
        return dict(self._roots)


def _arch_case(arch, **zones):
    return lambda inp, tmp: (swap_recipe(inp.families(arch), **zones), [])


def _paper_defaults(inp, tmp):
    return swap_recipe(inp.families("llama")), []  # b=5, u=2 on 8 layers


def _magnitude(inp, tmp):
    return swap_recipe(inp.families("llama"), base=True, weighting="magnitude", **ZONED), []


def _task_soup(inp, tmp):
    fam = inp.families("qwen2")
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": inp.task2, "parameters": {"role": "task", "weight": 2.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 1.0}},
    ]
    return swap_recipe(fam, models=models, bottom_layers=2, top_layers=1, bottom_transition=1), []


def _language_soup(inp, tmp):
    fam = inp.families("qwen2")
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 1.0}},
        {"model": inp.lang2, "parameters": {"role": "language", "weight": 3.0}},
    ]
    return swap_recipe(fam, models=models, **ZONED), []


def _linear_shape(inp, tmp):
    fam = inp.families("qwen2")
    return swap_recipe(
        fam, bottom_layers=1, top_layers=0, bottom_transition=2, top_transition=2, transition_shape="linear"
    ), []


def _task_arithmetic(inp, tmp):
    fam = inp.families("llama")
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 3.0}},
    ]
    return swap_recipe(fam, models=models, base=True, blend_method="task_arithmetic", **ZONED), []


def _linear_blend(inp, tmp):
    fam = inp.families("llama")
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 3.0}},
    ]
    return swap_recipe(fam, models=models, blend_method="linear", blend_normalize=True, **ZONED), []


def _non_layer_language(inp, tmp):
    return swap_recipe(inp.families("qwen2"), non_layer="language", **ZONED), []


def _bfloat16(inp, tmp):
    recipe = swap_recipe(inp.families("mistral"), **ZONED)
    recipe["dtype"] = "bfloat16"
    return recipe, []


def _lora_language_expert(inp, tmp):
    fam = inp.families("llama")
    models = [
        {"model": fam.task, "parameters": {"role": "task"}},
        {"model": f"{fam.base}+{inp.adapter}", "parameters": {"role": "language"}},
    ]
    recipe = swap_recipe(fam, models=models, bottom_layers=2, top_layers=1, top_transition=1)
    return recipe, ["--lora-merge-cache", os.path.join(tmp, "lora-cache")]


def _sharded_output(inp, tmp):
    return swap_recipe(inp.families("llama"), **ZONED), ["--out-shard-size", "20K"]


CASES = {
    "llama_zoned": _arch_case("llama", **ZONED),
    "qwen2_zoned": _arch_case("qwen2", **ZONED),
    "mistral_bottom_transition": _arch_case("mistral", bottom_layers=2, top_layers=1, bottom_transition=1),
    "gemma2_zoned": _arch_case("gemma2", **ZONED),
    "gpt2_no_transition": _arch_case("gpt2", bottom_layers=2, top_layers=1),
    "phi3_top_transition": _arch_case("phi3", bottom_layers=2, top_layers=1, top_transition=1),
    "llama_paper_defaults": _paper_defaults,
    "magnitude_weighting": _magnitude,
    "task_soup": _task_soup,
    "language_soup": _language_soup,
    "linear_transition_shape": _linear_shape,
    "blend_task_arithmetic": _task_arithmetic,
    "blend_linear": _linear_blend,
    "non_layer_language": _non_layer_language,
    "bfloat16": _bfloat16,
    "lora_language_expert": _lora_language_expert,
    "sharded_output": _sharded_output,
}


def environment() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ENVIRONMENT}


def _load_golden() -> dict:
    if not os.path.exists(GOLDEN):
        return {"environment": {}, "cases": {}}
    with open(GOLDEN, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def inputs(families, tmp_path_factory):
    return Inputs(families, tmp_path_factory.mktemp("golden-extras"))


@pytest.fixture(scope="module")
def recorded():
    """Digests computed in this run; under UPDATE_GOLDEN=1, written to the JSON at the end."""
    found: dict = {}
    yield found
    if UPDATE and found:
        golden, env = _load_golden(), environment()
        # cases that did not run are kept only when they were made in this environment
        cases = golden["cases"] if golden["environment"] == env else {}
        cases = {name: digests for name, digests in cases.items() if name in CASES}
        cases.update(found)
        with open(GOLDEN, "w", encoding="utf-8") as handle:
            json.dump({"environment": env, "cases": cases}, handle, indent=2, sort_keys=True)
            handle.write("\n")


def _without_versions(document):
    """A parsed JSON/YAML document without the fields that only name a library version."""
    if isinstance(document, dict):
        return {
            key: _without_versions(value)
            for key, value in document.items()
            if not (key == "version" or str(key).endswith("_version"))
        }
    if isinstance(document, list):
        return [_without_versions(value) for value in document]
    return document


def _canonical(document) -> bytes:
    return json.dumps(_without_versions(document), sort_keys=True, separators=(",", ":")).encode()


def _tensor_contents(data: bytes) -> bytes:
    """A safetensors file as what it holds: metadata, then name, dtype, shape and bytes of
    each tensor in name order (independent of how the header is laid out)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = data[8 + length :]
    parts = [_canonical(header.pop("__metadata__", {}))]
    for name in sorted(header):
        entry = header[name]
        begin, end = entry["data_offsets"]
        parts += [name.encode(), entry["dtype"].encode(), repr(entry["shape"]).encode(), body[begin:end]]
    return b"\0".join(parts)


def file_contents(name: str, data: bytes) -> bytes:
    """The bytes a digest is taken of: see the module docstring."""
    if name.endswith(".safetensors"):
        return _tensor_contents(data)
    if name.endswith(".json"):
        return _canonical(json.loads(data))
    if name.endswith((".yml", ".yaml")):
        return _canonical(yaml.safe_load(data))
    return data


def output_digests(out_dir: str, tokens: dict, basetemp: str) -> dict:
    """Relative path -> sha256 of what every file under ``out_dir`` holds, temporary roots
    tokenised.

    Every root in ``tokens`` lies under ``basetemp``; a file that still names
    ``basetemp`` after tokenising names a path that would make its bytes vary."""
    replacements = sorted(tokens.items(), key=lambda item: len(item[0]), reverse=True)
    digests = {}
    for folder, _dirs, files in os.walk(out_dir):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, out_dir).replace(os.sep, "/")
            if rel in UNPINNED:
                continue
            with open(path, "rb") as handle:
                data = handle.read()
            if rel in NORMALISED:
                for root, token in replacements:
                    data = data.replace(root.encode(), token.encode())
            assert basetemp.encode() not in data, f"{rel} names a temporary path under {basetemp}"
            digests[rel] = hashlib.sha256(file_contents(rel, data)).hexdigest()
    return dict(sorted(digests.items()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_bytes_are_unchanged(case, inputs, recorded, tmp_path, tmp_path_factory):
    golden, env = _load_golden(), environment()
    if not UPDATE and golden["environment"] != env:
        differ = {
            name: f"{golden['environment'].get(name)} -> {env[name]}"
            for name in env
            if golden["environment"].get(name) != env[name]
        }
        pytest.skip(
            f"golden digests were made with other versions ({differ}); they are compared "
            f"only under the versions that made them (constraints.txt pins them)"
        )
    recipe, options = CASES[case](inputs, str(tmp_path))
    out = tmp_path / "out"
    result = run_yaml_inprocess(write_recipe(tmp_path / "recipe.yaml", recipe), out, *options)
    assert result.exit_code == 0, result.output + repr(result.exception)
    digests = output_digests(str(out), {**inputs.tokens(), str(tmp_path): "<tmp>"}, str(tmp_path_factory.getbasetemp()))
    recorded[case] = digests
    if UPDATE:
        return
    assert case in golden["cases"], f"no golden digests for {case}; see this module's docstring"
    expected = golden["cases"][case]
    changed = sorted(name for name in set(expected) | set(digests) if expected.get(name) != digests.get(name))
    assert not changed, f"{case}: output files changed: {changed}"
