# SPDX-License-Identifier: LGPL-3.0-only
"""mergekit-layerswap explain: the same validation as a merge, a per-layer table, bytes to read."""

import json

import pytest
from checkpoints import load_tensors
from click.testing import CliRunner
from helpers import assert_one_line_error, swap_recipe, write_recipe


def explain(*args):
    from mergekit_layerswap.cli.main import main

    return CliRunner().invoke(main, ["explain", *map(str, args)])


def test_json_report_matches_hand_written_layout_and_bytes(families, tmp_path):
    fam = families("llama")  # 8 layers, b=2,u=1,t_b=1,t_u=1 -> L L B T T T B L
    path = write_recipe(
        tmp_path / "r.yaml",
        swap_recipe(fam, bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1, non_layer="task"),
    )
    result = explain(path, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    letters = "".join({"language": "L", "task": "T", "blend": "B"}[row["source"]] for row in report["layers"])
    assert letters == "LLBTTTBL"
    assert report["layers"][2]["mix"] == {"task": 0.5, "language": 0.5}
    assert report["non_layer_mix"] == {"task": 1.0}

    def size(path, keep):
        return sum(t.numel() * t.element_size() for n, t in load_tensors(path).items() if keep(n))

    def layer(name):
        return fam.arch.layer_of(name)

    # language expert: its layers 0,1,2,6,7 only; task expert: 2..6 plus every non-layer tensor
    assert report["bytes_to_read"][fam.lang] == size(fam.lang, lambda n: layer(n) in (0, 1, 2, 6, 7))
    assert report["bytes_to_read"][fam.task] == size(fam.task, lambda n: layer(n) is None or 2 <= layer(n) <= 6)


def test_text_report_and_linear_transitions(families, tmp_path):
    fam = families("qwen2")
    path = write_recipe(
        tmp_path / "r.yaml",
        swap_recipe(fam, bottom_layers=1, top_layers=0, bottom_transition=2, transition_shape="linear"),
    )
    result = explain(path)
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    by_layer = {int(r[0]): r for r in rows}
    assert by_layer[0][1] == "language" and by_layer[5][1] == "task"
    # j-th transition layer from the language side gives the task expert j/(t+1)
    assert "0.333 task + 0.667 language" in " ".join(by_layer[1])
    assert "0.667 task + 0.333 language" in " ".join(by_layer[2])


def test_bad_recipe_is_refused_like_a_merge(families, tmp_path):
    fam = families("llama")
    path = write_recipe(tmp_path / "r.yaml", swap_recipe(fam, bottom_layers=9))
    assert_one_line_error(explain(path), "bottom_layers", "8 decoder layers")
    assert_one_line_error(explain(tmp_path / "missing.yaml"), "missing.yaml", "does not exist")


def test_magnitude_mix_and_bytes_before_and_after_the_statistics_are_cached(families, tmp_path, monkeypatch):
    from expectations import row_mav_mean
    from helpers import run_yaml_inprocess

    monkeypatch.setenv("MERGEKIT_LAYERSWAP_CACHE", str(tmp_path / "cache"))
    fam = families("llama")
    path = write_recipe(
        tmp_path / "r.yaml",
        swap_recipe(
            fam, base=True, weighting="magnitude", bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1
        ),
    )

    def size(model_dir, keep=lambda name: True):
        return sum(t.numel() * t.element_size() for n, t in load_tensors(model_dir).items() if keep(n))

    before = json.loads(explain(path, "--format", "json").output)
    # not cached yet: the magnitude pass reads every expert and the base whole
    assert before["bytes_to_read"] == {fam.task: size(fam.task), fam.lang: size(fam.lang), fam.base: size(fam.base)}
    assert before["layers"][2]["mix_is_final"] is False

    assert run_yaml_inprocess(path, tmp_path / "out").exit_code == 0
    after = json.loads(explain(path, "--format", "json").output)
    w_task, w_lang = 1 / row_mav_mean(fam.task, fam.base), 1 / row_mav_mean(fam.lang, fam.base)
    assert after["layers"][2]["mix_is_final"] is True
    assert after["layers"][2]["mix"]["task"] == pytest.approx(w_task / (w_task + w_lang), rel=1e-4)
    assert after["bytes_to_read"][fam.base] == 0
    # non-layer tensors are averaged (the default), so both experts read them
    assert after["bytes_to_read"][fam.lang] == size(fam.lang, lambda n: fam.arch.layer_of(n) in (None, 0, 1, 2, 6, 7))
