# SPDX-License-Identifier: LGPL-3.0-only
"""Small seeded checkpoints of real architectures, written with torch and safetensors.

A base model's tensors are drawn from a seeded ``torch.Generator`` (in name order, so
every value is fixed by the seed); experts are the base plus seeded noise, so they are
fine-tunes of one base (what layer swapping and magnitude weighting assume). transformers
only supplies what a checkpoint of its architecture must look like: the config (from
the one table ``CONFIGS``) and, from a model built on the meta device, the names and
shapes of the stored tensors. Its weight initialisation is never run, so the bytes do
not move when transformers changes its init.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

VOCAB = 96
INIT_STD = 0.02  # the scale of a base model's matrices (transformers' usual initializer_range)

_POSITIONS = {"max_position_embeddings": 64}
_LAYERED = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)

# architecture -> (transformers config class, its arguments): every test checkpoint's shape
CONFIGS: Dict[str, tuple] = {
    "llama": ("LlamaConfig", {**_LAYERED, "num_hidden_layers": 8, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", {**_LAYERED, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", {**_LAYERED, "tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", {**_LAYERED, "head_dim": 8, "tie_word_embeddings": True}),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 6, "n_head": 4, "n_positions": 64, "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {**_LAYERED, "num_key_value_heads": 4, "pad_token_id": 0, "tie_word_embeddings": False}),
    # mixture-of-experts, four routed experts each
    "mixtral": (
        "MixtralConfig",
        {**_LAYERED, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2}
        | {"tie_word_embeddings": False},
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {**_LAYERED, "head_dim": 8, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}
        | {"decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False},
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        {**_LAYERED, "head_dim": 8, "moe_intermediate_size": 16, "n_routed_experts": 4, "n_shared_experts": 1}
        | {"num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
        | {"tie_word_embeddings": False},
    ),
    # vision-language: a text decoder (text_config) and a small vision tower
    "gemma3vl": (
        "Gemma3Config",
        {
            "text_config": {**_LAYERED, "head_dim": 8, "vocab_size": VOCAB, **_POSITIONS},
            # vision_use_head=False as in the published Gemma 3 checkpoints
            "vision_config": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2}
            | {"num_attention_heads": 2, "image_size": 28, "patch_size": 14, "vision_use_head": False},
            "mm_tokens_per_image": 4,
            "boi_token_index": VOCAB - 3,
            "eoi_token_index": VOCAB - 2,
            "image_token_index": VOCAB - 1,
            "tie_word_embeddings": True,
        },
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLConfig",
        {
            "text_config": {**_LAYERED, "vocab_size": VOCAB, **_POSITIONS, "bos_token_id": 1, "eos_token_id": 2}
            | {"rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
            "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 24, "num_heads": 2}
            | {"out_hidden_size": 32, "fullatt_block_indexes": [1], "window_size": 28, "patch_size": 14}
            | {"spatial_merge_size": 2, "temporal_patch_size": 2},
            "vision_start_token_id": VOCAB - 3,
            "video_token_id": VOCAB - 2,
            "image_token_id": VOCAB - 1,
            "tie_word_embeddings": False,
        },
    ),
    "mistral3": (
        "Mistral3Config",
        {
            "text_config": {**_LAYERED, "model_type": "mistral", "head_dim": 8, "vocab_size": VOCAB, **_POSITIONS},
            "vision_config": {"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 24}
            | {"num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 28, "patch_size": 14, "head_dim": 8},
            "image_token_index": VOCAB - 1,
            "spatial_merge_size": 2,
            "tie_word_embeddings": True,
        },
    ),
    "llama4": (
        "Llama4Config",
        {
            # MoE layers (four routed experts, stored fused 3-D as transformers and the published
            # checkpoints hold them, and a shared expert) where the tests' zones put a language,
            # a blended and a task layer (1, 2, 3, 5), dense MLPs on 0 and 4; no RoPE on 2 and 5
            "text_config": {**_LAYERED, "head_dim": 8, "vocab_size": VOCAB, **_POSITIONS}
            | {"intermediate_size": 16, "intermediate_size_mlp": 48, "num_local_experts": 4}
            | {"num_experts_per_tok": 1, "moe_layers": [1, 2, 3, 5], "no_rope_layer_interval": 3}
            | {"attention_chunk_size": 16, "bos_token_id": 1, "eos_token_id": 2},
            # pixel shuffle by 1/2 turns 16 channels into intermediate_size = 64
            "vision_config": {"hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 2}
            | {"num_attention_heads": 2, "image_size": 28, "patch_size": 14, "pixel_shuffle_ratio": 0.5}
            | {"vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32},
            "boi_token_index": VOCAB - 3,
            "eoi_token_index": VOCAB - 2,
            "image_token_index": VOCAB - 1,
            "tie_word_embeddings": False,
        },
    ),
    # odd widths (float32 -> bf16 rounding, blocks that do not divide evenly)
    "llama-odd": (
        "LlamaConfig",
        {**_LAYERED, "hidden_size": 36, "intermediate_size": 45, "num_attention_heads": 6, "vocab_size": 97}
        | {"tie_word_embeddings": False},
    ),
    # ~31 MB experts: merges that take long enough to be interrupted
    "llama-wide": (
        "LlamaConfig",
        {**_LAYERED, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8}
        | {"tie_word_embeddings": False},
    ),
    # GPT-NeoX stores integer buffers (attention masks) in some checkpoints
    "gpt_neox": (
        "GPTNeoXConfig",
        {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 6, "num_attention_heads": 4}
        | {"max_position_embeddings": 16, "tie_word_embeddings": False},
    ),
}
COMMON = {"vocab_size": VOCAB}
POSITIONS = {"max_position_embeddings": 64}  # every family above but gpt2 (n_positions)


def config_of(name: str, **overrides):
    """A fresh transformers config for ``CONFIGS[name]``, with ``overrides`` set on it."""
    import transformers

    class_name, arguments = CONFIGS[name]
    if "text_config" in arguments:  # a vision-language model: sizes live in the sub-configs
        return getattr(transformers, class_name)(**arguments)
    extra = {} if "n_positions" in arguments else POSITIONS
    config = getattr(transformers, class_name)(**{**COMMON, **extra, **arguments})
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@dataclass(frozen=True)
class Arch:
    name: str
    make_config: Callable[[], object]
    layer_prefix: str  # the test's own knowledge of where layer N lives
    num_layers: int
    tied: bool = False
    # the model's parameter name -> the name its checkpoints store it under, where they differ
    stored_as: Tuple[Tuple[str, str], ...] = ()
    # MoE / VL: names, splits and buffers as save_pretrained writes them (transformers'
    # revert_weight_conversion): one 2-D tensor per expert, language_model.model.*, ...
    saved_layout: bool = False
    fused_experts: bool = False  # store experts as transformers holds them in memory (3-D)
    model_class: str = "AutoModelForCausalLM"  # transformers' own class that loads it
    vision_prefixes: Tuple[str, ...] = ()  # vision tower and projector tensors (VL models)
    renames: Tuple[Tuple[str, str], ...] = ()  # stored-name prefixes as published checkpoints name them

    def is_vision(self, tensor_name: str) -> bool:
        return bool(self.vision_prefixes) and tensor_name.startswith(self.vision_prefixes)

    def layer_of(self, tensor_name: str) -> Optional[int]:
        head, _, _ = self.layer_prefix.partition("{}")
        if not tensor_name.startswith(head):
            return None
        return int(tensor_name[len(head) :].split(".", 1)[0])


def _arch(name: str, layer_prefix: str, stored_as: Tuple[Tuple[str, str], ...] = (), config=None, **options) -> Arch:
    """``config``: the CONFIGS entry, when several test architectures share one."""
    arguments = CONFIGS[config or name][1]
    text = arguments.get("text_config", arguments)
    layers = text.get("num_hidden_layers", text.get("n_layer"))
    tied = arguments["tie_word_embeddings"]
    return Arch(name, lambda: config_of(config or name), layer_prefix, layers, tied, stored_as, **options)


_VL = dict(model_class="AutoModelForImageTextToText", saved_layout=True)


ARCHS: Dict[str, Arch] = {
    "llama": _arch("llama", "model.layers.{}."),
    "qwen2": _arch("qwen2", "model.layers.{}."),
    "mistral": _arch("mistral", "model.layers.{}."),
    "gemma2": _arch("gemma2", "model.layers.{}."),
    "gpt2": _arch("gpt2", "transformer.h.{}."),
    "phi3": _arch("phi3", "model.layers.{}."),
    # mixture-of-experts: stored as save_pretrained stores them, one 2-D tensor per expert;
    # the *_fused variants store the 3-D tensors transformers holds in memory
    "mixtral": _arch("mixtral", "model.layers.{}.", saved_layout=True),
    "mixtral_fused": _arch("mixtral_fused", "model.layers.{}.", config="mixtral", fused_experts=True),
    "qwen3_moe": _arch("qwen3_moe", "model.layers.{}.", saved_layout=True),
    "qwen3_moe_fused": _arch("qwen3_moe_fused", "model.layers.{}.", config="qwen3_moe", fused_experts=True),
    "glm4_moe": _arch("glm4_moe", "model.layers.{}.", saved_layout=True),
    # vision-language: the text decoder's layers follow the rule, the rest `vision`
    "gemma3vl": _arch(
        "gemma3vl",
        "language_model.model.layers.{}.",
        vision_prefixes=("vision_tower.", "multi_modal_projector."),
        # published Gemma 3 checkpoints (and mergekit's definition) name the tower so
        renames=(("vision_tower.", "vision_tower.vision_model."),),
        **_VL,
    ),
    "qwen2_5_vl": _arch("qwen2_5_vl", "model.layers.{}.", vision_prefixes=("visual.",), **_VL),
    "mistral3": _arch(
        "mistral3",
        "language_model.model.layers.{}.",
        vision_prefixes=("vision_tower.", "multi_modal_projector."),
        **_VL,
    ),
    "llama4": _arch(
        "llama4",
        "language_model.model.layers.{}.",
        vision_prefixes=("vision_model.", "multi_modal_projector."),
        **_VL,
    ),
}
# the families the session fixture builds (``conftest.families``) are the ones above;
# these serve single tests
SPECIAL: Dict[str, Arch] = {
    "llama-odd": _arch("llama-odd", "model.layers.{}."),
    "llama-wide": _arch("llama-wide", "model.layers.{}."),
    # transformers 5 calls the output head lm_head; GPT-NeoX checkpoints store it as embed_out
    "gpt_neox": _arch("gpt_neox", "gpt_neox.layers.{}.", stored_as=(("lm_head.weight", "embed_out.weight"),)),
}


def variant(arch: Arch, name: str, **overrides) -> Arch:
    """``arch`` with some config values changed (a bigger vocabulary, fewer layers, ...)."""
    layers = overrides.get("num_hidden_layers", overrides.get("n_layer", arch.num_layers))
    base = arch.make_config

    def make_config():
        config = base()
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    return dataclasses.replace(arch, name=name, make_config=make_config, num_layers=layers)


def stored_layout(config, stored_as: Tuple[Tuple[str, str], ...] = (), arch: Optional[Arch] = None) -> tuple:
    """(model class name, name -> shape of every tensor a transformers checkpoint of
    ``config`` stores): the parameters of the model built on the meta device (no memory,
    no initialisation), a tied output head once (under the embedding's name), as
    ``save_pretrained`` writes it. With ``arch.saved_layout`` also its persistent buffers,
    renamed and split by transformers' own ``revert_weight_conversion`` (what
    ``save_pretrained`` does); then ``arch.renames``."""
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, arch.model_class if arch else "AutoModelForCausalLM").from_config(config)
    state = dict(model.named_parameters())
    if arch is not None and arch.saved_layout:
        from transformers.core_model_loading import revert_weight_conversion

        persistent = set(model.state_dict())  # buffers a checkpoint stores (glm4_moe's router bias)
        state.update({name: buffer for name, buffer in model.named_buffers() if name in persistent})
        state = revert_weight_conversion(model, state)
    renamed = dict(stored_as)
    shapes = {renamed.get(name, name): tuple(param.shape) for name, param in state.items()}
    for old, new in arch.renames if arch else ():
        shapes = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in shapes.items()}
    return type(model).__name__, shapes


def _base_value(name: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Norm scales start at one, biases at zero, everything else is N(0, INIT_STD)."""
    if len(shape) == 1:
        return torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
    return INIT_STD * torch.randn(shape, generator=generator)


