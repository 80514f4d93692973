# SPDX-License-Identifier: LGPL-3.0-only
"""The shipped recipes under recipes/ parse, validate and say what the paper says.

Nothing is downloaded: every model id of a layer_swap recipe is pointed at a local
directory that holds only a config.json of the Llama-3.1-8B shape, which is all
``planning.prepare`` (the validation a merge runs first) reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

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
    "jpn": "tokyotech-llm/Llama-3.1-Swallow-8B-v0.1",
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


class NewBase(NamedTuple):
    """A recipe on another base: what the file must say and the shape to check it on."""

    base: str
    task: str
    language: str
    zones: tuple  # (b, u, t_b, t_u)
    non_layer: str
    shape: str  # a key of _save_config
    num_layers: int
    needs: Optional[str] = None  # support this build may not have yet


NEW_BASES = {
    "swh_qwen3_8b.yaml": NewBase(
        "Qwen/Qwen3-8B-Base",
        "lightonai/Qwen3-8B-EN",
        "lightonai/Qwen3-8B-SW",
        (13, 13, 0, 0),
        "language",
        "qwen3_8b",
        36,
    ),
    "jpn_qwen3_8b.yaml": NewBase(
        "Qwen/Qwen3-8B-Base",
        "lightonai/Qwen3-8B-EN",
        "tokyotech-llm/Qwen3-Swallow-8B-CPT-v0.2",
        (3, 0, 1, 0),
        "average",
        "qwen3_8b",
        36,
    ),
    "jpn_qwen3_30b_a3b.yaml": NewBase(
        "Qwen/Qwen3-30B-A3B-Base",
        "Qwen/Qwen3-30B-A3B",
        "tokyotech-llm/Qwen3-Swallow-30B-A3B-CPT-v0.2",
        (4, 0, 0, 0),
        "average",
        "qwen3_30b_a3b",
        48,
        "mixture-of-experts",
    ),
    "uig_gemma3_4b.yaml": NewBase(
        "google/gemma-3-4b-pt",
        "google/gemma-3-4b-it",
        "pkupie/gemma-3-4b-ug-cpt",
        (5, 2, 0, 0),
        "average",
        "gemma3_4b",
        34,
        "vision-language",
    ),
}

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


QWEN3_8B = dict(
    architectures=["Qwen3ForCausalLM"],
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    tie_word_embeddings=False,
)
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"],
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    vocab_size=151936,
    tie_word_embeddings=False,
)
GEMMA3_4B = dict(
    architectures=["Gemma3ForConditionalGeneration"],
    text_config=dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=262208,
    ),
    vision_config=dict(hidden_size=1152, num_hidden_layers=27, image_size=896, patch_size=14),
)


def _save_config(kind: str, target: Path) -> None:
    """A config.json of the named real model's shape (no weights)."""
    import transformers

    if kind == "llama31_8b":
        config = transformers.LlamaConfig(**LLAMA_31_8B)
    elif kind == "qwen3_8b":
        config = transformers.Qwen3Config(**QWEN3_8B)
    elif kind == "qwen3_30b_a3b":
        config = transformers.Qwen3MoeConfig(**QWEN3_30B_A3B)
    elif kind == "gemma3_4b":
        config = transformers.Gemma3Config(**GEMMA3_4B)
    else:
        raise ValueError(kind)
    config.save_pretrained(str(target))


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
    """(model id, shape) -> a local directory with only a config.json of that shape
    (Llama-3.1-8B unless told)."""
    root = tmp_path_factory.mktemp("recipe-configs")
    made = {}

    def path_for(model_id: str, kind: str = "llama31_8b") -> str:
        if (model_id, kind) not in made:
            target = root / f"m{len(made)}"
            _save_config(kind, target)
            made[(model_id, kind)] = str(target)
        return made[(model_id, kind)]

    return path_for


