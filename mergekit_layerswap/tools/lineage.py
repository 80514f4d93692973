# SPDX-License-Identifier: LGPL-3.0-only
"""Which base each model says it was fine-tuned from, read from files already on disk.

Layer swapping assumes both experts start from one base; a pair that does not (an
Instruct model paired with a fine-tune of the base, say) merges without any error and is
simply worse. ``explain`` turns a mismatch it can see into a warning line. Two places
record a model's parent: ``_name_or_path`` in its ``config.json`` (written by older
transformers and by many training scripts; transformers 5 drops it on save) and the
``base_model:`` field of its model card's YAML front matter. Only local directories and
files already in the Hugging Face cache are read: ``explain`` never downloads.

``_name_or_path`` is whatever the saving script loaded: the parent for a fine-tune, the
model itself for a plain re-save. A re-saved expert can therefore "name" itself; the
warning says where it read the name, so that case is easy to recognise.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional

import yaml

from mergekit_layerswap.core.files import looks_like_hub_id


def name_key(name: str) -> str:
    """The part of a model name that identifies it: its last path component, lower-cased.
    ``/models/Llama-3.1-8B`` (a local download) and ``meta-llama/Llama-3.1-8B`` match;
    Meta's older repository names (``Meta-Llama-3.1-8B``) match their renamed form."""
    last = re.split(r"[/\\]", str(name).rstrip("/\\"))[-1].lower()
    return last[len("meta-") :] if last.startswith("meta-llama-") else last


def _local_file(model, filename: str) -> Optional[str]:
    path = model.model.path
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        return candidate if os.path.isfile(candidate) else None
    if not looks_like_hub_id(path):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, filename, revision=model.model.revision)
    except Exception:  # a malformed id, an unreadable cache: nothing known
        return None
    return found if isinstance(found, str) else None


def _config_parent(model) -> Optional[str]:
    path = _local_file(model, "config.json")
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value.strip() else None


def _card_parents(model) -> List[str]:
    path = _local_file(model, "README.md")
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(200_000)
    except (OSError, UnicodeDecodeError):
        return []
    match = re.match(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", text, re.S)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return []
    value = meta.get("base_model") if isinstance(meta, dict) else None
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str) and v.strip()]


def claimed_bases(model) -> Dict[str, str]:
    """Each model this one says it was fine-tuned from -> where that is written. A LoRA
    expert's parent is the model it is applied to."""
    if model.lora is not None:
        return {model.model.path: "the model its LoRA is applied to"}
    own = name_key(model.model.path)
    found: Dict[str, str] = {}
    parent = _config_parent(model)
    if parent is not None and name_key(parent) != own:
        found[parent] = "config.json _name_or_path"
    for parent in _card_parents(model):
        if name_key(parent) != own:
            found.setdefault(parent, "model card base_model")
    return found


def _describe(claims: Dict[str, str]) -> str:
    return ", ".join(f"{name} ({where})" for name, where in claims.items())


def base_warnings(recipe) -> List[str]:
    """One line per mismatch between what the experts say their base is and the recipe's
    ``base_model`` (or, without one, each other)."""
    claims = {expert.model: claimed_bases(expert.model) for expert in recipe.experts}
    lines = []
    base = recipe.base_model
    if base is not None:
        # a re-saved download records the model it was loaded from, i.e. itself
        base_keys = {name_key(base.model.path)} | {name_key(n) for n in [_config_parent(base)] if n}
        for index, expert in enumerate(recipe.experts):
            said = {n: where for n, where in claims[expert.model].items() if name_key(n) not in base_keys}
            if said:
                lines.append(
                    f"warning: models[{index}] ({expert.model}) names {_describe(said)} as its base, "
                    f"not base_model {base}; layer swapping assumes every expert was fine-tuned from "
                    f"one base: check its model card"
                )
        return lines
    experts = [e for e in recipe.experts if claims[e.model]]
    for i, first in enumerate(experts):
        for second in experts[i + 1 :]:
            keys = {name_key(n) for n in claims[first.model]}
            if not keys & {name_key(n) for n in claims[second.model]}:
                lines.append(
                    f"warning: the experts name different bases: {first.model} -> "
                    f"{_describe(claims[first.model])}; {second.model} -> {_describe(claims[second.model])}; "
                    f"layer swapping assumes every expert was fine-tuned from one base"
                )
    return lines