def _write_tokenizer(path: str, marker: str, size: int = VOCAB) -> None:
    """A word-level fast tokenizer, its config, a chat template and a generation config
    that name ``marker``, so a test can tell which model's files an output carries."""
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": False, "lstrip": False, "rstrip": False}
            | {"normalized": False, "special": True}
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "model_max_length": 1000000000000000019884624838656,
    }
    files = {
        "tokenizer.json": json.dumps(tokenizer, indent=2, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "chat_template.jinja": "{% for m in messages %}" + marker + "{{ m['content'] }}{% endfor %}",
        "generation_config.json": json.dumps({"marker": marker, "max_new_tokens": len(marker)}),
    }
    for name, text in files.items():
        with open(os.path.join(path, name), "w", encoding="utf-8") as handle:
            handle.write(text)


def _parse_size(size: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * units[unit])
    return int(text)


def _save(tensors: Dict[str, torch.Tensor], path: str, max_shard_size: Optional[str]) -> None:
    """One ``model.safetensors``, or shards of at most ``max_shard_size`` with the index
    transformers writes (``model-0000i-of-0000n.safetensors`` and its weight map)."""
    metadata = {"format": "pt"}
    if not max_shard_size:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata=metadata)
        return
    limit, shards, size = _parse_size(max_shard_size), [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, file), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2, sort_keys=True)


