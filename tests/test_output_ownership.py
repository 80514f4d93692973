# SPDX-License-Identifier: LGPL-3.0-only
"""A merge replaces only what an earlier merge wrote (adapter/ownership.py), on every path
that writes an output directory; device options torch cannot honour are refused first
(adapter/devices.py).

Each situation is built on disk (a real fine-tune, a real earlier layer_swap merge, a
real earlier ``linear`` merge of mergekit, a user's files with merge-like names) and the
bytes of every file are compared afterwards, not only the exit status.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import yaml
from checkpoints import ARCHS
from click.testing import CliRunner
from helpers import Family, assert_one_line_error, run_yaml_inprocess, swap_recipe, write_recipe

REPLACE_ENV = "MERGEKIT_LAYERSWAP_REPLACE_OUTPUT"
RECORD = "mergekit_layerswap_files.json"


def snapshot(*roots) -> dict:
    """path -> sha256 of every file under ``roots``."""
    out = {}
    for root in map(str, roots):
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    out[path] = hashlib.sha256(handle.read()).hexdigest()
    assert out, roots
    return out


def relative(directory) -> dict:
    return {os.path.relpath(p, directory): h for p, h in snapshot(directory).items()}


def without_card_and_record(directory) -> dict:
    """A merge's files except the two that name its directory (the card, and the record,
    which holds the card's digest)."""
    return {n: h for n, h in relative(directory).items() if n not in ("README.md", RECORD)}


def siblings(parent) -> list:
    return sorted(os.listdir(parent))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return Family.build(tmp_path_factory.mktemp("ownership-family"), ARCHS["llama"])


@pytest.fixture(scope="module")
def recipe(fam, tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("recipe") / "swap.yaml", swap_recipe(fam, bottom_layers=2))


@pytest.fixture(scope="module")
def fresh(recipe, tmp_path_factory):
    """What a merge of ``recipe`` into a new directory writes."""
    out = tmp_path_factory.mktemp("fresh") / "out"
    result = run_yaml_inprocess(recipe, out)
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture(scope="module")
def linear_merge(fam, tmp_path_factory):
    """An earlier merge by mergekit's own ``linear`` method (no record of this package)."""
    root = tmp_path_factory.mktemp("linear")
    path = write_recipe(
        root / "linear.yaml",
        {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (fam.task, fam.lang)],
            "dtype": "float32",
        },
    )
    out = {}
    for kind, options in (("single", ()), ("sharded", ("--out-shard-size", "50K"))):
        result = run_yaml_inprocess(path, root / kind, *options)
        assert result.exit_code == 0, result.output
        out[kind] = str(root / kind)
    assert RECORD not in os.listdir(out["single"]) and "mergekit_config.yml" in os.listdir(out["single"])
    assert "model.safetensors.index.json" in os.listdir(out["sharded"])
    return out


def finetune_checkpoint(fam, where) -> str:
    """A fine-tune that is not a merge: config, weights, tokenizer and generation config,
    every name of which a merge also writes, and no mergekit_config.yml."""
    shutil.copytree(fam.task, where)
    with open(os.path.join(where, "generation_config.json"), "w") as handle:
        json.dump({"do_sample": False, "note": "my fine-tune"}, handle)
    names = set(os.listdir(where))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "mergekit_config.yml" not in names
    return str(where)


def add_user_files(directory) -> None:
    """Files no merge wrote whose names match merge-like patterns (model*, tokenizer*)."""
    with open(os.path.join(directory, "model-finetuned-3days.safetensors"), "wb") as handle:
        handle.write(b"three days of my GPU time")
    with open(os.path.join(directory, "tokenizer_training_corpus.txt"), "w") as handle:
        handle.write("my corpus\n")


