# SPDX-License-Identifier: LGPL-3.0-only
"""What layer_swap does with each architecture mergekit 0.1.5 defines: knowledge as data.

Every definition (``mergekit/_data/architectures/*.json`` and the Python ones in
``mergekit/architecture/moe_defs.py``) has one row, keyed ``<architecture>:<model_type>``;
``tests/test_architectures.py`` walks mergekit's definitions and fails when a row is
missing, stale, or when the README's list is not ``markdown_table()``. A row may also
name an architecture mergekit does not define, to refuse it with a reason.

``checked`` says how the row was measured: ``tests`` (a tiny generated checkpoint of it
is merged and compared tensor by tensor in this repository's tests, named in ``tests``),
``survey`` (merged bit-exactly on tiny transformers 5.25 checkpoints in issue 19's
survey, not re-run by the tests) or ``no`` (accepted by the checks, never merged here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

DENSE = "dense"
MOE = "mixture-of-experts"
VISION_LANGUAGE = "vision-language"
REFUSED = "refused"
KINDS = (DENSE, MOE, VISION_LANGUAGE, REFUSED)

# the module of a multi-module (vision-language) definition whose layers the rule places
TEXT_MODULE = "text_decoder"


@dataclass(frozen=True)
class Support:
    kind: str
    checked: str = "no"  # tests | survey | no
    note: str = ""
    tests: Tuple[str, ...] = ()  # tests/checkpoints.py ARCHS keys that merge it


def _dense(checked="no", note="", tests=()):
    return Support(DENSE, checked, note, tuple(tests))


_ENCODER = "an encoder or classifier, not a decoder: the rule places its layers, the paper's method is for decoders"
_T5_LIKE = (
    "an encoder-decoder: its decoder layers cross-attend to the encoder, so 'the bottom b decoder layers' "
    "does not describe one stack; merge it with mergekit's own methods"
)

SUPPORT: Dict[str, Support] = {
    # dense decoders
    "LlamaForCausalLM:llama": _dense("tests", tests=("llama",)),
    "MistralForCausalLM:mistral": _dense("tests", tests=("mistral",)),
    "Qwen2ForCausalLM:qwen2": _dense("tests", tests=("qwen2",)),
    "Gemma2ForCausalLM:gemma2": _dense("tests", tests=("gemma2",)),
    "GPT2LMHeadModel:gpt2": _dense("tests", tests=("gpt2",)),
    "Phi3ForCausalLM:phi3": _dense("tests", tests=("phi3",)),
    "Qwen3ForCausalLM:qwen3": _dense("survey"),
    "GemmaForCausalLM:gemma": _dense("survey"),
    "Gemma3ForCausalLM:gemma3_text": _dense("survey"),
    "Olmo2ForCausalLM:olmo2": _dense("survey"),
    "PhiForCausalLM:phi": _dense("survey"),
    "StableLmForCausalLM:stablelm": _dense("survey"),
    "Starcoder2ForCausalLM:starcoder2": _dense("survey"),
    "Cohere2ForCausalLM:cohere2": _dense("survey"),
    "GraniteForCausalLM:granite": _dense("survey"),
    "ApertusForCausalLM:apertus": _dense("survey"),
    "ArceeForCausalLM:arcee": _dense("survey"),
    "GPTBigCodeForCausalLM:gpt_bigcode": _dense("survey"),
    "Lfm2ForCausalLM:lfm2": _dense("survey", "hybrid convolution/attention layers, each taken whole"),
    "CohereForCausalLM:cohere": _dense(
        note="mergekit's definition requires q_norm tensors transformers 5 no longer stores: such "
        "checkpoints are refused by the tensor check, naming the tensor"
    ),
    "GPTNeoXForCausalLM:gpt_neox": _dense(
        note="mergekit's definition requires attention.bias tensors transformers 5 no longer stores: "
        "such checkpoints are refused by the tensor check, naming the tensor"
    ),
    "Glm4ForCausalLM:glm4": _dense(),
    "QWenLMHeadModel:qwen": _dense(),
    "ExaoneForCausalLM:exaone": _dense(),
    "SolarForCausalLM:solar": _dense(),
    "JAISLMHeadModel:jais": _dense(),
    "Phi3SmallForCausalLM:phi3small": _dense(),
    "PhiForCausalLM:phi-msft": _dense(),
    "MixFormerSequentialForCausalLM:mixformer-sequential": _dense(),
    "FalconForCausalLM:falcon": _dense(),
    "MambaForCausalLM:mamba": _dense(note="state-space layers, each taken whole"),
    "StableLMEpochForCausalLM:stablelm_epoch": _dense(),
    "ChatGLMModel:chatglm": _dense(),
    "BaichuanForCausalLM:baichuan": _dense(),
    "InternLM2ForCausalLM:internlm2": _dense(),
    "LlamaForSequenceClassification:llama": _dense(note="a classifier head on a decoder"),
    "GPT2ForSequenceClassification:gpt2": _dense(note="a classifier head on a decoder"),
    "BertModel:bert": _dense(note=_ENCODER),
    "BertForMaskedLM:bert": _dense(note=_ENCODER),
    "BertForSequenceClassification:bert": _dense(note=_ENCODER),
    "RobertaModel:roberta": _dense(note=_ENCODER),
    "RobertaForMaskedLM:roberta": _dense(note=_ENCODER),
    "RobertaForSequenceClassification:roberta": _dense(note=_ENCODER),
    "RobertaForTokenClassification:roberta": _dense(note=_ENCODER),
    "DistilBertModel:distilbert": _dense(note=_ENCODER),
    "DistilBertForMaskedLM:distilbert": _dense(note=_ENCODER),
    "DistilBertForSequenceClassification:distilbert": _dense(note=_ENCODER),
    "DistilBertForTokenClassification:distilbert": _dense(note=_ENCODER),
    # mixture-of-experts decoders: a layer (router, every expert, shared experts) is taken whole
    "MixtralForCausalLM:mixtral": Support(
        MOE, "tests", "one 2-D tensor per expert or fused 3-D", ("mixtral", "mixtral_fused")
    ),
    "Qwen3MoeForCausalLM:qwen3_moe": Support(
        MOE, "tests", "one 2-D tensor per expert or fused 3-D", ("qwen3_moe", "qwen3_moe_fused")
    ),
    "Glm4MoeForCausalLM:glm4_moe": Support(
        MOE, "tests", "shared experts; dense first layers (first_k_dense_replace)", ("glm4_moe",)
    ),
    "GraniteMoeHybridForCausalLM:granitemoehybrid": Support(
        MOE, "survey", "hybrid Mamba/attention layers with shared and routed experts"
    ),
    "AfmoeForCausalLM:afmoe": Support(MOE, note="mergekit's Python definition (moe_defs.py)"),
    "_AfmoePartialForCausalLM:_afmoe_partial": Support(
        REFUSED, note="an internal part of mergekit's AfmoeForCausalLM definition, no model's architecture"
    ),
    # vision-language: the rule places the text decoder's layers, `vision` the rest
    "Gemma3ForConditionalGeneration:gemma3": Support(VISION_LANGUAGE, "tests", tests=("gemma3vl",)),
    "Qwen2_5_VLForConditionalGeneration:qwen2_5_vl": Support(VISION_LANGUAGE, "tests", tests=("qwen2_5_vl",)),
    "Mistral3ForConditionalGeneration:mistral3": Support(VISION_LANGUAGE, "tests", tests=("mistral3",)),
    "Llama4ForConditionalGeneration:llama4": Support(
        VISION_LANGUAGE,
        "tests",
        "mixture-of-experts and dense layers in one text decoder; experts stored fused 3-D, a shared expert",
        ("llama4",),
    ),
    "Qwen2VLForConditionalGeneration:qwen2_vl": Support(
        REFUSED,
        note="mergekit 0.1.5's definition reads num_hidden_layers at the top level of config.json, "
        "which transformers 5 keeps only in text_config, so mergekit cannot count its layers",
    ),
    "Qwen3VLForConditionalGeneration:qwen3_vl": Support(
        REFUSED,
        note="mergekit 0.1.5's definition does not place the vision tower's deepstack merger "
        "tensors, so the output would lose them",
    ),
    "Qwen3VLMoeForConditionalGeneration:qwen3_vl_moe": Support(
        REFUSED,
        note="mergekit 0.1.5's definition does not place the vision tower's deepstack merger "
        "tensors, so the output would lose them",
    ),
    # encoder-decoders and cross-attention decoders
    "T5ForConditionalGeneration:t5": Support(REFUSED, note=_T5_LIKE),
    "WhisperForConditionalGeneration:whisper": Support(REFUSED, note=_T5_LIKE),
    "MllamaForConditionalGeneration:mllama": Support(
        REFUSED,
        note="cross-attention layers to the image are interleaved with the text decoder's layers, so "
        "the rule's layer zones do not describe it (and mergekit 0.1.5 has no definition of it)",
    ),
}


def support_of(architecture: str, model_type: Optional[str]) -> Optional[Support]:
    """The row for a config's architecture and model_type (None when there is none)."""
    return SUPPORT.get(f"{architecture}:{model_type}")


def markdown_table() -> str:
    """The README's architecture list, grouped by kind."""
    rows = ["| kind | architecture (model_type) | checked | note |", "|---|---|---|---|"]
    for kind in KINDS:
        for key, support in SUPPORT.items():
            if support.kind != kind:
                continue
            architecture, _, model_type = key.partition(":")
            checked = {"tests": "tests", "survey": "survey", "no": "—"}[support.checked]
            rows.append(f"| {kind} | `{architecture}` ({model_type}) | {checked} | {support.note} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m mergekit_layerswap.core.architectures
    print(markdown_table())