def _localised(doc: dict, path_for, kind: str = "llama31_8b") -> tuple[dict, dict]:
    """The document with every model id replaced by a synthetic directory, and the
    mapping back (directory -> id)."""
    doc = dict(doc)
    doc.pop("name", None)
    back = {}
    if doc.get("base_model"):
        back[path_for(doc["base_model"], kind)] = doc["base_model"]
        doc["base_model"] = path_for(doc["base_model"], kind)
    models = []
    for entry in doc.get("models") or []:
        entry = dict(entry)
        back[path_for(entry["model"], kind)] = entry["model"]
        entry["model"] = path_for(entry["model"], kind)
        models.append(entry)
    doc["models"] = models
    return doc, back


def test_every_shipped_recipe_exists():
    present = {_relative(p) for p in _recipe_files()}
    missing = sorted((set(EXPECTED) | set(BASELINES) | set(NEW_BASES)) - present)
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


@pytest.mark.parametrize("rel, doc", [d for d in DOCUMENTS if _is_swap(*d.values) and d.values[0] not in NEW_BASES])
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


@pytest.mark.parametrize("rel", sorted(NEW_BASES))
def test_new_base_recipe_structure(rel):
    """The recipe's own structure (no configs read) is what the file says, and its zones
    fit the real model's decoder depth."""
    from mergekit_layerswap.adapter.planner import parse
    from mergekit_layerswap.core.recipe import check_zone_fit

    base, task, language, zones, non_layer, _, num_layers, _ = NEW_BASES[rel]
    with open(RECIPES / rel) as handle:
        doc = yaml.safe_load(handle)
    recipe = parse(_config(doc))
    assert recipe.zones == SwapZones(*zones)
    assert recipe.non_layer == non_layer
    assert str(recipe.base_model) == base
    assert [str(e.model) for e in recipe.of_role(TASK)] == [task]
    assert [str(e.model) for e in recipe.of_role(LANGUAGE)] == [language]
    check_zone_fit(recipe.zones, num_layers)
    assert doc.get("dtype") == "bfloat16"


@pytest.mark.parametrize("rel", sorted(NEW_BASES))
def test_new_base_recipe_validates_on_its_models_shape(rel, synthetic):
    """Against config.json files of the real models' shapes: validated exactly as a merge
    validates, or, for an architecture this build does not merge yet, refused in the one
    line the README's recipe notes promise."""
    from mergekit_layerswap.core.errors import RecipeError

    _, _, language, zones, _, kind, num_layers, needs = NEW_BASES[rel]
    with open(RECIPES / rel) as handle:
        doc = yaml.safe_load(handle)
    local, back = _localised(doc, synthetic, kind)
    readme = (RECIPES / "README.md").read_text()
    try:
        run = prepare(MergeConfiguration.model_validate(local), check_files=False)
    except RecipeError as error:
        assert needs is not None, f"{rel}: {error}"
        message = str(error)
        assert "\n" not in message
        assert {"mixture-of-experts": "mixture-of-experts", "vision-language": "several modules"}[needs] in message
        assert f"`{rel}`" in readme and f"needs {needs} support" in readme
        return
    assert run.info.num_layers == num_layers
    assert run.recipe.zones == SwapZones(*zones)
    assert back[str(run.recipe.donor)] == language


def test_recipes_readme_records_evidence_for_every_expert():
    """Every expert id of every shipped layer_swap recipe appears in the README's evidence
    table, so nobody adds an expert without saying what its card says."""
    from mergekit_layerswap.core.files import looks_like_hub_id

    readme = (RECIPES / "README.md").read_text()
    evidence = readme.split("## Evidence", 1)[1]
    for rel, doc in [d.values for d in DOCUMENTS if _is_swap(*d.values)]:
        for entry in doc.get("models") or []:
            model = entry["model"].split("+")[0]  # a LoRA's base model is the expert's
            if looks_like_hub_id(model) and not (RECIPES.parent / model).exists():
                assert f"`{model}`" in evidence, f"{rel}: {model} has no evidence row"