# ------------------------------------------------------------ mergekit-yaml
def test_an_unrelated_finetune_as_output_is_refused_untouched(fam, recipe, tmp_path):
    target = finetune_checkpoint(fam, tmp_path / "my_finetune")
    before = snapshot(target, fam.root)
    message = assert_one_line_error(
        run_yaml_inprocess(recipe, target),
        f"output directory {target} holds files a merge does not write",
        "config.json",
        "model.safetensors",
        "not the output of a merge",
        "would lose them",
        f"{REPLACE_ENV}=1",
    )
    assert message.count(", ") >= 4 and "and 1 more" in message  # five named, the rest counted
    assert snapshot(target, fam.root) == before
    assert siblings(tmp_path) == ["my_finetune"]


@pytest.mark.parametrize(
    "earlier", ["layer_swap", "linear single", "linear sharded"], ids=["layer_swap", "linear", "linear-sharded"]
)
def test_user_files_with_merge_like_names_in_an_earlier_merge_are_refused(
    fresh, linear_merge, recipe, tmp_path, earlier
):
    """A re-merge would delete them (mergekit's own linear leaves them; this package refuses)."""
    source = fresh if earlier == "layer_swap" else linear_merge[earlier.split()[1]]
    target = str(tmp_path / "out")
    shutil.copytree(source, target)
    add_user_files(target)
    before = snapshot(target)
    kind = "an earlier layer_swap merge" if earlier == "layer_swap" else "an earlier mergekit merge"
    assert_one_line_error(
        run_yaml_inprocess(recipe, target),
        "holds files a merge does not write (model-finetuned-3days.safetensors, tokenizer_training_corpus.txt)",
        f"{kind}, which did not write them",
    )
    assert snapshot(target) == before


def test_a_merged_file_changed_since_is_refused(fresh, recipe, tmp_path):
    """Someone edited the merge's config.json (or saved a fine-tune over its weights) in place."""
    target = str(tmp_path / "out")
    shutil.copytree(fresh, target)
    with open(os.path.join(target, "config.json"), "a") as handle:
        handle.write("\n")
    before = snapshot(target)
    assert_one_line_error(
        run_yaml_inprocess(recipe, target), "config.json (changed since the merge wrote it)", f"{REPLACE_ENV}=1"
    )
    assert snapshot(target) == before


def test_the_record_names_exactly_the_merged_files(fresh):
    from mergekit_layerswap.adapter.ownership import fingerprint

    with open(os.path.join(fresh, RECORD)) as handle:
        record = json.load(handle)
    assert record["written_by"] == "mergekit-layerswap"
    assert sorted(record["files"]) == sorted(set(os.listdir(fresh)) - {RECORD})
    for name, known in record["files"].items():
        assert known == fingerprint(os.path.join(fresh, name)), name
        if name != "README.md":  # small files are hashed whole
            with open(os.path.join(fresh, name), "rb") as handle:
                assert known["sha256"] == hashlib.sha256(handle.read()).hexdigest(), name


def test_a_large_file_is_fingerprinted_by_samples_that_catch_a_rewrite(tmp_path):
    from mergekit_layerswap.adapter.ownership import fingerprint

    path = tmp_path / "model.safetensors"
    data = bytearray(os.urandom(20 << 20))
    path.write_bytes(data)
    first = fingerprint(str(path))
    assert first["size"] == len(data)
    data[10 << 20] ^= 1  # one byte in the middle of a sampled block of a 20 MiB file
    offset = 1 << 20  # the first sampled block after the head
    data[offset + 5] ^= 1
    path.write_bytes(data)
    assert fingerprint(str(path)) != first


@pytest.mark.parametrize("kind", ["single", "sharded"])
def test_an_earlier_linear_merge_of_mergekit_is_replaced(linear_merge, fresh, recipe, tmp_path, kind):
    target = str(tmp_path / "out")
    shutil.copytree(linear_merge[kind], target)
    result = run_yaml_inprocess(recipe, target)
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(target)) == sorted(os.listdir(fresh))
    assert without_card_and_record(target) == without_card_and_record(fresh)
    assert siblings(tmp_path) == ["out"]


