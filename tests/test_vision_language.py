# SPDX-License-Identifier: LGPL-3.0-only
"""Vision-language models: the rule places the text decoder's layers (mergekit's
``text_decoder`` module); the vision tower and projector follow ``vision``. The vision
towers have their own ``layers.N``: they must never be taken for decoder layers.
Architectures the rule cannot describe are refused in one line."""

import json
import os

import pytest
from checkpoints import load_tensors, model_tensors
from click.testing import CliRunner
from expectations import check_swap, row_mav_mean
from helpers import merge, refused, swap_recipe, write_recipe

ZONED = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
SOURCES = "LLBTBL"  # 6 text layers, written out by hand


@pytest.mark.parametrize("arch", ["gemma3vl", "qwen2_5_vl", "mistral3", "llama4"])
def test_text_layers_follow_the_rule_and_the_tower_the_language_expert(families, tmp_path, arch):
    fam = families(arch)
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 3.0}},
    ]
    out = merge(tmp_path, swap_recipe(fam, models=models, **ZONED))
    counts = check_swap(out, fam, SOURCES, w_task=1.0, w_lang=3.0, vision="L")
    assert counts["L"] and counts["T"] and counts["B"]
    stored = load_tensors(out)
    assert any(fam.arch.is_vision(n) and (".layers.1." in n or ".blocks.1." in n) for n in stored)
    model_tensors(fam.arch, out)  # transformers' own class loads every weight, none left over
    with open(os.path.join(out, "config.json")) as handle:
        assert (
            json.load(handle)["architectures"]
            == json.load(open(os.path.join(fam.lang, "config.json")))["architectures"]
        )
    card = open(os.path.join(out, "README.md")).read()
    assert "Vision tower and projector" in card and "`vision: language`" in card


@pytest.mark.parametrize("vision,letter", [("task", "T"), ("average", "B")])
def test_vision_parameter(families, tmp_path, vision, letter):
    fam = families("qwen2_5_vl")
    out = merge(tmp_path, swap_recipe(fam, vision=vision, non_layer="language", **ZONED))
    check_swap(out, fam, SOURCES, non_layer="L", vision=letter)


def test_llama4_moe_text_decoder_with_magnitude_weights(families, tmp_path):
    """Llama 4's text decoder mixes mixture-of-experts layers (router, four routed experts
    stored fused 3-D, a shared expert) with dense ones; each is placed by the rule whole,
    the vision model and projector averaged, all weighted by magnitude. Compared as
    transformers' own class loads each checkpoint."""
    fam = families("llama4")
    lang = load_tensors(fam.lang)
    prefix = fam.arch.layer_prefix
    for layer in (1, 2, 3, 5):  # moe_layers: a language, a blended and a task layer among them
        experts = lang[prefix.format(layer) + "feed_forward.experts.gate_up_proj"]
        assert experts.dim() == 3 and experts.shape[0] == 4
        assert prefix.format(layer) + "feed_forward.router.weight" in lang
        assert prefix.format(layer) + "feed_forward.shared_expert.down_proj.weight" in lang
    for layer in (0, 4):  # dense, one kept and one blended
        assert prefix.format(layer) + "feed_forward.up_proj.weight" in lang
    m_task, m_lang = row_mav_mean(fam.task, fam.base), row_mav_mean(fam.lang, fam.base)
    out = merge(tmp_path, swap_recipe(fam, base=True, weighting="magnitude", vision="average", **ZONED))
    counts = check_swap(
        out, fam, SOURCES, w_task=1 / m_task, w_lang=1 / m_lang, rtol=1e-4, model_layout=True, vision="B"
    )
    assert counts["L"] and counts["T"] and counts["B"]
    with open(os.path.join(out, "config.json")) as handle:
        text = json.load(handle)["text_config"]
    assert text["moe_layers"] == [1, 2, 3, 5] and text["no_rope_layers"] == [1, 1, 0, 1, 1, 0]


def test_explain_reports_the_vision_policy_and_bytes(families, tmp_path):
    from mergekit_layerswap.cli.main import main

    fam = families("mistral3")
    path = write_recipe(tmp_path / "r.yaml", swap_recipe(fam, vision="task", non_layer="language", **ZONED))
    result = CliRunner().invoke(main, ["explain", path, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["num_layers"] == 6 and report["vision"] == "task" and report["vision_mix"] == {"task": 1.0}

    def size(path, keep):
        return sum(t.numel() * t.element_size() for n, t in load_tensors(path).items() if keep(n))

    layer, vision = fam.arch.layer_of, fam.arch.is_vision
    assert report["bytes_to_read"][fam.task] == size(fam.task, lambda n: vision(n) or 2 <= (layer(n) or -1) <= 4)
    lang_layers = (0, 1, 2, 4, 5)
    assert report["bytes_to_read"][fam.lang] == size(
        fam.lang, lambda n: not vision(n) and (layer(n) is None or layer(n) in lang_layers)
    )
    text = CliRunner().invoke(main, ["explain", path]).output
    assert "vision tower and projector" in text and ": task" in text


def _config_only(tmp_path, name, config):
    """A model directory with only config.json: the refusals come before any weight is read."""
    path = tmp_path / name
    config.save_pretrained(path)
    return str(path)


def _refusal_recipe(task, lang):
    return {
        "merge_method": "layer_swap",
        "models": [
            {"model": task, "parameters": {"role": "task"}},
            {"model": lang, "parameters": {"role": "language"}},
        ],
    }


def _mllama():
    from transformers import MllamaConfig

    return MllamaConfig(text_config={"num_hidden_layers": 4, "cross_attention_layers": [1, 3]})


def _qwen2_vl():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config={"num_hidden_layers": 4})


def _qwen3_vl():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config={"num_hidden_layers": 4})


def _t5():
    from transformers import T5Config

    return T5Config(num_layers=2, num_decoder_layers=2)


@pytest.mark.parametrize(
    "make,words",
    [
        (_mllama, ("MllamaForConditionalGeneration", "cross-attention")),
        (_qwen2_vl, ("Qwen2VLForConditionalGeneration", "text_config")),
        (_qwen3_vl, ("Qwen3VLForConditionalGeneration", "deepstack")),
        (_t5, ("T5ForConditionalGeneration", "cross-attend")),
    ],
    ids=["mllama", "qwen2_vl", "qwen3_vl", "t5"],
)
def test_architectures_the_rule_cannot_describe_are_refused(tmp_path, make, words):
    config = make()
    if not config.architectures:
        config.architectures = [words[0]]
    task, lang = _config_only(tmp_path, "task", config), _config_only(tmp_path, "lang", config)
    message = refused(tmp_path, _refusal_recipe(task, lang), *words)
    assert "layer_swap cannot describe it" in message
