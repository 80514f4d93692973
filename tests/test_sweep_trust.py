# SPDX-License-Identifier: LGPL-3.0-only
"""Sweep trust (issue 12): a resume with changed inputs is refused in one line naming what
changed (and --restart starts over); eval files with no usable problem are refused before
any candidate is built; a non-finite score is a failure, never the best."""

import csv
import hashlib
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import swap_recipe, write_recipe
from safetensors.torch import load_file, save_file

BASE = ["--grid", "bottom_layers=1", "--no-baselines", "--quiet"]


class Workspace:
    """Copies of a family's experts, a recipe, an eval text and a sweep's --out directory."""

    def __init__(self, fam, root):
        self.root = root
        self.task = shutil.copytree(fam.task, root / "task")
        self.lang = shutil.copytree(fam.lang, root / "lang")
        self.recipe = write_recipe(root / "recipe.yaml", swap_recipe_for(self.task, self.lang))
        self.text = root / "text.txt"
        self.text.write_text(" ".join(f"w{(7 * i) % 90 + 1}" for i in range(40)))
        self.out = root / "out"

    def sweep(self, *args):
        from mergekit_layerswap.cli.main import main

        return CliRunner().invoke(
            main, ["sweep", self.recipe, "--eval", f"perplexity:{self.text}", "--out", str(self.out), *args]
        )

    def digests(self):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(self.out.iterdir())}


def swap_recipe_for(task, lang, **parameters):
    recipe = {
        "merge_method": "layer_swap",
        "dtype": "float32",
        "models": [
            {"model": str(task), "parameters": {"role": "task"}},
            {"model": str(lang), "parameters": {"role": "language"}},
        ],
    }
    if parameters:
        recipe["parameters"] = parameters
    return recipe