def test_an_empty_directory_is_merged_into(fresh, recipe, tmp_path):
    (tmp_path / "out").mkdir()
    result = run_yaml_inprocess(recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert without_card_and_record(tmp_path / "out") == without_card_and_record(fresh)


def test_opting_in_replaces_an_unrelated_directory(fam, fresh, recipe, tmp_path, monkeypatch):
    target = finetune_checkpoint(fam, tmp_path / "my_finetune")
    monkeypatch.setenv(REPLACE_ENV, "1")
    result = run_yaml_inprocess(recipe, target)
    assert result.exit_code == 0, result.output
    assert without_card_and_record(target) == without_card_and_record(fresh)


# ---------------------------------------------------------- other paths
def test_run_merge_refuses_an_unrelated_checkpoint(fam, recipe, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from mergekit_layerswap.core.errors import OutputError

    target = finetune_checkpoint(fam, tmp_path / "my_finetune")
    before = snapshot(target)
    with open(recipe) as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    with pytest.raises(OutputError, match="holds files a merge does not write"):
        run_merge(config, target, options=MergeOptions(quiet=True))
    assert snapshot(target) == before


def _multi(fam, tmp_path, final_out=None, second_zones=None):
    from mergekit.scripts.multimerge import main as multimerge

    stages = [
        {"name": "first", **swap_recipe(fam, bottom_layers=1)},
        {
            "name": "second",
            **swap_recipe(
                fam,
                models=[
                    {"model": "first", "parameters": {"role": "task"}},
                    {"model": fam.lang, "parameters": {"role": "language"}},
                ],
                **(second_zones or {}),
            ),
        },
    ]
    if final_out is not None:
        stages[-1].pop("name")
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all(stages, sort_keys=False))
    arguments = [str(path), "-I", str(tmp_path / "stages"), "--quiet"]
    if final_out is not None:
        arguments += ["--out-path", str(final_out)]
    return CliRunner().invoke(multimerge, arguments)


@pytest.mark.parametrize("where", ["second stage", "final output"])
def test_mergekit_multi_refuses_an_unrelated_checkpoint_before_any_stage(fam, tmp_path, where):
    if where == "second stage":
        (tmp_path / "stages").mkdir()
        target = finetune_checkpoint(fam, tmp_path / "stages" / "second")
        result = _multi(fam, tmp_path)
    else:
        target = finetune_checkpoint(fam, tmp_path / "final")
        result = _multi(fam, tmp_path, final_out=target)
    before = snapshot(target)
    assert_one_line_error(result, f"output directory {target} holds files a merge does not write")
    assert snapshot(target) == before
    assert not os.path.exists(tmp_path / "stages" / "first")  # nothing merged before the refusal


def test_mergekit_multi_keeps_users_files_in_its_stages(fam, tmp_path):
    """Unchanged stages are skipped (lazy) and keep a user's files; a changed stage whose
    directory holds them is refused before any stage runs."""
    assert _multi(fam, tmp_path).exit_code == 0
    first = snapshot(tmp_path / "stages")
    add_user_files(tmp_path / "stages" / "second")
    result = _multi(fam, tmp_path)  # lazy: both stages unchanged, skipped
    assert result.exit_code == 0, result.output
    before = snapshot(tmp_path / "stages")
    assert {p: h for p, h in before.items() if p in first} == first and len(before) == len(first) + 2
    result = _multi(fam, tmp_path, second_zones={"bottom_layers": 3})
    assert_one_line_error(result, "second holds files a merge does not write (model-finetuned-3days.safetensors")
    assert snapshot(tmp_path / "stages") == before


def test_demo_refuses_an_unrelated_out_before_building(fam, tmp_path):
    from mergekit_layerswap.cli.main import main

    target = finetune_checkpoint(fam, tmp_path / "my_finetune")
    before = snapshot(target)
    result = CliRunner().invoke(main, ["demo", "--root", str(tmp_path / "root"), "--out", target])
    assert_one_line_error(result, f"output directory {target} holds files a merge does not write")
    assert snapshot(target) == before
    assert not (tmp_path / "root").exists()  # refused before the experts are built


# --------------------------------------------------------------- devices
def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_cases():
    import torch

    cases = [("--device", f"cuda:{_cuda_count()}")]  # one beyond the devices present, on any machine
    if not torch.cuda.is_available():
        cases.append(("--cuda",))
    if not torch.backends.mps.is_available():
        cases.append(("--device", "mps"))
    cases.append(("--device", "gpu0"))
    return cases


@pytest.mark.parametrize("options", _device_cases(), ids=" ".join)
def test_a_device_torch_cannot_honour_is_refused_before_anything_is_read(fam, tmp_path, options):
    """An expert that is not even a checkpoint shows that nothing was read before the refusal."""
    broken = tmp_path / "not-read"
    broken.mkdir()
    models = [
        {"model": fam.task, "parameters": {"role": "task"}},
        {"model": str(broken), "parameters": {"role": "language"}},
    ]
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam, models=models))
    before = snapshot(fam.root)
    result = run_yaml_inprocess(recipe, tmp_path / "out", *options)
    assert_one_line_error(result, " ".join(options), "asks for device", "choose a device this machine has")
    assert siblings(tmp_path) == ["not-read", "recipe.yaml"]
    assert snapshot(fam.root) == before


