# SPDX-License-Identifier: LGPL-3.0-only
"""The GGUF as a float32 safetensors checkpoint that mergekit and transformers read.

transformers reads the GGUF (``gguf_file=``) and de-quantizes every Q4_K/Q6_K tensor to
float32, but refuses to ``save_pretrained`` a model loaded that way; so the state dict
and the config are written here directly (one ``model.safetensors``, ``config.json``,
``generation_config.json``) with the tokenizer and chat template from the same file.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict

from mergekit_layerswap.core.files import atomic_write_text


def convert_gguf(gguf_path: str, out_dir: str, progress: bool = False) -> Dict[str, object]:
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.demo.base import _reuse_gguf_parsing

    folder, name = os.path.split(os.path.abspath(gguf_path))
    scratch = out_dir + ".partial"
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    with tqdm(total=3, desc="GGUF -> float32", unit="part", disable=not progress) as bar, _reuse_gguf_parsing():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        bar.update()
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        bar.update()
        tensors = {
            key: value.detach().to(torch.float32).contiguous().clone() for key, value in model.state_dict().items()
        }
        save_file(tensors, os.path.join(scratch, "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]  # mergekit picks its layer layout by this name
        config["torch_dtype"] = config["dtype"] = "float32"
        atomic_write_text(os.path.join(scratch, "config.json"), json.dumps(config, indent=2, sort_keys=True) + "\n")
        if model.generation_config is not None:
            model.generation_config.to_json_file(os.path.join(scratch, "generation_config.json"))
        tokenizer.save_pretrained(scratch)
        bar.update()
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(scratch, out_dir)
    return {
        "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
        "layers": int(config["num_hidden_layers"]),
        "hidden_size": int(config["hidden_size"]),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings")),
        "has_lm_head": "lm_head.weight" in tensors,
        "bytes": os.path.getsize(os.path.join(out_dir, "model.safetensors")),
    }
