# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap analyze`` / ``suggest`` on small experts with planted changes.

The language expert moved only in its bottom 3 and top 1 layers (and its embeddings),
the task expert only in the middle; every expectation below is computed here from
the checkpoints themselves or written out by hand.
"""

import csv
import json
import os
import sys

import numpy as np
import pytest
import torch
import yaml
from checkpoints import ARCHS, load_tensors, make_model
from click.testing import CliRunner
from helpers import run_yaml_inprocess

LLAMA = ARCHS["llama"]  # 8 decoder layers
K_BOTTOM, M_TOP = 3, 1
LANG_NOISE = {0: 0.03, 1: 0.03, 2: 0.03, 7: 0.03, None: 0.01}  # None: embeddings, norm, lm_head
TASK_NOISE = {3: 0.02, 4: 0.02, 5: 0.02, 6: 0.02}
# layer 3 also moved in this language expert, a little less than in the task expert
# (relative change 1.6 vs 2.0, within the factor 1.5), so it should become a transition
LANG_T_NOISE = {0: 0.03, 1: 0.03, 2: 0.03, 3: 0.03, 7: 0.03}
# the test's own names for Llama's layer tensors, in the architecture's template order
LLAMA_PARAMETERS = {
    "input_layernorm.weight": "input_layernorm",
    "self_attn.q_proj.weight": "q",
    "self_attn.k_proj.weight": "k",
    "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o",
    "post_attention_layernorm.weight": "post_attention_layernorm",
    "mlp.up_proj.weight": "up",
    "mlp.gate_proj.weight": "gate",
    "mlp.down_proj.weight": "down",
}
LLAMA_COLUMNS = ["q", "k", "v", "o", "up", "gate", "down"]
VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 37)


def cli():
    from mergekit_layerswap.cli.main import main

    return main


def invoke(*args):
    return CliRunner().invoke(cli(), [str(a) for a in args])


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    base = make_model(LLAMA, str(root / "base"), seed=1)
    return {
        "root": root,
        "base": base,
        "lang": make_model(LLAMA, str(root / "lang"), seed=3, base_path=base, noise_by_layer=LANG_NOISE),
        "task": make_model(LLAMA, str(root / "task"), seed=2, base_path=base, noise_by_layer=TASK_NOISE),
        "lang_t": make_model(LLAMA, str(root / "lang_t"), seed=4, base_path=base, noise_by_layer=LANG_T_NOISE),
    }


@pytest.fixture(scope="module")
def analysed(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "out"
    result = invoke(
        "analyze",
        "--base",
        planted["base"],
        "--expert",
        planted["lang"],
        "--expert",
        planted["task"],
        "--out",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    return out, result


def expected_rows(expert_path, base_path):
    """tensor -> row MAVs, straight from the safetensors files."""
    expert, base = load_tensors(expert_path), load_tensors(base_path)
    rows = {}
    for name, tensor in expert.items():
        if tensor.is_floating_point() and tensor.ndim in (1, 2):
            delta = (tensor.double() - base[name].double()).abs()
            rows[name] = (delta.mean().reshape(1) if delta.ndim == 1 else delta.mean(dim=1)).numpy()
    return rows


def expected_parameter(name):
    layer = LLAMA.layer_of(name)
    if layer is None:
        return None, name
    return layer, LLAMA_PARAMETERS[name.split(".", 3)[3]]


@pytest.mark.parametrize("expert", ["lang", "task"])
def test_stats_match_row_mavs_computed_from_the_files(planted, analysed, expert):
    out, _ = analysed
    document = json.loads((out / "stats.json").read_text())
    rows = {r["tensor"]: r for r in document["rows"] if r["expert"] == expert}
    expected = expected_rows(planted[expert], planted["base"])
    assert set(rows) == set(expected)
    # auto: the 0.9 quantile over the rows of the 2-D layer matrices (the heatmap's rows)
    matrices = [v for n, v in expected.items() if expected_parameter(n)[0] is not None and n.endswith("_proj.weight")]
    auto = float(np.quantile(np.concatenate(matrices), 0.9))
    info = next(e for e in document["experts"] if e["name"] == expert)
    assert info["num_layers"] == 8 and info["columns"] == LLAMA_COLUMNS
    assert next(t for t in document["thresholds"] if t["label"] == "auto")["per_expert"][expert] == pytest.approx(
        auto, rel=1e-5
    )
    for name, values in expected.items():
        row = rows[name]
        assert (row["layer"], row["parameter"]) == expected_parameter(name)
        assert row["rows"] == values.size
        assert row["mean_row_mav"] == pytest.approx(values.mean(), rel=1e-5, abs=1e-12)
        assert row["max_row_mav"] == pytest.approx(values.max(), rel=1e-5, abs=1e-12)
        for label, threshold in (("1.9e-05", 1.9e-5), ("1e-05", 1e-5), ("auto", auto)):
            assert row["share_above"][label] == pytest.approx((values > threshold).mean(), abs=1e-9), (name, label)
    # the planted pattern itself: only the planted layers moved
    noise = LANG_NOISE if expert == "lang" else TASK_NOISE
    for name, row in rows.items():
        assert (row["mean_row_mav"] > 0) == (noise.get(row["layer"], 0) > 0), name
    planted_profile = [
        np.mean(np.concatenate([v for n, v in expected.items() if LLAMA.layer_of(n) == layer])) for layer in range(8)
    ]
    assert info["layer_profile"] == pytest.approx(planted_profile, rel=1e-5, abs=1e-12)


def test_csv_holds_the_same_rows_as_json(analysed):
    out, _ = analysed
    document = json.loads((out / "stats.json").read_text())
    with open(out / "stats.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(document["rows"]) > 0
    assert list(table[0])[-4:] == ["share_above_1.9e-05", "share_above_1e-05", "share_above_auto", "auto_threshold"]
    for line, row in zip(table, document["rows"]):
        assert line["tensor"] == row["tensor"] and line["expert"] == row["expert"]
        assert line["layer"] == ("" if row["layer"] is None else str(row["layer"]))
        assert float(line["mean_row_mav"]) == row["mean_row_mav"]
        assert float(line["share_above_auto"]) == row["share_above"]["auto"]
    non_layer = {line["tensor"] for line in table if line["layer"] == "" and line["expert"] == "lang"}
    assert non_layer == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def png(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def test_figures_have_the_documented_pixel_sizes(analysed):
    out, result = analysed
    sizes = {
        name: png(out / name).shape[:2]
        for name in ("lang_heatmap.png", "task_heatmap.png", "comparison_heatmap.png", "profile.png")
    }
    assert sizes == {
        "lang_heatmap.png": (800, 640),
        "task_heatmap.png": (800, 640),
        "comparison_heatmap.png": (800, 1050),  # 150 + 450 per expert
        "profile.png": (600, 800),
    }
    for name in sizes:
        assert f"wrote {out / name}" in result.output


def has_colour(image, rgb):
    pixels = np.round(image[..., :3] * 255).astype(int)
    return bool(np.any(np.all(np.abs(pixels - np.array(rgb)) <= 2, axis=-1)))


def test_heatmap_threshold_colours_changed_and_unchanged_layers(planted, tmp_path):
    # every planted row moves by ~0.8 x noise >> 1e-3, unchanged rows by exactly 0
    out = tmp_path / "single"
    result = invoke(
        "analyze",
        "--base",
        planted["base"],
        "--expert",
        planted["task"],
        "--out",
        out,
        "--heatmap-threshold",
        "1e-3",
        "--threshold",
        "2e-3",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    image = png(out / "task_heatmap.png")
    assert has_colour(image, VIRIDIS_HIGH) and has_colour(image, VIRIDIS_LOW)
    assert not (out / "comparison_heatmap.png").exists()  # one expert: nothing to compare
    with open(out / "stats.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [k for k in table[0] if k.startswith("share_above")] == ["share_above_0.002", "share_above_0.001"]
    for line in table:
        moved = line["layer"] != "" and int(line["layer"]) in TASK_NOISE
        assert float(line["share_above_0.001"]) == (1.0 if moved else 0.0), line["tensor"]


def suggested(result, path):
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(open(path))
    p = recipe["parameters"]
    return recipe, (p["bottom_layers"], p["top_layers"], p["bottom_transition"], p["top_transition"])


@pytest.mark.parametrize("clip", [False, True])
def test_suggest_recovers_the_planted_zones(planted, tmp_path, clip):
    path = tmp_path / "recipe.yaml"
    args = [
        "suggest",
        "--base",
        planted["base"],
        "--task",
        planted["task"],
        "--language",
        planted["lang"],
        "--out",
        path,
        "--quiet",
    ] + ([] if clip else ["--no-clip"])
    result = invoke(*args)
    recipe, zones = suggested(result, path)
    assert zones == (K_BOTTOM, M_TOP, 0, 0)  # 3 and 1 lie inside the paper's ranges: clipping changes nothing
    assert "clipped" not in result.output
    roles = {m["model"]: m["parameters"]["role"] for m in recipe["models"]}
    assert roles == {os.path.abspath(planted["task"]): "task", os.path.abspath(planted["lang"]): "language"}
    assert recipe["base_model"] == os.path.abspath(planted["base"])
    assert recipe["merge_method"] == "layer_swap"
    # the reasoning table: one line per layer, top first
    table = [line.split() for line in result.output.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(cells[0]) for cells in table] == list(range(7, -1, -1))


def test_suggest_finds_the_transition_layer_and_clips_it_into_range(planted, tmp_path):
    raw = tmp_path / "raw.yaml"
    result = invoke(
        "suggest",
        "--base",
        planted["base"],
        "--task",
        planted["task"],
        "--language",
        planted["lang_t"],
        "--out",
        raw,
        "--quiet",
        "--no-clip",
    )
    assert suggested(result, raw)[1] == (3, 1, 1, 0)
    clipped = tmp_path / "clipped.yaml"
    result = invoke(
        "suggest",
        "--base",
        planted["base"],
        "--task",
        planted["task"],
        "--language",
        planted["lang_t"],
        "--out",
        clipped,
        "--quiet",
    )
    assert suggested(result, clipped)[1] == (3, 1, 1, 0)


def test_suggested_recipe_runs_with_mergekit_yaml(planted, tmp_path):
    path = tmp_path / "recipe.yaml"
    result = invoke(
        "suggest",
        "--base",
        planted["base"],
        "--task",
        planted["task"],
        "--language",
        planted["lang"],
        "--out",
        path,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    merged = run_yaml_inprocess(path, tmp_path / "merged")
    assert merged.exit_code == 0, merged.output
    out, task, lang = (load_tensors(p) for p in (tmp_path / "merged", planted["task"], planted["lang"]))
    name = "model.layers.{}.self_attn.q_proj.weight"
    for layer in range(8):
        source = lang if layer < K_BOTTOM or layer >= 8 - M_TOP else task
        assert torch.equal(out[name.format(layer)], source[name.format(layer)]), layer


def test_suggest_prints_the_recipe_to_stdout_without_out(planted):
    result = CliRunner().invoke(
        cli(),
        ["suggest", "--base", planted["base"], "--task", planted["task"], "--language", planted["lang"], "--quiet"],
    )
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load(result.stdout)
    assert recipe["parameters"]["bottom_layers"] == K_BOTTOM


# ---------------------------------------------------------------- the rule alone


def zones_of(suggestion):
    z = suggestion.zones
    return z.bottom_layers, z.top_layers, z.bottom_transition, z.top_transition


def test_rule_on_hand_computed_profiles():
    from mergekit_layerswap.tools.suggest import suggest_zones

    # r_lang = [1.714, 1.143, 0.571, 0.571], r_task = [0.667, 0.667, 0.667, 2.0]:
    # layers 0-1 language-led, layer 2 within x1.5 (0.571 vs 0.667), layer 3 not
    raw = suggest_zones([3, 2, 1, 1], [1, 1, 1, 3], clip=False)
    assert zones_of(raw) == (2, 0, 1, 0)
    # r_lang = [1.2, 0.6, 1.2], r_task = [0.75, 1.5, 0.75]: b = 1 and u = 1 around a task layer
    assert zones_of(suggest_zones([2, 1, 2], [1, 2, 1], clip=False)) == (1, 1, 0, 0)
    # language-led from layer 0 up to the top layer's neighbour: the bottom zone takes
    # them, the top zone none (both r average 1, so not every layer can be language-led)
    assert zones_of(suggest_zones([5, 5, 5, 5, 5], [1, 1, 1, 1, 6], clip=False))[:2] == (4, 0)


def test_clipping_is_reported_and_the_zones_still_fit():
    from mergekit_layerswap.tools.suggest import suggest_zones

    # equal profiles: no language-led layer, both boundary layers are transitions
    raw = suggest_zones([1, 1, 1, 1], [1, 1, 1, 1], clip=False)
    assert zones_of(raw) == (0, 0, 1, 1) and raw.notes == []
    clipped = suggest_zones([1, 1, 1, 1], [1, 1, 1, 1])
    # b 0 -> 3 (paper range 3..5), then 3+1+1 > 4 layers: t_u gives way first
    assert zones_of(clipped) == (3, 0, 1, 0)
    assert len(clipped.notes) == 2 and "bottom_layers 0 -> 3" in clipped.notes[0]
    assert "top_transition 1 -> 0" in clipped.notes[1]
    # 32 layers, language-led 0-8 and 31: the rule says b=9, the paper's range stops at 5
    wide = suggest_zones([9] * 9 + [1] * 22 + [9], [1] * 9 + [9] * 22 + [1])
    assert (wide.raw.bottom_layers, wide.raw.top_layers) == (9, 1)
    assert zones_of(wide) == (5, 1, 0, 0) and wide.notes == ["bottom_layers 9 -> 5 (the paper searched 3..5)"]


# ---------------------------------------------------------------- bad input


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in result.output, result.output


def test_missing_expert(planted, tmp_path):
    result = invoke("analyze", "--base", planted["base"], "--out", tmp_path / "out")
    assert_one_line_error(result, "Missing option '--expert'")
    assert not (tmp_path / "out").exists()


def test_unknown_model_path(planted, tmp_path):
    missing = tmp_path / "no-such-model"
    result = invoke("analyze", "--base", planted["base"], "--expert", missing, "--out", tmp_path / "out")
    assert_one_line_error(result, "--expert", "no such model directory", str(missing))
    assert not (tmp_path / "out").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("analyze", "--base", planted["base"], "--expert", empty, "--out", tmp_path / "out")
    assert_one_line_error(result, "--expert", "cannot read config.json", str(empty))
    assert not (tmp_path / "out").exists()
    result = invoke("suggest", "--base", missing, "--task", planted["task"], "--language", planted["lang"])
    assert_one_line_error(result, "--base", str(missing))


@pytest.mark.parametrize("value", ["-1", "0", "abc", "nan"])
def test_bad_threshold(planted, tmp_path, value):
    result = invoke(
        "analyze",
        "--base",
        planted["base"],
        "--expert",
        planted["lang"],
        "--out",
        tmp_path / "out",
        "--threshold",
        value,
    )
    assert_one_line_error(result, "--threshold", "positive number")
    assert not (tmp_path / "out").exists()


def test_base_given_as_expert(planted, tmp_path):
    result = invoke("analyze", "--base", planted["base"], "--expert", planted["base"], "--out", tmp_path / "out")
    assert_one_line_error(result, "--expert", "is also --base")
    result = invoke("suggest", "--base", planted["base"], "--task", planted["lang"], "--language", planted["lang"])
    assert_one_line_error(result, "given twice")


def test_other_architecture(planted, tmp_path):
    other = make_model(ARCHS["gpt2"], str(tmp_path / "gpt2"), seed=5)
    result = invoke("analyze", "--base", planted["base"], "--expert", other, "--out", tmp_path / "out")
    assert_one_line_error(result, "architectures differ")
    assert not (tmp_path / "out").exists()


def test_missing_matplotlib(planted, tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = invoke("analyze", "--base", planted["base"], "--expert", planted["lang"], "--out", tmp_path / "out")
    assert_one_line_error(result, "pip install 'mergekit-layerswap[analysis]'")
    assert not (tmp_path / "out").exists()