@pytest.mark.skipif(_cuda_count() > 0, reason="needs a torch without CUDA")
def test_other_methods_keep_mergekits_device_behaviour(fam, tmp_path):
    path = write_recipe(
        tmp_path / "linear.yaml",
        {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (fam.task, fam.lang)],
        },
    )
    result = run_yaml_inprocess(path, tmp_path / "out", "--cuda")
    assert isinstance(result.exception, AssertionError) and "CUDA" in str(result.exception)


@pytest.mark.skipif(_cuda_count() > 0, reason="needs a torch without CUDA")
def test_mergekit_multi_refuses_cuda_before_any_stage(fam, tmp_path):
    from mergekit.scripts.multimerge import main as multimerge

    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all([{"name": "only", **swap_recipe(fam)}], sort_keys=False))
    result = CliRunner().invoke(multimerge, [str(path), "-I", str(tmp_path / "stages"), "--cuda", "--quiet"])
    assert_one_line_error(result, "--cuda asks for device cuda")
    assert os.listdir(tmp_path / "stages") == []


@pytest.mark.skipif(_cuda_count() > 0, reason="needs a torch without CUDA")
@pytest.mark.parametrize("command", ["analyze", "suggest"])
def test_package_commands_refuse_cuda_without_cuda(fam, tmp_path, command):
    from mergekit_layerswap.cli.main import main

    out = ["--out", str(tmp_path / "report")] if command == "analyze" else ["--out", str(tmp_path / "s.yaml")]
    experts = ["--expert", fam.task, "--expert", fam.lang]
    if command == "suggest":
        experts = ["--task", fam.task, "--language", fam.lang]
    arguments = [command, "--base", fam.base, *experts, *out, "--cuda"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--cuda" in errors[0] and "no CUDA device is available" in errors[0], result.output
    assert siblings(tmp_path) == []


def test_device_problem_names_what_is_missing():
    import torch

    from mergekit_layerswap.adapter.devices import device_problem

    assert device_problem("cpu") is None
    assert "not a device torch knows" in device_problem("gpu0")
    count = _cuda_count()
    beyond = device_problem(f"cuda:{count}")
    assert beyond is not None and (("only" in beyond) if count else ("without CUDA" in beyond or "no CUDA" in beyond))
    if count:
        assert device_problem("cuda:0") is None and device_problem("cuda") is None
    else:
        assert device_problem("cuda") is not None
    if not torch.backends.mps.is_available():
        assert device_problem("mps") == "there is no mps device here"
