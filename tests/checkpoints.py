"""Small random checkpoints of real architectures, written the way transformers saves them.

A base model is built from a tiny config; experts are the base plus seeded noise, so
they are fine-tunes of one base (what layer swapping and magnitude weighting assume).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import transformers
from safetensors.torch import load_file, save_file

VOCAB = 96


@dataclass(frozen=True)
class Arch:
    name: str
    make_config: Callable[[], object]
    layer_prefix: str  # the test's own knowledge of where layer N lives
    num_layers: int
    tied: bool = False
    fused_experts: bool = False  # store experts as transformers' in-memory 3-D tensors
    model_class: str = "AutoModelForCausalLM"  # transformers' own class that loads it
    vision_prefixes: Tuple[str, ...] = ()  # vision tower and projector tensors (VL models)
    renames: Tuple[Tuple[str, str], ...] = ()  # stored-name prefixes rewritten after saving

    def is_vision(self, tensor_name: str) -> bool:
        return tensor_name.startswith(self.vision_prefixes) if self.vision_prefixes else False

    def layer_of(self, tensor_name: str) -> Optional[int]:
        head, _, _ = self.layer_prefix.partition("{}")
        if not tensor_name.startswith(head):
            return None
        return int(tensor_name[len(head) :].split(".", 1)[0])


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _gemma2():
    from transformers import Gemma2Config

    return Gemma2Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def _gpt2():
    from transformers import GPT2Config

    return GPT2Config(n_embd=32, n_layer=6, n_head=4, vocab_size=VOCAB, n_positions=64, tie_word_embeddings=True)


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _mixtral():
    from transformers import MixtralConfig

    return MixtralConfig(
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _glm4_moe():
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def _gemma3vl():
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            vision_use_head=False,  # as in the published Gemma 3 checkpoints
        ),
        mm_tokens_per_image=4,
        boi_token_index=VOCAB - 3,
        eoi_token_index=VOCAB - 2,
        image_token_index=VOCAB - 1,
    )


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=24,
            num_heads=2,
            out_hidden_size=32,
            fullatt_block_indexes=[1],
            window_size=28,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        vision_start_token_id=VOCAB - 3,
        video_token_id=VOCAB - 2,
        image_token_id=VOCAB - 1,
        tie_word_embeddings=False,
    )


def _mistral3():
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=dict(
            model_type="mistral",
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            head_dim=8,
        ),
        image_token_index=VOCAB - 1,
        spatial_merge_size=2,
    )


ARCHS: Dict[str, Arch] = {
    "llama": Arch("llama", _llama, "model.layers.{}.", 8),
    "qwen2": Arch("qwen2", _qwen2, "model.layers.{}.", 6),
    "mistral": Arch("mistral", _mistral, "model.layers.{}.", 6),
    "gemma2": Arch("gemma2", _gemma2, "model.layers.{}.", 6, tied=True),
    "gpt2": Arch("gpt2", _gpt2, "transformer.h.{}.", 6, tied=True),
    "phi3": Arch("phi3", _phi3, "model.layers.{}.", 6),
    # mixture-of-experts: transformers saves one 2-D tensor per expert; the *_fused
    # variants store the 3-D tensors transformers holds in memory
    "mixtral": Arch("mixtral", _mixtral, "model.layers.{}.", 6),
    "mixtral_fused": Arch("mixtral_fused", _mixtral, "model.layers.{}.", 6, fused_experts=True),
    "qwen3_moe": Arch("qwen3_moe", _qwen3_moe, "model.layers.{}.", 6),
    "qwen3_moe_fused": Arch("qwen3_moe_fused", _qwen3_moe, "model.layers.{}.", 6, fused_experts=True),
    "glm4_moe": Arch("glm4_moe", _glm4_moe, "model.layers.{}.", 6),
    # vision-language: the text decoder's layers follow the rule, the rest `vision`
    "gemma3vl": Arch(
        "gemma3vl",
        _gemma3vl,
        "language_model.model.layers.{}.",
        6,
        tied=True,
        model_class="AutoModelForImageTextToText",
        vision_prefixes=("vision_tower.", "multi_modal_projector."),
        # published Gemma 3 checkpoints (and mergekit's definition) name the tower so
        renames=(("vision_tower.", "vision_tower.vision_model."),),
    ),
    "qwen2_5_vl": Arch(
        "qwen2_5_vl",
        _qwen2_5_vl,
        "model.layers.{}.",
        6,
        model_class="AutoModelForImageTextToText",
        vision_prefixes=("visual.",),
    ),
    "mistral3": Arch(
        "mistral3",
        _mistral3,
        "language_model.model.layers.{}.",
        6,
        tied=True,
        model_class="AutoModelForImageTextToText",
        vision_prefixes=("vision_tower.", "multi_modal_projector."),
    ),
}


def _write_tokenizer(path: str, marker: str, size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}" + marker + "{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as handle:
        json.dump({"marker": marker, "max_new_tokens": len(marker)}, handle)


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
    model_class = getattr(transformers, arch.model_class)

    torch.manual_seed(seed)
    if base_path is None:
        model = model_class.from_config(arch.make_config())
    else:
        model = model_class.from_pretrained(base_path, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                layer = arch.layer_of(name)
                scale = noise if noise_by_layer is None else noise_by_layer.get(layer, 0.0)
                if scale:
                    param.add_(scale * torch.randn(param.shape, generator=generator))
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    if arch.fused_experts:
        _store_model_layout(model, path)
    if arch.renames:
        _rename_stored(path, arch.renames)
    config = model.config
    size = getattr(config, "vocab_size", None) or VOCAB
    _write_tokenizer(path, marker=os.path.basename(path), size=size)
    return path


def _store_model_layout(model, path: str) -> None:
    """Replace the saved weights by the model's own state dict (fused 3-D expert tensors)."""
    for name in os.listdir(path):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(os.path.join(path, name))
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _rename_stored(path: str, renames) -> None:
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            state = load_file(file)
            for old, new in renames:
                state = {
                    (new + k[len(old) :] if k.startswith(old) and not k.startswith(new) else k): v
                    for k, v in state.items()
                }
            save_file(state, file, metadata={"format": "pt"})


def model_tensors(arch: Arch, path: str) -> Dict[str, torch.Tensor]:
    """Every tensor as transformers' own class holds it after loading ``path``."""
    model = getattr(transformers, arch.model_class).from_pretrained(path, dtype=torch.float32)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    out: Dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out
