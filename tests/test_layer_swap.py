# SPDX-License-Identifier: LGPL-3.0-only
"""layer_swap merges through mergekit-yaml's own command, checked tensor by tensor."""

import json
import os

import pytest
import torch
from checkpoints import load_tensors
from expectations import check_swap, row_mav_mean
from helpers import Family, merge, run_yaml_inprocess, swap_recipe, write_recipe

# expected layer sources, written out by hand: b=2, u=1, t_b=1, t_u=1
ZONED = dict(bottom_layers=2, top_layers=1, bottom_transition=1, top_transition=1)
ZONED_SOURCES = {8: "LLBTTTBL", 6: "LLBTBL"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gpt2", "phi3"])
def test_zones_and_weights_on_each_architecture(families, tmp_path, arch):
    fam = families(arch)
    models = [
        {"model": fam.task, "parameters": {"role": "task", "weight": 1.0}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": 3.0}},
    ]
    out = merge(tmp_path, swap_recipe(fam, models=models, **ZONED))
    counts = check_swap(out, fam, ZONED_SOURCES[fam.arch.num_layers], w_task=1.0, w_lang=3.0)
    assert counts["L"] and counts["T"] and counts["B"]
    if fam.arch.tied:  # tied embeddings stay tied: no lm_head is written
        assert "lm_head.weight" not in load_tensors(out)


def test_defaults_are_the_papers(families, tmp_path):
    fam = families("llama")  # 8 layers; b=5, u=2: 0-4 language, 5 task, 6-7 language
    out = merge(tmp_path, swap_recipe(fam))
    check_swap(out, fam, "LLLLLTLL", non_layer="B")


@pytest.mark.parametrize("non_layer,letter", [("language", "L"), ("task", "T"), ("average", "B")])
def test_non_layer_policy(families, tmp_path, non_layer, letter):
    fam = families("qwen2")
    out = merge(tmp_path, swap_recipe(fam, non_layer=non_layer, **ZONED))
    check_swap(out, fam, ZONED_SOURCES[6], non_layer=letter)


def test_outer_transition_without_swapped_layers(families, tmp_path):
    fam = families("qwen2")  # L=6, b=1, u=0, t_u=2: the outermost two layers are blends
    out = merge(tmp_path, swap_recipe(fam, bottom_layers=1, top_layers=0, top_transition=2))
    check_swap(out, fam, "LTTTBB")


def test_no_transition_and_zone_filling_every_layer(families, tmp_path):
    fam = families("qwen2")
    out = merge(tmp_path, swap_recipe(fam, bottom_layers=3, top_layers=3))
    check_swap(out, fam, "LLLLLL")


def test_magnitude_weighting(families, tmp_path):
    fam = families("llama")
    out = merge(tmp_path, swap_recipe(fam, base=True, weighting="magnitude", **ZONED))
    m_task = row_mav_mean(fam.task, fam.base)
    m_lang = row_mav_mean(fam.lang, fam.base)
    assert m_lang > 2 * m_task  # the generated language expert moved further
    check_swap(out, fam, ZONED_SOURCES[8], w_task=1 / m_task, w_lang=1 / m_lang, rtol=1e-4)
    card = open(os.path.join(out, "README.md")).read()
    assert "arxiv.org/abs/2410.01335" in card and f"{1 / m_task:.4g}"[:4] in card
    # the base is never mixed in: no output tensor equals the base's
    base = load_tensors(fam.base)
    for name, tensor in load_tensors(out).items():
        assert not torch.equal(tensor, base[name])


def test_magnitude_statistics_are_cached(families, tmp_path, monkeypatch):
    import mergekit_layerswap.adapter.magnitude as magnitude

    fam = families("mistral")
    recipe = swap_recipe(fam, base=True, weighting="magnitude", **ZONED)
    first = merge(tmp_path / "a", recipe) if not (tmp_path / "a").mkdir() else None
    calls = []
    monkeypatch.setattr(magnitude, "compute_magnitudes", lambda *a, **k: calls.append(a) or 1 / 0)
    (tmp_path / "b").mkdir()
    second = merge(tmp_path / "b", recipe)  # from the cache: compute_magnitude is not called
    assert calls == []
    a, b = load_tensors(first), load_tensors(second)
    assert all(torch.equal(a[name], b[name]) for name in a)
    monkeypatch.setenv("MERGEKIT_LAYERSWAP_NO_CACHE", "1")
    (tmp_path / "c").mkdir()
    result = run_yaml_inprocess(write_recipe(tmp_path / "c" / "r.yaml", recipe), tmp_path / "c" / "out")
    assert result.exit_code != 0 and len(calls) == 1  # the escape hatch recomputes


def test_weight_gradient_per_layer(families, tmp_path):
    fam = families("qwen2")  # gradient [1, 6] over 6 layers: t = layer / 5
    models = [
        {"model": fam.task, "parameters": {"role": "task"}},
        {"model": fam.lang, "parameters": {"role": "language", "weight": [1.0, 6.0]}},
    ]
    out = merge(
        tmp_path, swap_recipe(fam, models=models, bottom_layers=1, top_layers=1, bottom_transition=2, top_transition=2)
    )

    def w_lang(name, layer):
        return 1.0 if layer is None else 1.0 + 5.0 * layer / 5

    check_swap(out, fam, "LBBBBL", w_lang=w_lang)


def test_weight_filter_per_module(families, tmp_path):
    fam = families("llama")
    models = [
        {"model": fam.task, "parameters": {"role": "task"}},
        {
            "model": fam.lang,
            "parameters": {"role": "language", "weight": [{"filter": "self_attn", "value": 4.0}, {"value": 1.0}]},
        },
    ]
    out = merge(tmp_path, swap_recipe(fam, models=models, **ZONED))
    check_swap(out, fam, ZONED_SOURCES[8], w_lang=lambda name, layer: 4.0 if "self_attn" in name else 1.0)


def test_output_metadata_comes_from_the_language_expert(families, tmp_path):
    fam = families("llama")
    out = merge(tmp_path, swap_recipe(fam, base=True, weighting="magnitude"))
    assert json.load(open(os.path.join(out, "generation_config.json")))["marker"] == "lang"
    assert "lang" in open(os.path.join(out, "chat_template.jinja")).read()
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["num_hidden_layers"] == 8 and config["dtype"] == "float32"


def test_chat_template_option_overrides(families, tmp_path):
    fam = families("llama")
    recipe = swap_recipe(fam, **ZONED)
    recipe["chat_template"] = "chatml"
    out = merge(tmp_path, recipe)
    assert "im_start" in open(os.path.join(out, "chat_template.jinja")).read()


def test_bfloat16_checkpoints(tmp_path, families):
    from checkpoints import ARCHS, make_model

    arch, base = ARCHS["mistral"], families("mistral").base
    fam = Family(
        arch=arch,
        base=base,
        task=make_model(arch, str(tmp_path / "task16"), 4, base_path=base, dtype=torch.bfloat16),
        lang=make_model(arch, str(tmp_path / "lang16"), 5, base_path=base, dtype=torch.bfloat16),
    )
    recipe = swap_recipe(fam, **ZONED)
    recipe["dtype"] = "bfloat16"
    out = merge(tmp_path, recipe)
    assert all(t.dtype == torch.bfloat16 for t in load_tensors(out).values())
    check_swap(out, fam, ZONED_SOURCES[6], atol=1e-2, rtol=1e-2)
    # the blend is rounded once from a float32 average, not accumulated in bfloat16
    task, lang, merged = load_tensors(fam.task), load_tensors(fam.lang), load_tensors(out)
    name = "model.embed_tokens.weight"
    exact = ((task[name].float() + lang[name].float()) / 2).bfloat16()
    assert (merged[name] != exact).float().mean() < 0.01


def test_out_dtype_casts_swapped_tensors_once(families, tmp_path):
    fam = families("qwen2")
    recipe = swap_recipe(fam, **ZONED)
    recipe["out_dtype"] = "bfloat16"
    out = merge(tmp_path, recipe)
    merged, lang = load_tensors(out), load_tensors(fam.lang)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert merged[name].dtype == torch.bfloat16 and torch.equal(merged[name], lang[name].bfloat16())


def test_sharded_inputs_and_outputs(tmp_path, families):
    from checkpoints import ARCHS, make_model

    arch, base = ARCHS["llama"], families("llama").base
    fam = Family(
        arch=arch,
        base=base,
        task=make_model(arch, str(tmp_path / "task"), 6, base_path=base, max_shard_size="40KB"),
        lang=make_model(arch, str(tmp_path / "lang"), 7, base_path=base, max_shard_size="40KB"),
    )
    assert os.path.exists(os.path.join(fam.task, "model.safetensors.index.json"))
    out = merge(tmp_path, swap_recipe(fam, **ZONED), "--out-shard-size", "20K")
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    check_swap(out, fam, ZONED_SOURCES[8])


def test_reading_only_needed_inputs_changes_nothing(families, tmp_path, monkeypatch):
    fam = families("gemma2")
    recipe = swap_recipe(fam, base=True, weighting="magnitude", **ZONED)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    optimised = merge(tmp_path / "a", recipe)
    monkeypatch.setenv("MERGEKIT_LAYERSWAP_READ_ALL", "1")
    unoptimised = merge(tmp_path / "b", recipe)
    a, b = load_tensors(optimised), load_tensors(unoptimised)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _as_pickled(src, dst):
    """Re-save a checkpoint as a pickled pytorch_model.bin (what --lazy-unpickle reads)."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_tensors(src), os.path.join(dst, "pytorch_model.bin"))
    return str(dst)


def test_pickled_inputs_with_lazy_unpickle(families, tmp_path):
    src = families("llama")
    fam = Family(
        arch=src.arch,
        base=src.base,
        task=_as_pickled(src.task, tmp_path / "task"),
        lang=_as_pickled(src.lang, tmp_path / "lang"),
    )
    out = merge(tmp_path, swap_recipe(fam, **ZONED), "--lazy-unpickle")
    check_swap(out, src, ZONED_SOURCES[8])


def test_async_writer_and_single_thread(families, tmp_path):
    fam = families("llama")
    out = merge(tmp_path, swap_recipe(fam, **ZONED), "--async-write", "-j", "1", "--out-shard-size", "50K")
    check_swap(out, fam, ZONED_SOURCES[8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("gpu_options", [("--cuda",), ("--cuda", "--read-to-gpu"), ("--cuda", "--low-cpu-memory")])
def test_cuda_matches_cpu(families, tmp_path, gpu_options):
    fam = families("llama")
    recipe = swap_recipe(fam, base=True, weighting="magnitude", **ZONED)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "gpu").mkdir()
    cpu = load_tensors(merge(tmp_path / "cpu", recipe))
    gpu = load_tensors(merge(tmp_path / "gpu", recipe, *gpu_options))
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert torch.allclose(cpu[name], gpu[name], atol=1e-6), name


def test_model_card_describes_the_swap(families, tmp_path):
    fam = families("llama")
    out = merge(tmp_path, swap_recipe(fam, base=True, weighting="magnitude", **ZONED))
    card = open(os.path.join(out, "README.md")).read()
    for row in (
        "| 0-1 | language expert |",
        "| 2 | blend of task and language experts |",
        "| 3-5 | task expert |",
        "| 6 | blend of task and language experts |",
        "| 7 | language expert |",
    ):
        assert row in card, row
    assert f"| task | {fam.task} | 1.0 |" in card and f"| language | {fam.lang} | 1.0 |" in card
    # the magnitude reference is not presented as a base the model was merged on
    assert "none of its weights are in this model" in card and "as a base" not in card
    assert "layer-swapping" in card and "weighting: magnitude" in card.split("## Recipe")[1]
    assert open(os.path.join(out, "mergekit_config.yml")).read().startswith("merge_method: layer_swap")


def test_tokenizer_option_aligns_different_vocabularies(families, tmp_path):
    from checkpoints import ARCHS, make_model, variant

    fam = families("llama")
    # tokens w0..w95 as in the others, plus w96..w99
    lang = make_model(variant(ARCHS["llama"], "llama100", vocab_size=100), str(tmp_path / "lang100"), seed=31)
    models = [{"model": fam.task, "parameters": {"role": "task"}}, {"model": lang, "parameters": {"role": "language"}}]
    recipe = swap_recipe(fam, models=models, **ZONED)
    recipe["tokenizer"] = {"source": fam.task}
    out = load_tensors(merge(tmp_path, recipe))
    task, lang_t = load_tensors(fam.task), load_tensors(lang)
    # the task tokenizer's 96 tokens keep their ids in both: embeddings align row for row
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape[0] == 96
        assert torch.allclose(out[name], (task[name] + lang_t[name][:96]) / 2, atol=1e-6)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], lang_t["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.4.mlp.up_proj.weight"], task["model.layers.4.mlp.up_proj.weight"])
