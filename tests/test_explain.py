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


def _copy_family(fam, root):
    """Private copies of a family's checkpoints (the session's are shared by other tests),
    as an object ``swap_recipe`` takes."""
    import shutil
    from types import SimpleNamespace

    return SimpleNamespace(
        **{role: str(shutil.copytree(getattr(fam, role), root / role)) for role in ("base", "task", "lang")}
    )


def _say_parent(model_dir, name_or_path=None, card_base=None):
    """Write the lineage a training script or a model card would record."""
    import os

    if name_or_path is not None:
        config_path = os.path.join(model_dir, "config.json")
        with open(config_path) as handle:
            config = json.load(handle)
        config["_name_or_path"] = name_or_path
        with open(config_path, "w") as handle:
            json.dump(config, handle)
    if card_base is not None:
        with open(os.path.join(model_dir, "README.md"), "w") as handle:
            handle.write(f"---\nlicense: other\nbase_model:\n- {card_base}\n---\n# a fine-tune\n")


def _warnings(result):
    """The warning lines of an explain run that succeeded (a warning is never a refusal)."""
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if line.startswith("warning:")]


def test_warns_when_an_expert_names_another_base_than_base_model(families, tmp_path):
    paths = _copy_family(families("llama"), tmp_path)
    _say_parent(paths.task, name_or_path=paths.base)  # fine-tuned from the recipe's base: fine
    _say_parent(paths.lang, card_base="meta-llama/Llama-3.1-8B-Instruct")
    path = write_recipe(tmp_path / "r.yaml", swap_recipe(paths, base=True))
    [line] = _warnings(explain(path))
    assert "models[1]" in line and paths.lang in line
    assert "meta-llama/Llama-3.1-8B-Instruct (model card base_model)" in line
    assert f"not base_model {paths.base}" in line
    assert json.loads(explain(path, "--format", "json").output)["warnings"] == [line]

    _say_parent(paths.lang, name_or_path="/scratch/run7/BASE")  # the config agrees, the card does not
    [line] = _warnings(explain(path))
    assert "Llama-3.1-8B-Instruct (model card base_model)" in line and "_name_or_path" not in line
    _say_parent(paths.lang, card_base=paths.base.upper())  # same last component, other case/dir
    _say_parent(paths.lang, name_or_path=paths.base)
    assert _warnings(explain(path)) == []


def test_warns_when_experts_name_different_bases_without_base_model(families, tmp_path):
    paths = _copy_family(families("qwen2"), tmp_path)
    path = write_recipe(tmp_path / "r.yaml", swap_recipe(paths, bottom_layers=2, top_layers=1))
    assert _warnings(explain(path)) == []  # nothing recorded: nothing to say
    _say_parent(paths.task, name_or_path="meta-llama/Meta-Llama-3.1-8B")
    _say_parent(paths.lang, name_or_path="/models/llama-3.1-8b")  # a local download, renamed repo
    assert _warnings(explain(path)) == []
    _say_parent(paths.lang, name_or_path="meta-llama/Llama-3.1-8B-Instruct")
    [line] = _warnings(explain(path))
    assert "experts name different bases" in line
    assert "meta-llama/Meta-Llama-3.1-8B (config.json _name_or_path)" in line
    assert "meta-llama/Llama-3.1-8B-Instruct (config.json _name_or_path)" in line


def test_a_resaved_base_is_recognised_by_the_name_it_was_loaded_from(families, tmp_path):
    paths = _copy_family(families("llama"), tmp_path)
    _say_parent(paths.base, name_or_path="meta-llama/Llama-3.1-8B")  # a download, saved again
    _say_parent(paths.task, card_base="meta-llama/Llama-3.1-8B")
    _say_parent(paths.lang, name_or_path="meta-llama/Meta-Llama-3.1-8B")
    assert _warnings(explain(write_recipe(tmp_path / "r.yaml", swap_recipe(paths, base=True)))) == []


def test_lineage_of_a_hub_model_comes_from_the_local_cache_only(tmp_path, monkeypatch):
    """A hub expert's config.json and card are read from the Hugging Face cache when they are
    there (a downloaded model), and nothing is fetched when they are not."""
    import huggingface_hub.constants
    from mergekit.common import ModelReference

    from mergekit_layerswap.tools.lineage import claimed_bases

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--math-expert" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--org--math-expert" / "refs").mkdir()
    (cache / "models--org--math-expert" / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.1-8B"}))
    (snapshot / "README.md").write_text("---\nbase_model: meta-llama/Llama-3.1-8B-Instruct\n---\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert claimed_bases(ModelReference.parse("org/math-expert")) == {
        "meta-llama/Llama-3.1-8B": "config.json _name_or_path",
        "meta-llama/Llama-3.1-8B-Instruct": "model card base_model",
    }
    assert claimed_bases(ModelReference.parse("org/not-downloaded")) == {}