def make_model(
    arch: Arch,
    path: str,
    seed: int,
    base_path: Optional[str] = None,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
    noise_by_layer: Optional[Dict[int, float]] = None,
    max_shard_size: Optional[str] = None,
) -> str:
    """Write a checkpoint; with ``base_path``, the base's weights plus seeded noise."""
    config = arch.make_config()
    generator = torch.Generator().manual_seed(seed)
    model_class, shapes = stored_layout(config, arch.stored_as, arch)
    if base_path is None:
        tensors = {name: _base_value(name, shape, generator) for name, shape in sorted(shapes.items())}
    else:
        tensors = {name: tensor.float() for name, tensor in sorted(load_tensors(base_path).items())}
        for name, tensor in tensors.items():
            layer = arch.layer_of(name)
            scale = noise if noise_by_layer is None else noise_by_layer.get(layer, 0.0)
            if scale:
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    tensors = {name: tensor.to(dtype).contiguous() for name, tensor in tensors.items()}
    os.makedirs(path, exist_ok=True)
    _save(tensors, path, max_shard_size)
    stored = {key: value for key, value in config.to_diff_dict().items() if key != "transformers_version"}
    stored["architectures"] = [model_class]
    stored["dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(stored, handle, indent=2, sort_keys=True)
    _write_tokenizer(path, marker=os.path.basename(path), size=getattr(config, "vocab_size", None) or VOCAB)
    return path


def make_lora(base_path: str, path: str, seed: int, rank: int = 4, alpha: int = 8, targets=("q_proj", "v_proj")) -> str:
    """A PEFT LoRA adapter for the checkpoint at ``base_path``: A and B matrices drawn
    from a seeded generator (both non-zero, so the adapter changes what it targets)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in sorted(load_tensors(base_path).items()):
        stem, _, kind = name.rpartition(".")
        if kind != "weight" or stem.rpartition(".")[2] not in targets:
            continue
        out_features, in_features = tensor.shape
        prefix = f"base_model.model.{stem}"
        tensors[f"{prefix}.lora_A.weight"] = INIT_STD * torch.randn((rank, in_features), generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = INIT_STD * torch.randn((out_features, rank), generator=generator)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    return path


def fused_copy(arch: Arch, source: str, path: str) -> str:
    """``source`` re-stored in transformers' in-memory layout (fused 3-D experts), the
    values unchanged: transformers' own class loads it, its state dict is written."""
    import shutil

    shutil.copytree(source, path, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(
        {k: v.contiguous() for k, v in model_tensors(arch, source).items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    return path


def model_tensors(arch: Arch, path: str) -> Dict[str, torch.Tensor]:
    """Every tensor as transformers' own class holds it after loading ``path``; fails
    when the checkpoint leaves a weight of that class unloaded or unused."""
    import transformers

    model, info = getattr(transformers, arch.model_class).from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], (path, info)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    out: Dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out
