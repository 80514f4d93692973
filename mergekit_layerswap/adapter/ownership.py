# SPDX-License-Identifier: LGPL-3.0-only
"""Which files of an existing output directory an earlier merge wrote (verified: mergekit 0.1.5).

A merge may replace an output directory only when nothing in it would be lost: every
entry must be a file an earlier merge wrote there, unchanged since. That is decided by a
record, never by a name pattern (a fine-tune's ``model.safetensors`` or a user's
``tokenizer_training_corpus.txt`` look like merge files):

* a ``layer_swap`` merge writes ``RECORD`` last, listing each file it wrote with a
  fingerprint (its size and the sha256 of its content, sampled for large files, see
  ``fingerprint``); a listed file whose fingerprint no longer matches has been changed
  by someone else and counts as theirs;
* an output written by mergekit itself (any method; also this package before the record
  existed) has no record but a ``mergekit_config.yml``: there the merge's files are the
  exact names mergekit 0.1.5 writes (``MERGEKIT_NAMES``), the shard index and the weight
  files that index names (``model.safetensors`` when unsharded);
* a directory with neither is not a merge's output: every file in it is someone's.

Everything else (a subdirectory, a file no record names) would be lost by a replacement.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Set, Tuple

RECORD = "mergekit_layerswap_files.json"
RECORD_FORMAT = 1
MERGEKIT_CONFIG = "mergekit_config.yml"
CARD = "README.md"

# every name mergekit 0.1.5 writes into an output besides its weights: run_merge's config,
# card and recipe, the tokenizer files it copies (``_copy_tokenizer``) or transformers'
# ``save_pretrained`` writes
MERGEKIT_NAMES = frozenset(
    {
        "config.json",
        "README.md",
        MERGEKIT_CONFIG,
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "video_preprocessor_config.json",
    }
)
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
UNSHARDED_NAMES = ("model.safetensors", "pytorch_model.bin")

_WHOLE = 8 << 20  # files up to this size are hashed whole
_HEAD = 1 << 20  # larger ones: the first MiB (a safetensors header), the last MiB and
_SAMPLE = 64 << 10  # 64 KiB at each of _SAMPLES evenly spaced offsets between them
_SAMPLES = 30


def fingerprint(path: str) -> Dict[str, object]:
    """Size and sha256 of a file's bytes: all of them up to 8 MiB; beyond that the first
    and last MiB and 30 evenly spaced 64 KiB blocks (a re-saved or fine-tuned checkpoint
    differs there; a change confined to the unsampled bytes of a large shard is missed).
    A model card is hashed without its title line, which names the output directory, so
    the record does not depend on the directory's name."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= _WHOLE:
            data = handle.read()
            if os.path.basename(path) == CARD:
                data = _without_title(data)
                size = len(data)
            digest.update(data)
        else:
            span = size - 2 * _HEAD - _SAMPLE
            offsets = [0] + [_HEAD + span * i // (_SAMPLES - 1) for i in range(_SAMPLES)] + [size - _HEAD]
            for offset in offsets:
                handle.seek(offset)
                digest.update(handle.read(_HEAD if offset in (0, size - _HEAD) else _SAMPLE))
    return {"size": size, "sha256": digest.hexdigest()}


def _without_title(card: bytes) -> bytes:
    lines = card.split(b"\n")
    for number, line in enumerate(lines):
        if line.startswith(b"# "):
            return b"\n".join(lines[:number] + lines[number + 1 :])
    return card


def fingerprints(directory: str, record_name: str) -> Dict[str, Dict[str, object]]:
    """The fingerprint of every plain file in ``directory`` but its record ``record_name``:
    what the output record and the LoRA cache's entry record both list."""
    return {
        entry.name: fingerprint(entry.path)
        for entry in sorted(os.scandir(directory), key=lambda e: e.name)
        if entry.name != record_name and entry.is_file(follow_symlinks=False)
    }


def write_record(directory: str) -> None:
    """Record every file now in ``directory`` (a finished merge, before it is installed)."""
    files = fingerprints(directory, RECORD)
    payload = {"written_by": "mergekit-layerswap", "format": RECORD_FORMAT, "files": files}
    with open(os.path.join(directory, RECORD), "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.write("\n")


def _read_record(directory: str) -> Optional[Dict[str, dict]]:
    try:
        with open(os.path.join(directory, RECORD), encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("format") != RECORD_FORMAT:
        return None
    files = payload.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    return files


def _mergekit_output_names(directory: str) -> Optional[Set[str]]:
    """The files a plain mergekit output holds, or None when ``directory`` is not one."""
    import yaml

    try:
        with open(os.path.join(directory, MERGEKIT_CONFIG), encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(recipe, dict) or not ({"merge_method", "slices", "modules", "models"} & set(recipe)):
        return None
    names = set(MERGEKIT_NAMES)
    indexed = False
    for index in INDEX_NAMES:
        try:
            with open(os.path.join(directory, index), encoding="utf-8") as handle:
                weight_map = json.load(handle).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(weight_map, dict):
            indexed = True
            names.add(index)
            names.update(v for v in weight_map.values() if isinstance(v, str) and os.sep not in v)
    if not indexed:
        names.update(UNSHARDED_NAMES)
    return names


def unowned_entries(directory: str) -> Tuple[List[str], str]:
    """(entries of ``directory`` no earlier merge wrote, what the directory is): the
    entries a replacement would lose, directories with a trailing ``/``, files a record
    names but that changed since with `` (changed since the merge wrote it)``."""
    with os.scandir(directory) as scanned:
        entries = sorted(scanned, key=lambda e: e.name)
    record = _read_record(directory)
    if record is not None:
        kind = "an earlier layer_swap merge"
        owned = {RECORD}
        changed = set()
        for entry in entries:
            known = record.get(entry.name)
            if known is None or not entry.is_file(follow_symlinks=False):
                continue
            if fingerprint(entry.path) == {"size": known.get("size"), "sha256": known.get("sha256")}:
                owned.add(entry.name)
            else:
                changed.add(entry.name)
    else:
        names = _mergekit_output_names(directory)
        kind = "an earlier mergekit merge" if names is not None else "not the output of a merge"
        owned, changed = names or set(), set()
    out = []
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            out.append(entry.name + "/")
        elif entry.name in changed:
            out.append(f"{entry.name} (changed since the merge wrote it)")
        elif entry.name not in owned or entry.is_symlink():
            out.append(entry.name)
    return out, kind
