# SPDX-License-Identifier: LGPL-3.0-only
"""The shipped recipes under recipes/ parse, validate and say what the paper says.

Nothing is downloaded: every model id of a layer_swap recipe is pointed at a local
directory that holds only a config.json of the Llama-3.1-8B shape, which is all
``planning.prepare`` (the validation a merge runs first) reads.
"""

from __future__ import annotations

from pathlib import Path

import mergekit.merge_methods.registry as registry
import pytest
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import BasePolicy

from mergekit_layerswap.adapter.planner import prepare
from mergekit_layerswap.core.layers import BLEND, LANGUAGE, TASK, SwapZones, layer_table, role_shares
from mergekit_layerswap.core.parameters import DEFAULTS, ZONE_PARAMETERS

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEMO = "demo_swh_math.yaml"  # local paths built by the demo: parsed only

BASE = "meta-llama/Llama-3.1-8B"
MATH_EXPERT = "nvidia/OpenMath2-Llama3.1-8B"
LANGUAGE_EXPERTS = {
    "swh": "Lugha-Llama/Lugha-Llama-8B-wura",
    "tel": "MaLA-LM/emma-500-llama3.1-8b-bi",
    "ben": "BanglaLLM/BanglaLLama-3.1-8b-no-pretrain-bangla-alpaca-orca-instruct-v0.0.1",
    "jpn": "tokyotech-llm/Llama-3.1-Swallow-8B-Instruct-v0.3",
}

# The paper's per-language finding, as (b, u, t_b, t_u):
#   Swahili, Bengali: the default configuration;
#   Telugu (lowest resource): the most language layers of the searched range;
#   Japanese: the fewest (b=3, u=0).
PAPER_RULE = {
    "swh": (5, 2, 0, 0),
    "ben": (5, 2, 0, 0),
    "tel": (5, 2, 1, 1),
    "jpn": (3, 0, 0, 0),
}
SEARCHED = {"b": {3, 4, 5}, "u": {0, 1, 2}, "t": {0, 1, 2}}

# recipe -> (language, (b, u, t_b, t_u), weighting)
EXPECTED = {}
for _lang, (_b, _u, _tb, _tu) in PAPER_RULE.items():
    EXPECTED[f"{_lang}_math.yaml"] = (_lang, (_b, _u, _tb, _tu), "uniform")
    EXPECTED[f"{_lang}_transition.yaml"] = (_lang, (_b, _u, 1, 1), "magnitude")
EXPECTED["swh_bottom_only.yaml"] = ("swh", (5, 0, 0, 0), "uniform")
EXPECTED["swh_top_only.yaml"] = ("swh", (0, 2, 0, 0), "uniform")
EXPECTED["baselines/swh_magnitude_soup.yaml"] = ("swh", (0, 0, 16, 16), "magnitude")

BASELINES = {
    "baselines/swh_soup.yaml": "linear",
    "baselines/swh_ties.yaml": "ties",
}

LLAMA_31_8B = dict(
    architectures=["LlamaForCausalLM"],
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)


def _relative(path: Path) -> str:
    return path.relative_to(RECIPES).as_posix()


