# SPDX-License-Identifier: LGPL-3.0-only
"""Small model factories for mergekit's own tests, written for this repository.

mergekit's sdist ships test files that import ``tests/common.py``, which the sdist does
not include. ``mergekit_suite.py --with-factories`` copies this file there as
``tests/common.py`` so those files run too. These are this repository's own guesses at
what the factories do (tiny random checkpoints of the named families, and a merge of a
``MergeConfiguration`` into a temporary directory that checks the output loads and holds
no NaN): a case may fail because a guess differs from mergekit's helpers, in both runs
alike, which the comparison of the two runs does not count against the package.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional

import torch


def _save(model, path) -> str:
    path = str(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_picollama(path, vocab_size: int = 64) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_hidden_layers=2,
        max_position_embeddings=128,
    )
    return _save(LlamaForCausalLM(config), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_hidden_layers=2,
        max_position_embeddings=128,
    )
    return _save(GraniteForCausalLM(config), path)


def make_gpt2size(path) -> str:
    """GPT-2's layer count (12) at a tiny width."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=32, n_head=4, vocab_size=64, n_positions=64)
    return _save(GPT2LMHeadModel(config), path)


def make_picoLlaVa(path) -> str:  # noqa: N802 - the name mergekit's tests import
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_hidden_layers=2,
        max_position_embeddings=128,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_attention_heads=4, num_hidden_layers=2, image_size=8, patch_size=4
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)
    return _save(LlavaForConditionalGeneration(config), path)


def run_and_check_merge(
    config,
    check_nan: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
) -> None:
    from mergekit.io import LazyTensorLoader
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions(quiet=True))
        names = os.listdir(out)
        assert "config.json" in names, names
        assert any(n.endswith((".safetensors", ".bin")) for n in names), names
        if index_json_name is not None:
            assert index_json_name in names, names
        if check_nan:
            loader = LazyTensorLoader.from_disk(out)
            for name in loader.index.tensor_paths:
                tensor = loader.get_tensor(name)
                if tensor.is_floating_point():
                    assert not torch.isnan(tensor).any(), name
        if validate is not None:
            validate(out)
