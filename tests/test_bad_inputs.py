# SPDX-License-Identifier: LGPL-3.0-only
"""The bad-input matrix: every case is one line (name, what is broken, words the error must hold).

Each case copies a small real family (base, task, lang) into its own directory, applies
its change to the recipe text or to the model files, hashes every input file, runs the
real ``mergekit-yaml`` click command in this process, and asserts: exit status != 0, the
output is exactly one ``Error:`` line holding the words (a word starting with ``!`` must
NOT appear), no traceback, no output directory, every input byte-identical. A few cases
run through the installed console scripts as real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Tuple

import pytest
import torch
from checkpoints import ARCHS, make_model, variant
from click.testing import CliRunner
from helpers import assert_one_line_error, run_yaml_inprocess
from safetensors.torch import load_file, save_file

RECIPE = """merge_method: layer_swap
base_model: {base}
models:
  - model: {task}
    parameters:
      role: task
      weight: 1.0
  - model: {lang}
    parameters:
      role: language
      weight: 1.0
parameters:
  bottom_layers: 2
  top_layers: 1
dtype: float32
"""


@dataclass
class World:
    """One case's inputs: copies of the family and the recipe text."""

    root: str
    text: str = RECIPE

    def model(self, name: str) -> str:
        return os.path.join(self.root, "models", name)

    def weights(self, name: str) -> str:
        return os.path.join(self.model(name), "model.safetensors")

    @property
    def recipe(self) -> str:
        return os.path.join(self.root, "recipe.yaml")


# ------------------------------------------------------------------ changes
def sub(old: str, new: str) -> Callable[[World], None]:
    def change(w: World) -> None:
        assert old in w.text, old
        w.text = w.text.replace(old, new, 1)

    return change


def add(extra: str) -> Callable[[World], None]:
    return lambda w: setattr(w, "text", w.text + extra)


def whole(text: str) -> Callable[[World], None]:
    return lambda w: setattr(w, "text", text)


def both(*changes) -> Callable[[World], None]:
    def change(w: World) -> None:
        for c in changes:
            c(w)

    return change


def relative(w: World) -> str:
    return "./" + os.path.relpath(w.model("task"))


def symlink(w: World, target: str = "task") -> str:
    link = os.path.join(w.root, "models", f"{target}-link")
    os.symlink(w.model(target), link)
    return link


def write_bytes(name: str, data: Callable[[bytes], bytes]) -> Callable[[World], None]:
    def change(w: World) -> None:
        path = w.weights(name)
        with open(path, "rb") as handle:
            old = handle.read()
        with open(path, "wb") as handle:
            handle.write(data(old))

    return change


def remove_weights(name: str) -> Callable[[World], None]:
    return lambda w: os.remove(w.weights(name))


def sharded(
    name: str, edit_index: Callable[[dict, World], None] = lambda index, w: None, drop_shard: bool = False
) -> Callable[[World], None]:
    """Split ``name``'s weights into two shards with an index, then edit the index."""

    def change(w: World) -> None:
        tensors = load_file(w.weights(name))
        os.remove(w.weights(name))
        names = sorted(tensors)
        halves = {
            "model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :],
        }
        index = {"metadata": {}, "weight_map": {}}
        for shard, keys in halves.items():
            save_file({k: tensors[k] for k in keys}, os.path.join(w.model(name), shard), metadata={"format": "pt"})
            index["weight_map"].update({k: shard for k in keys})
        if drop_shard:
            os.remove(os.path.join(w.model(name), "model-00002-of-00002.safetensors"))
        edit_index(index, w)
        with open(os.path.join(w.model(name), "model.safetensors.index.json"), "w") as handle:
            json.dump(index, handle)

    return change


def shard_path(path: Callable[[World], str]) -> Callable[[dict, World], None]:
    def edit(index: dict, w: World) -> None:
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = path(w)

    return edit


def outside_shard(w: World) -> str:
    """A real, valid shard outside the model directory (what a `..` index would follow)."""
    elsewhere = os.path.join(w.root, "elsewhere")
    os.makedirs(elsewhere, exist_ok=True)
    shutil.copy(w.weights("lang"), os.path.join(elsewhere, "x.safetensors"))
    return os.path.join(elsewhere, "x.safetensors")