def _recipe_files():
    return sorted(p for p in RECIPES.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _documents():
    """(id, relative path, document) for every YAML document under recipes/;
    multi-document files (mergekit-multi) give one entry per document."""
    found = []
    for path in _recipe_files():
        with open(path) as handle:
            docs = [d for d in yaml.safe_load_all(handle) if d is not None]
        for index, doc in enumerate(docs):
            label = _relative(path) if len(docs) == 1 else f"{_relative(path)}#{index}"
            found.append(pytest.param(_relative(path), doc, id=label))
    return found


DOCUMENTS = _documents()


def _config(doc: dict) -> MergeConfiguration:
    doc = dict(doc)
    doc.pop("name", None)  # mergekit-multi names its documents; not a config field
    return MergeConfiguration.model_validate(doc)


def _is_swap(rel: str, doc: dict) -> bool:
    return doc.get("merge_method") == "layer_swap" and rel != DEMO


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """model id -> a local directory with only a Llama-3.1-8B-shaped config.json."""
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("llama31-8b-configs")
    made = {}

    def path_for(model_id: str) -> str:
        if model_id not in made:
            target = root / f"m{len(made)}"
            LlamaConfig(**LLAMA_31_8B).save_pretrained(str(target))
            made[model_id] = str(target)
        return made[model_id]

    return path_for


def _localised(doc: dict, path_for) -> tuple[dict, dict]:
    """The document with every model id replaced by a synthetic directory, and the
    mapping back (directory -> id)."""
    doc = dict(doc)
    doc.pop("name", None)
    back = {}
    if doc.get("base_model"):
        back[path_for(doc["base_model"])] = doc["base_model"]
        doc["base_model"] = path_for(doc["base_model"])
    models = []
    for entry in doc.get("models") or []:
        entry = dict(entry)
        back[path_for(entry["model"])] = entry["model"]
        entry["model"] = path_for(entry["model"])
        models.append(entry)
    doc["models"] = models
    return doc, back


def test_every_shipped_recipe_exists():
    present = {_relative(p) for p in _recipe_files()}
    missing = sorted((set(EXPECTED) | set(BASELINES)) - present)
    assert not missing, f"recipes missing: {missing}"


@pytest.mark.parametrize("rel, doc", DOCUMENTS)
def test_recipe_parses_as_mergekit_configuration_without_dropped_keys(rel, doc):
    """mergekit's schema silently drops keys it does not know: every key a shipped recipe
    spells out must survive parsing (a typo such as `paramters:` would not)."""
    config = _config(doc)
    assert set(doc) - {"name"} <= config.model_fields_set, set(doc) - config.model_fields_set
    for entry, parsed in zip(doc.get("models") or [], config.models or []):
        assert set(entry) <= parsed.model_fields_set, set(entry) - parsed.model_fields_set
        assert dict(entry.get("parameters") or {}) == dict(parsed.parameters or {})
    assert dict(doc.get("parameters") or {}) == dict(config.parameters or {})


@pytest.mark.parametrize("rel, doc", [d for d in DOCUMENTS if _is_swap(*d.values)])
def test_layer_swap_recipe_validates_on_llama31_shape(rel, doc, synthetic):
    local, back = _localised(doc, synthetic)
    # the synthetic models are Llama-3.1-8B configs without weights: no weight file to check
    run = prepare(MergeConfiguration.model_validate(local), check_files=False)
    assert run.info.num_layers == 32

    # the zones mergekit-layerswap will use are the ones the file spells out
    written = doc.get("parameters") or {}
    from_file = SwapZones(*(written.get(name, DEFAULTS[name]) for name in ZONE_PARAMETERS))
    assert run.recipe.zones == from_file
    assert run.recipe.weighting == written.get("weighting", DEFAULTS["weighting"])
    assert run.recipe.non_layer == written.get("non_layer", DEFAULTS["non_layer"])

    if rel in EXPECTED:
        lang, zones, weighting = EXPECTED[rel]
        assert run.recipe.zones == SwapZones(*zones)
        assert run.recipe.weighting == weighting
        assert run.recipe.non_layer == "average"
        assert run.recipe.transition_shape == "flat"
        assert back[str(run.recipe.base_model)] == BASE
        [task] = run.recipe.of_role(TASK)
        [language] = run.recipe.of_role(LANGUAGE)
        assert back[str(task.model)] == MATH_EXPERT
        assert back[str(language.model)] == LANGUAGE_EXPERTS[lang]
        assert task.weight == 1.0 and language.weight == 1.0
        assert doc.get("dtype") == "bfloat16"


@pytest.mark.parametrize("lang", sorted(PAPER_RULE))
def test_main_recipes_follow_the_papers_per_language_finding(lang):
    with open(RECIPES / f"{lang}_math.yaml") as handle:
        params = yaml.safe_load(handle)["parameters"]
    b, u, t_b, t_u = (params[name] for name in ZONE_PARAMETERS)
    assert (b, u, t_b, t_u) == PAPER_RULE[lang]
    assert b in SEARCHED["b"] and u in SEARCHED["u"]
    assert t_b in SEARCHED["t"] and t_u in SEARCHED["t"]


def test_language_rule_ordering():
    """Telugu swaps the most language layers, Japanese the fewest, Swahili and
    Bengali sit at the paper's default."""

    def math_layers(zones):
        return [s for _, s in layer_table(32, SwapZones(*zones))].count(TASK)

    task_layers = {lang: math_layers(z) for lang, z in PAPER_RULE.items()}
    assert task_layers["tel"] < task_layers["swh"] == task_layers["ben"] < task_layers["jpn"]
    assert task_layers == {"tel": 23, "swh": 25, "ben": 25, "jpn": 29}


@pytest.mark.parametrize("lang", sorted(PAPER_RULE))
def test_language_recipe_comments_say_what_to_check(lang):
    for name in (f"{lang}_math.yaml", f"{lang}_transition.yaml"):
        text = (RECIPES / name).read_text()
        for needle in ("vocab_size", "128256", "32", "licen", "weighting: magnitude", "analyze"):
            assert needle in text, f"{name} does not mention {needle!r}"
    text = (RECIPES / f"{lang}_math.yaml").read_text()
    assert "suggest" in text
    if lang == "tel":
        assert "No Telugu-only" in text


def test_magnitude_soup_blends_every_tensor_alike():
    """b=0, u=0, t_b+t_u=32 leaves no layer taken whole from either expert, so with
    flat transitions every tensor gets the same 1:1 role split: a soup whose weights
    are the experts' 1/m under weighting: magnitude."""
    _, zones, weighting = EXPECTED["baselines/swh_magnitude_soup.yaml"]
    zones = SwapZones(*zones)
    assert zones.total == 32
    assert weighting == "magnitude"
    assert {source for _, source in layer_table(32, zones)} == {BLEND}
    for layer in list(range(32)) + [None]:
        assert role_shares(layer, 32, zones, "average", "flat") == {TASK: 0.5, LANGUAGE: 0.5}


def test_magnitude_soup_kernel_equals_linear_with_inverse_magnitude_weights():
    import torch

    from mergekit_layerswap.adapter.mixing import mix_roles

    task, lang = torch.randn(3, 4), torch.randn(3, 4)
    m_task, m_lang = 2.0e-5, 9.0e-4
    shares = role_shares(7, 32, SwapZones(0, 0, 16, 16), "average", "flat")
    merged = mix_roles({TASK: [(task, 1.0 / m_task)], LANGUAGE: [(lang, 1.0 / m_lang)]}, shares)
    linear = (task / m_task + lang / m_lang) / (1.0 / m_task + 1.0 / m_lang)
    torch.testing.assert_close(merged, linear)


@pytest.mark.parametrize(
    "rel, doc",
    [d for d in DOCUMENTS if d.values[1].get("merge_method") != "layer_swap"],
)
def test_baseline_uses_a_registered_mergekit_method(rel, doc):
    config = _config(doc)
    method = registry.get(config.merge_method)
    if rel in BASELINES:
        assert config.merge_method == BASELINES[rel]
        ids = {str(m.model) for m in config.models}
        assert ids == {MATH_EXPERT, LANGUAGE_EXPERTS["swh"]}
    spec = method.spec
    shared = {p.name for p in spec.shared_parameters}
    per_input = {p.name for p in spec.input_parameters}
    assert set(config.parameters or {}) <= shared | per_input
    for model_in in config.models or []:
        assert set(model_in.parameters or {}) <= per_input | shared
    if spec.contract.base == BasePolicy.REQUIRED:
        assert config.base_model is not None


def test_magnitude_soup_recipe_merges_like_linear_with_inverse_m(families, tmp_path):
    """End to end on a small Llama: the shipped magnitude-soup recipe (its zones scaled
    to the small model's layer count) gives the same tensors as mergekit's own
    `linear` with weights 1/m_task and 1/m_lang."""
    import torch
    from checkpoints import load_tensors
    from helpers import run_yaml_inprocess, write_recipe
    from mergekit.common import ModelReference

    from mergekit_layerswap.adapter.magnitude import magnitude

    family = families("llama")
    half = family.arch.num_layers // 2
    with open(RECIPES / "baselines" / "swh_magnitude_soup.yaml") as handle:
        recipe = yaml.safe_load(handle)
    params = recipe["parameters"]
    assert params["bottom_transition"] + params["top_transition"] == 32
    params.update(bottom_transition=half, top_transition=half)
    recipe.update(base_model=family.base, dtype="float32")
    recipe["models"][0]["model"] = family.task
    recipe["models"][1]["model"] = family.lang

    m = {
        path: magnitude(ModelReference.parse(path), ModelReference.parse(family.base)).mean_row_mav
        for path in (family.task, family.lang)
    }
    assert m[family.lang] > 1.5 * m[family.task]  # unequal, so 1/m weighting shows
    linear = {
        "merge_method": "linear",
        "models": [{"model": p, "parameters": {"weight": 1.0 / m[p]}} for p in (family.task, family.lang)],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    outputs = {}
    for name, config in (("swap", recipe), ("linear", linear)):
        result = run_yaml_inprocess(write_recipe(tmp_path / f"{name}.yaml", config), tmp_path / name)
        assert result.exit_code == 0, result.output
        outputs[name] = load_tensors(str(tmp_path / name))
    assert set(outputs["swap"]) == set(outputs["linear"])
    for tensor_name, tensor in outputs["linear"].items():
        torch.testing.assert_close(outputs["swap"][tensor_name], tensor, rtol=1e-5, atol=1e-6)