def rewrite_in_place_keeping_size_and_mtime(ws):
    """New weights, same size, same inode, old mtime put back: only the ctime tells."""
    path = os.path.join(ws.task, "model.safetensors")
    before = os.stat(path)
    with open(path, "r+b") as handle:  # the last tensor's last float: 1.5
        handle.seek(-4, os.SEEK_END)
        handle.write(torch.tensor([1.5]).numpy().tobytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert load_file(path)  # still a valid file


def replace_with_a_copy(ws):
    path = os.path.join(ws.task, "model.safetensors")
    before = os.stat(path)
    shutil.copyfile(path, path + ".tmp")
    os.replace(path + ".tmp", path)  # same bytes, new inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def edit_recipe(ws):
    write_recipe(ws.recipe, swap_recipe_for(ws.task, ws.lang, non_layer="language"))


def edit_eval_text(ws):
    ws.text.write_text(ws.text.read_text().replace("w8", "w9"))


def old_format(ws):
    (ws.out / "sweep.json").write_text(
        json.dumps({"recipe": ws.recipe, "grid": {"bottom_layers": [1]}, "eval": f"perplexity:{ws.text}"})
    )


def drop_record(ws):
    (ws.out / "sweep.json").unlink()


def nothing(ws):
    pass


# (case, base-run options, change to the inputs, options of the resumed run, words of the refusal)
RESUMES = [
    ("recipe", [], edit_recipe, [], "the recipe text changed"),
    ("weights-in-place", [], rewrite_in_place_keeping_size_and_mtime, [], "model.safetensors"),
    ("weights-new-inode", [], replace_with_a_copy, [], "model.safetensors"),
    ("eval-file", [], edit_eval_text, [], "the eval file's contents changed"),
    ("limit", [], nothing, ["--limit", "1"], "--limit changed"),
    ("strategy", [], nothing, ["--strategy", "halving", "--halving-min", "1"], "the strategy or its rung schedule"),
    (
        "halving-eta",
        ["--strategy", "halving", "--halving-min", "1"],
        nothing,
        ["--strategy", "halving", "--halving-min", "1", "--halving-eta", "2"],
        "the strategy or its rung schedule",
    ),
    ("baselines", [], nothing, ["--baselines"], "--baselines changed"),
    ("grid", [], nothing, ["--grid", "bottom_layers=2"], "the grid changed"),
    ("old-format", [], old_format, [], "older or unknown sweep format"),
    ("no-record", [], drop_record, [], "older or unknown sweep format"),
]


@pytest.mark.parametrize("case,base,change,args,words", RESUMES, ids=[r[0] for r in RESUMES])
def test_resume_with_changed_inputs_is_refused(families, tmp_path, case, base, change, args, words):
    ws = Workspace(families("llama"), tmp_path)
    first = ws.sweep(*BASE, *base)
    assert first.exit_code == 0, first.output
    change(ws)
    before = ws.digests()
    result = ws.sweep(*BASE, *args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.output, result.output
    assert "different sweep" in lines[0] and words in lines[0] and "--restart" in lines[0], lines[0]
    if case.startswith("weights"):
        assert "the weight files of" in lines[0] and "task" in lines[0]
    assert ws.digests() == before  # nothing in --out touched


def test_restart_starts_over(families, tmp_path):
    ws = Workspace(families("llama"), tmp_path)
    assert ws.sweep(*BASE).exit_code == 0
    edit_eval_text(ws)
    assert ws.sweep(*BASE).exit_code != 0
    result = ws.sweep(*BASE, "--restart")
    assert result.exit_code == 0, result.output
    with open(ws.out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["b1"]
    record = json.loads((ws.out / "sweep.json").read_text())
    digest = hashlib.sha256(ws.text.read_bytes()).hexdigest()
    assert list(record["eval_data"].values()) == [digest]
    again = ws.sweep(*BASE)  # and it now resumes (nothing left to do)
    assert again.exit_code == 0 and "resuming: 1 evaluations" in again.output


def test_record_names_every_input(families, tmp_path):
    ws = Workspace(families("llama"), tmp_path)
    assert ws.sweep(*BASE, "--limit", "3").exit_code == 0
    record = json.loads((ws.out / "sweep.json").read_text())
    assert record["recipe"] == open(ws.recipe).read()
    task_files = record["models"][str(ws.task)]["files"]
    stat = os.stat(os.path.join(ws.task, "model.safetensors"))
    assert task_files["model.safetensors"] == {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "ctime_ns": stat.st_ctime_ns,
        "device": stat.st_dev,
    }
    assert "config.json" in task_files
    assert record["evaluator"]["spec"] == f"perplexity:{ws.text}" and record["limit"] == 3
    assert record["strategy"] == {"name": "grid", "rungs": [[3, 1]]}
    assert record["grid"] == {"bottom_layers": [1]} and record["device"] == "cpu"


# (case, file name, contents, words of the refusal)
BAD_EVAL = [
    ("empty", "p.jsonl", b"", "has no problems"),
    ("blank-lines", "p.jsonl", b"\n  \n\n", "has no problems"),
    ("broken-json", "p.jsonl", b'{"question": "a", "answer": "1"}\n{"question": \n', "line 2 is not valid JSON"),
    ("not-an-object", "p.jsonl", b"[1, 2]\n", "line 1 is not a JSON object"),
    ("missing-answer", "p.jsonl", b'{"question": "a"}\n', "line 1 needs 'question' and 'answer'"),
    ("empty-text", "t.txt", b" \n\n", "has no text to score"),
    ("not-utf8", "t.txt", b"\xff\xfe\xfa", "cannot read"),
]


@pytest.mark.parametrize("case,name,contents,words", BAD_EVAL, ids=[c[0] for c in BAD_EVAL])
def test_eval_file_without_usable_problems_is_refused_before_anything_is_built(
    families, tmp_path, case, name, contents, words
):
    from mergekit_layerswap.cli.main import main

    fam = families("llama")
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe(fam))
    path = tmp_path / name
    path.write_bytes(contents)
    kind = "exact-match" if name.endswith(".jsonl") else "perplexity"
    result = CliRunner().invoke(
        main, ["sweep", recipe, "--grid", "bottom_layers=1", "--eval", f"{kind}:{path}", "--out", str(tmp_path / "out")]
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert words in lines[0] and str(path) in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert path.read_bytes() == contents


def _nan_family(fam, root, layer=3):
    """Copies of the experts with NaN in one tensor of the task expert's layer ``layer``."""
    task = shutil.copytree(fam.task, root / "task")
    lang = shutil.copytree(fam.lang, root / "lang")
    path = os.path.join(task, "model.safetensors")
    tensors = load_file(path)
    name = sorted(n for n in tensors if f".layers.{layer}.mlp" in n)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path, metadata={"format": "pt"})
    return task, lang


def test_nan_score_is_a_failure_never_the_best(families, tmp_path):
    from mergekit_layerswap.cli.main import main

    task, lang = _nan_family(families("llama"), tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe_for(task, lang))
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * i) % 90 + 1}" for i in range(40)))
    # b2: layer 3 from the NaN task expert (first, so "first seen wins" would pick it); b4: from the language expert
    result = CliRunner().invoke(
        main,
        [
            "sweep",
            recipe,
            "--grid",
            "bottom_layers=2,4",
            "--eval",
            f"perplexity:{text}",
            "--out",
            str(tmp_path / "out"),
            "--no-baselines",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = {r["name"]: r for r in csv.DictReader(handle)}
    assert rows["b2"]["score"] == "nan" and rows["b2"]["status"] == "failed: non-finite score"
    assert rows["b4"]["status"] == "ok" and float(rows["b4"]["score"]) > 0
    assert "best: b4" in result.output and "b2: perplexity = nan" in result.output
    import yaml

    assert yaml.safe_load((tmp_path / "out" / "best.yaml").read_text())["parameters"]["bottom_layers"] == 4


def test_all_scores_non_finite_gives_no_best(families, tmp_path):
    from mergekit_layerswap.cli.main import main

    task, lang = _nan_family(families("llama"), tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yaml", swap_recipe_for(task, lang))
    text = tmp_path / "text.txt"
    text.write_text("w1 w2 w3 w4 w5 w6")
    result = CliRunner().invoke(
        main,
        [
            "sweep",
            recipe,
            "--grid",
            "bottom_layers=1,2",
            "--eval",
            f"perplexity:{text}",
            "--out",
            str(tmp_path / "out"),
            "--no-baselines",
            "--quiet",
            "--strategy",
            "halving",
            "--halving-min",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "no candidate got a finite score" in result.output
    assert not (tmp_path / "out" / "best.yaml").exists()


def test_a_row_torn_by_a_kill_is_evaluated_again(families, tmp_path):
    ws = Workspace(families("llama"), tmp_path)
    assert ws.sweep("--grid", "bottom_layers=1,2", "--no-baselines", "--quiet").exit_code == 0
    whole = (ws.out / "results.csv").read_text()
    torn = whole[: whole.rindex("\n", 0, len(whole) - 1) + 1] + "b2,swap,2,,"  # killed mid-append
    (ws.out / "results.csv").write_text(torn)
    result = ws.sweep("--grid", "bottom_layers=1,2", "--no-baselines")
    assert result.exit_code == 0 and "resuming: 1 evaluations" in result.output, result.output
    assert (ws.out / "results.csv").read_text() == whole