def as_dtype(name: str, dtype: torch.dtype) -> Callable[[World], None]:
    def change(w: World) -> None:
        tensors = {k: v.to(dtype) for k, v in load_file(w.weights(name)).items()}
        save_file(tensors, w.weights(name), metadata={"format": "pt"})

    return change


def replace_lang(**config_overrides) -> Callable[[World], None]:
    """The language expert becomes a model with other config values (e.g. hidden size)."""

    def change(w: World) -> None:
        shutil.rmtree(w.model("lang"))
        make_model(variant(ARCHS["llama"], "variant", **config_overrides), w.model("lang"), seed=11)

    return change


# name | change | words in the one Error: line ("!word": must not appear)
CASES: Tuple[Tuple[str, Callable[[World], None], Tuple[str, ...]], ...] = (
    # unknown keys: mergekit's schema would drop them and merge with defaults
    (
        "typo paramters",
        sub("parameters:\n  bottom", "paramters:\n  bottom"),
        ("line 12", "paramters", "did you mean `parameters`"),
    ),
    ("unknown top-level key", add("foo: 1\n"), ("line 16", "unknown key `foo`")),
    ("parameter at top level", add("top_transition: 1\n"), ("top_transition", "under `parameters:`")),
    (
        "typo in a model entry",
        sub("    parameters:\n      role: task", "    paramters:\n      role: task"),
        ("line 5", "models[0]", "did you mean `parameters`"),
    ),
    (
        "weight next to model:",
        sub("  - model: {task}\n", "  - model: {task}\n    weight: 2\n"),
        ("models[0].weight", "parameters:"),
    ),
    (
        "typo in parameters",
        sub("bottom_layers: 2", "botom_layers: 2"),
        ("parameters.botom_layers", "did you mean `bottom_layers`"),
    ),
    ("typo in model parameters", sub("role: task", "rol: task"), ("models[0].parameters.rol", "did you mean `role`")),
    (
        "typo in a model reference",
        sub("model: {task}\n", "model: {{model: {{pth: {task}}}}}\n"),
        ("pth", "did you mean `path`"),
    ),
    ("typo in tokenizer", add("tokenizer:\n  sorce: base\n"), ("sorce", "did you mean `source`")),
    ("key given twice", add("parameters:\n  top_layers: 2\n"), ("parameters", "twice", "line 12")),
    (
        "filter key typo",
        sub("weight: 1.0\n  - model: {lang}", "weight: {{filtr: mlp, value: 2}}\n  - model: {lang}"),
        ("filtr", "did you mean `filter`"),
    ),
    # YAML null, empty or misplaced values
    (
        "null zone size",
        sub("bottom_layers: 2", "bottom_layers:"),
        ("parameters.bottom_layers", "null", "bottom_layers: 5"),
    ),
    ("null role", sub("role: task", "role: null"), ("models[0].parameters.role", "null", "role: task")),
    ("null weight", sub("weight: 1.0", "weight: ~"), ("models[0].parameters.weight", "null")),
    ("null in a gradient", sub("weight: 1.0", "weight: [1.0, null]"), ("weight", "null")),
    ("null weighting", sub("top_layers: 1\n", "top_layers: 1\n  weighting: null\n"), ("parameters.weighting", "null")),
    ("models empty list", whole("merge_method: layer_swap\nmodels: []\n"), ("line 2", "models is empty")),
    ("models null", whole("merge_method: layer_swap\nmodels:\n"), ("models is empty",)),
    ("no models key", whole("merge_method: layer_swap\nparameters: {{bottom_layers: 1}}\n"), ("no `models:`",)),
    ("models is a mapping", whole("merge_method: layer_swap\nmodels:\n  task: {task}\n"), ("models must be a list",)),
    (
        "model entry is a string",
        whole("merge_method: layer_swap\nmodels:\n  - {task}\n  - {lang}\n"),
        ("models[0] must be a mapping", "line 3"),
    ),
    (
        "model entry without model",
        sub("  - model: {task}\n    parameters:", "  - parameters:"),
        ("models[0] has no model path",),
    ),
    ("null model path", sub("model: {task}", "model:"), ("models[0] has no model path",)),
    (
        "parameters is a list",
        sub("parameters:\n  bottom_layers: 2\n  top_layers: 1\n", "parameters: [2, 1]\n"),
        ("parameters must be a mapping",),
    ),
    (
        "model parameters is a list",
        sub("    parameters:\n      role: task\n      weight: 1.0\n", "    parameters: [task]\n"),
        ("models[0].parameters must be a mapping",),
    ),
    (
        "parameter is a mapping",
        sub("bottom_layers: 2", "bottom_layers: {{layers: 2}}"),
        ("parameters.bottom_layers", "mapping"),
    ),
    ("list inside a list", sub("weight: 1.0", "weight: [[1.0, 2.0]]"), ("list inside a list",)),
    ("empty list parameter", sub("bottom_layers: 2", "bottom_layers: []"), ("empty list",)),
    ("dtype is a list", sub("dtype: float32", "dtype: [float32]"), ("dtype must be one value",)),
    ("recipe is a list", whole("- merge_method: layer_swap\n- models: []\n"), ("line 1", "must be a mapping")),
    ("broken YAML", sub("dtype: float32", "dtype: [float32"), ("not valid YAML", "line")),
    ("bad indentation", sub("  top_layers: 1\n", "    top_layers: 1\n"), ("not valid YAML", "line 14")),
    ("tab indentation", sub("  top_layers: 1", "\ttop_layers: 1"), ("not valid YAML",)),
    ("two documents", add("---\nmerge_method: linear\n"), ("several YAML documents", "mergekit-multi")),
    ("slices with models", add("slices:\n  - sources: []\n"), ("`slices:`", "models:")),
    ("modules with models", add("modules:\n  text: {{models: []}}\n"), ("`modules:`",)),
    # mergekit's own schema and dtype names (translated into one line)
    (
        "tokenizer and tokenizer_source",
        add("tokenizer_source: union\ntokenizer:\n  source: base\n"),
        ("tokenizer_source and tokenizer",),
    ),
    ("model path is a number", sub("model: {task}", "model: 5"), ("models[0].model", "line 4")),
    (
        "lora path is a mapping",
        sub("model: {task}", "model: {{model: {task}, lora: {{path: [a]}}}}"),
        ("models[0].model.lora.path", "one value"),
    ),
    ("invalid dtype", sub("dtype: float32", "dtype: float33"), ("dtype", "'float33'", "bfloat16")),
    ("integer dtype", sub("dtype: float32", "dtype: int64"), ("dtype", "'int64'")),
    ("invalid out_dtype", add("out_dtype: fp8\n"), ("out_dtype", "'fp8'")),
    ("unknown role", sub("role: task", "role: math"), ("role", "task", "language")),
    # weights: finite, and normalised weights finite and positive
    ("weight inf", sub("weight: 1.0", "weight: .inf"), ("weight of models[0]", "finite")),
    ("weight nan", sub("weight: 1.0", "weight: .nan"), ("weight of models[0]", "positive")),
    ("weight 1e308", sub("weight: 1.0", "weight: 1.0e+308"), ("weight of models[0]", "outside 1e-30 .. 1e+30")),
    ("weight 1e-320", sub("weight: 1.0", "weight: 1e-320"), ("weight of models[0]", "outside 1e-30 .. 1e+30")),
    ("weight inf in a gradient", sub("weight: 1.0", "weight: [1.0, .inf]"), ("weight of models[0]", "finite")),
    (
        "top-level weight inf",
        sub("  top_layers: 1\n", "  top_layers: 1\n  weight: .inf\n"),
        ("weight of parameters", "finite"),
    ),
    (
        "weights far apart",
        both(
            sub("weight: 1.0\nparameters:", "weight: 1.0e+25\nparameters:"), sub("weight: 1.0\n", "weight: 1.0e-25\n")
        ),
        ("models[0]", "negligible"),
    ),
    (
        "effective weight too large",
        both(sub("top_layers: 1\n", "top_layers: 1\n  weighting: magnitude\n"), sub("weight: 1.0", "weight: 1.0e+29")),
        ("effective weight", "outside"),
    ),
    # one model, two spellings
    ("same expert with trailing slash", sub("model: {lang}", "model: {task}/"), ("models[1]", "same files")),
    (
        "same expert via ./relative",
        lambda w: setattr(w, "text", w.text.replace("{lang}", relative(w), 1)),
        ("models[1]", "same files"),
    ),
    (
        "same expert via a symlink",
        lambda w: setattr(w, "text", w.text.replace("{lang}", symlink(w), 1)),
        ("models[1]", "same files"),
    ),
    (
        "base is an expert, trailing slash",
        sub("base_model: {base}", "base_model: {lang}/"),
        ("models[1]", "base_model"),
    ),
    (
        "base is an expert, via a symlink",
        lambda w: setattr(w, "text", w.text.replace("{base}", symlink(w, "lang"), 1)),
        ("models[1]", "base_model"),
    ),
    # mixed dtypes without dtype:
    (
        "fp16 and fp32 experts without dtype",
        both(as_dtype("task", torch.float16), sub("dtype: float32\n", "")),
        ("F16", "F32", "add `dtype:"),
    ),
    # damaged weight files (each error names the file)
    ("truncated weights", write_bytes("task", lambda b: b[: len(b) // 2]), ("task/model.safetensors", "truncated")),
    ("truncated header", write_bytes("task", lambda b: b[:4]), ("task/model.safetensors", "truncated")),
    ("garbage weights", write_bytes("lang", lambda b: os.urandom(len(b))), ("lang/model.safetensors",)),
    (
        "garbage header json",
        write_bytes("lang", lambda b: b[:8] + b"x" * (len(b) - 8)),
        ("lang/model.safetensors", "not a safetensors file"),
    ),
    ("empty weights", write_bytes("task", lambda b: b""), ("task/model.safetensors", "empty")),
    ("damaged base weights", write_bytes("base", lambda b: b[:-10]), ("base/model.safetensors", "truncated")),
    ("no weight file", remove_weights("task"), ("no weight file", "task")),
    ("missing shard", sharded("task", drop_shard=True), ("model-00002-of-00002.safetensors", "missing")),
    (
        "shard path with ..",
        sharded("task", shard_path(lambda w: "../../elsewhere/x.safetensors")),
        ("../../elsewhere", "plain relative"),
    ),
    ("absolute shard path", sharded("task", shard_path(outside_shard)), ("elsewhere", "plain relative")),
    (
        "index not JSON",
        both(
            sharded("task"),
            lambda w: open(os.path.join(w.model("task"), "model.safetensors.index.json"), "w").write("{"),
        ),
        ("index.json", "damaged"),
    ),
    (
        "index names a tensor its shard lacks",
        sharded(
            "task", lambda index, w: index["weight_map"].update({"extra.weight": "model-00001-of-00002.safetensors"})
        ),
        ("extra.weight", "does not hold"),
    ),
    (
        "broken config.json",
        lambda w: open(os.path.join(w.model("lang"), "config.json"), "w").write("{"),
        ("config.json", "lang"),
    ),
    # a hidden-size mismatch is not a vocabulary mismatch
    (
        "hidden sizes differ",
        replace_lang(hidden_size=64, intermediate_size=48),
        ("shapes differ", "model.embed_tokens.weight", "hidden size", "!vocabulary sizes differ", "!tokenizer"),
    ),
)


def _digest(root: str) -> dict:
    """sha256 of every file under ``root`` (symlinks by their target path)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                out[path] = "link:" + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as handle:
                    out[path] = hashlib.sha256(handle.read()).hexdigest()
    return out


def make_world(families, tmp_path) -> World:
    fam = families("llama")
    world = World(root=str(tmp_path / "inputs"))
    for name, source in (("base", fam.base), ("task", fam.task), ("lang", fam.lang)):
        shutil.copytree(source, world.model(name))
    return world


def write(world: World) -> str:
    with open(world.recipe, "w") as handle:
        handle.write(world.text.format(base=world.model("base"), task=world.model("task"), lang=world.model("lang")))
    return world.recipe


def check_refusal(result, out, before, world, words) -> str:
    wanted = [w for w in words if not w.startswith("!")]
    message = assert_one_line_error(result, *wanted)
    for word in (w[1:] for w in words if w.startswith("!")):
        assert word not in message, f"{word!r} should not be in {message!r}"
    assert "Traceback" not in result.output
    assert not os.path.exists(out), "a refused recipe left an output directory"
    assert _digest(world.root) == before, "an input file changed"
    return message


@pytest.mark.parametrize("change,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(families, tmp_path, change, words):
    world = make_world(families, tmp_path)
    change(world)
    write(world)
    before = _digest(world.root)
    out = tmp_path / "out"
    check_refusal(run_yaml_inprocess(world.recipe, out), out, before, world, words)


def test_the_unchanged_recipe_merges(families, tmp_path):
    """The matrix's base recipe is good: each case fails only by its own change."""
    world = make_world(families, tmp_path)
    write(world)
    result = run_yaml_inprocess(world.recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_numeric_string_weights_are_numbers(families, tmp_path):
    """YAML 1.1 reads `1e-3` as text; mergekit's parameters take it as a number, so do we."""
    world = make_world(families, tmp_path)
    world.text = world.text.replace("weight: 1.0", "weight: 1e-3", 1)
    write(world)
    result = run_yaml_inprocess(world.recipe, tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_other_methods_keep_mergekits_behaviour(families, tmp_path):
    """An unknown key in a `linear` recipe is mergekit's business: it still merges."""
    fam = families("llama")
    path = tmp_path / "linear.yaml"
    path.write_text(
        f"merge_method: linear\nmodels:\n  - model: {fam.task}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {fam.lang}\n    parameters: {{weight: 1.0}}\ndtype: float32\nfoo: 1\n"
    )
    result = run_yaml_inprocess(path, tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_known_keys_are_mergekits(families):
    """The text check accepts exactly the keys of mergekit's own schema (plus ours)."""
    from mergekit.config import InputModelDefinition, MergeConfiguration

    from mergekit_layerswap.adapter.recipe_text_schema import recipe_schema

    schema = recipe_schema()
    assert schema.top_level == set(MergeConfiguration.model_fields) >= {"models", "parameters", "dtype"}
    assert schema.model_entry == set(InputModelDefinition.model_fields) == {"model", "parameters"}


# ------------------------------------------------ mergekit-multi and our own commands
MULTI = """name: soup
merge_method: linear
models:
  - model: {task}
    parameters: {{weight: 1.0}}
  - model: {lang}
    parameters: {{weight: 1.0}}
dtype: float32
---
merge_method: layer_swap
models:
  - model: soup
    parameters: {{role: task}}
  - model: {lang}
    parameters: {{role: language}}
paramters:
  bottom_layers: 1
dtype: float32
"""

MULTI_CASES = (
    ("typo in a layer_swap stage", lambda t: t, ("line 16", "paramters", "did you mean `parameters`")),
    (
        "null role in a stage",
        lambda t: t.replace("paramters", "parameters").replace("{{role: task}}", "{{role: ~}}"),
        ("role", "null"),
    ),
    ("broken YAML", lambda t: t + "dtype: [\n", ("not valid YAML",)),
    ("empty document", lambda t: t.replace("paramters", "parameters") + "---\n", ("document 3", "empty")),
    (
        "schema error in a stage",
        lambda t: t.replace("paramters", "parameters").replace("model: soup", "model: [soup]"),
        ("models[0].model",),
    ),
)


@pytest.mark.parametrize("change,words", [c[1:] for c in MULTI_CASES], ids=[c[0] for c in MULTI_CASES])
def test_mergekit_multi_refuses_in_one_line(families, tmp_path, change, words):
    from mergekit.scripts.multimerge import main as multimerge

    world = make_world(families, tmp_path)
    world.text = change(MULTI)
    write(world)
    before = _digest(world.root)
    stages, out = tmp_path / "stages", tmp_path / "out"
    result = CliRunner().invoke(multimerge, [world.recipe, "-I", str(stages), "--out-path", str(out)])
    check_refusal(result, out, before, world, words)
    assert not stages.exists(), "a refused mergekit-multi file created the intermediate directory"


def test_explain_refuses_in_one_line(families, tmp_path):
    from mergekit_layerswap.cli.main import main

    world = make_world(families, tmp_path)
    for text, words in (
        (RECIPE.replace("parameters:\n  bottom", "paramters:\n  bottom"), ("did you mean `parameters`",)),
        ("", ("is empty",)),
        ("- a\n", ("must be a mapping",)),
        (RECIPE.replace("weight: 1.0", "weight: .inf", 1), ("finite",)),
        (RECIPE.replace("model: {lang}", "model: {task}/"), ("same files",)),
    ):
        world.text = text
        write(world)
        result = CliRunner().invoke(main, ["explain", world.recipe])
        message = assert_one_line_error(result, *words)
        assert "Traceback" not in message


# the merge's damaged-file cases, run through the commands that read models without merging
DAMAGED_FILES = [
    c
    for c in CASES
    if c[0]
    in {
        "truncated weights",
        "truncated header",
        "garbage weights",
        "garbage header json",
        "empty weights",
        "damaged base weights",
        "no weight file",
        "missing shard",
        "shard path with ..",
        "absolute shard path",
        "index not JSON",
        "index names a tensor its shard lacks",
    }
]


def _read_only_command(command: str, world: World, out: str) -> list:
    models = {name: world.model(name) for name in ("base", "task", "lang")}
    if command == "explain":
        return ["explain", world.recipe]
    if command == "analyze":
        return [
            "analyze",
            "--base",
            models["base"],
            "--expert",
            models["task"],
            "--expert",
            models["lang"],
            "--out",
            out,
        ]
    if command == "suggest":
        return [
            "suggest",
            "--base",
            models["base"],
            "--task",
            models["task"],
            "--language",
            models["lang"],
            "--out",
            out,
        ]
    text = os.path.join(world.root, "text.txt")
    return ["sweep", world.recipe, "--grid", "bottom_layers=1", "--eval", f"perplexity:{text}", "--out", out]


@pytest.mark.parametrize("command", ["explain", "analyze", "suggest", "sweep"])
@pytest.mark.parametrize("change,words", [c[1:] for c in DAMAGED_FILES], ids=[c[0] for c in DAMAGED_FILES])
def test_commands_check_files_as_a_merge_does(families, tmp_path, command, change, words):
    """explain, analyze, suggest and sweep refuse a damaged model in the merge's own line,
    before mergekit's tensor index opens the file (it used to raise a safetensors traceback)."""
    from mergekit_layerswap.cli.main import main

    assert len(DAMAGED_FILES) == 12
    world = make_world(families, tmp_path)
    with open(os.path.join(world.root, "text.txt"), "w") as handle:
        handle.write(" ".join(f"w{i % 90 + 1}" for i in range(40)))
    change(world)
    write(world)
    before = _digest(world.root)
    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, _read_only_command(command, world, out))
    check_refusal(result, out, before, world, words)


def _script(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _assert_one_stderr_line(process, *words) -> None:
    assert process.returncode != 0
    assert "Traceback" not in process.stderr, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), process.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_installed_scripts_refuse_without_traceback(families, tmp_path):
    """One real process per console script (each costs an interpreter start with torch)."""
    world = make_world(families, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    world.text = RECIPE
    write(world)
    write_bytes("task", lambda b: b[: len(b) // 2])(world)
    before = _digest(world.root)
    run = subprocess.run(
        [_script("mergekit-yaml"), world.recipe, str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    _assert_one_stderr_line(run, "task/model.safetensors", "truncated")
    assert not (tmp_path / "out").exists() and _digest(world.root) == before
    run = subprocess.run(  # the dry run users try first says the same (issue 20: it raised a traceback)
        [_script("mergekit-layerswap"), "explain", world.recipe], capture_output=True, text=True, env=env
    )
    _assert_one_stderr_line(run, "task/model.safetensors", "truncated")
    assert _digest(world.root) == before

    world.text = MULTI
    write(world)
    run = subprocess.run(
        [_script("mergekit-multi"), world.recipe, "-I", str(tmp_path / "stages"), "--out-path", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    _assert_one_stderr_line(run, "paramters")
    assert not (tmp_path / "stages").exists()

    world.text = "merge_method: layer_swap\nmodels: [\n"
    write(world)
    run = subprocess.run(
        [_script("mergekit-layerswap"), "explain", world.recipe], capture_output=True, text=True, env=env
    )
    _assert_one_stderr_line(run, "not valid YAML")
