# SPDX-License-Identifier: LGPL-3.0-only
"""The LoRA merge cache of a ``layer_swap`` merge: entries keyed by content (verified: mergekit 0.1.5).

mergekit's ``ModelReference.merged`` names a cache entry after the base's and the
adapter's paths and creates it before merging: an adapter retrained in place is never
merged again (the old adapter's weights are used), and a merge that fails leaves an empty
entry every later run trips over. While a ``layer_swap`` merge runs (``active``), this
module's ``merged`` replaces it for local base and adapter directories:

* the entry's name ends in a key over the content identity of both (``core.files.
  directory_identity`` of every top-level file: size, mtime, inode, ctime, device, the
  rule the magnitude cache uses), ``lora_merge_dtype``, ``override_architecture`` and
  the versions of peft and transformers; retraining the adapter gives another entry;
* mergekit's own merge (``merge_and_unload``, ``save_pretrained``: the same bytes) runs in a
  temporary ``.building-<pid>`` directory of the cache; the result gets ``ENTRY_RECORD``
  (the key and a fingerprint of each file, ``ownership.fingerprint``) and is renamed
  into place only when complete; a failed merge removes it, a killed one leaves it for the
  next run to remove;
* an entry is used only when its record holds this key and every file matches its
  fingerprint; any other directory under that name (incomplete, altered, foreign) is
  rebuilt.

A hub base or adapter (not a local directory) keeps mergekit's rule: their content is not
on disk to be identified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from mergekit_layerswap.adapter.ownership import fingerprint, fingerprints
from mergekit_layerswap.core.files import directory_identity

LOG = logging.getLogger(__name__)
ENTRY_RECORD = "mergekit_layerswap_lora_entry.json"
KEY_VERSION = 1
BUILDING = ".building-"

_active = [0]  # >0 while a layer_swap merge runs


@contextlib.contextmanager
def active():
    _active[0] += 1
    try:
        yield
    finally:
        _active[0] -= 1


def _version(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def entry_key(reference, lora_merge_dtype: Optional[str]) -> str:
    payload = {
        "version": KEY_VERSION,
        "base": directory_identity(reference.model, reference.model.path),
        "adapter": directory_identity(reference.lora, reference.lora.path),
        "lora_merge_dtype": lora_merge_dtype,
        "override_architecture": reference.override_architecture,
        "libraries": {name: _version(name) for name in ("peft", "transformers", "torch")},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def entry_path(cache_dir: str, reference, key: str) -> str:
    name = f"{os.path.basename(os.path.normpath(reference.model.path))}_" + os.path.basename(
        os.path.normpath(reference.lora.path)
    )
    return os.path.join(cache_dir, f"{name}_{key[:24]}")


def entry_is_complete(path: str, key: str) -> bool:
    """``path`` holds a finished merge for ``key``, unchanged since it was built."""
    try:
        with open(os.path.join(path, ENTRY_RECORD), encoding="utf-8") as handle:
            record = json.load(handle)
        if record.get("key") != key or not isinstance(record.get("files"), dict) or not record["files"]:
            return False
        names = {n for n in os.listdir(path) if n != ENTRY_RECORD}
        if names != set(record["files"]):
            return False
        return all(fingerprint(os.path.join(path, n)) == record["files"][n] for n in names)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _record(path: str, key: str) -> None:
    files = fingerprints(path, ENTRY_RECORD)
    with open(os.path.join(path, ENTRY_RECORD), "w", encoding="utf-8") as handle:
        json.dump({"key": key, "files": files}, handle, indent=1, sort_keys=True)


def _remove_dead_builds(cache_dir: str) -> None:
    from mergekit_layerswap.adapter.output import pid_alive

    try:
        names = os.listdir(cache_dir)
    except OSError:
        return
    for name in names:
        if name.startswith(BUILDING) and name[len(BUILDING) :].isdigit() and not pid_alive(int(name[len(BUILDING) :])):
            LOG.info("removing %s, left by a LoRA merge that did not finish", name)
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def _is_local(reference) -> bool:
    return os.path.isdir(reference.model.path) and os.path.isdir(reference.lora.path)


def verified_merged(original):
    """``ModelReference.merged`` with content-keyed, verified entries while ``active``."""

    def merged(self, cache_dir=None, trust_remote_code=False, lora_merge_dtype=None):
        if not _active[0] or not self.lora or not cache_dir or not _is_local(self):
            return original(
                self, cache_dir=cache_dir, trust_remote_code=trust_remote_code, lora_merge_dtype=lora_merge_dtype
            )
        from mergekit.common import ModelPath, ModelReference

        key = entry_key(self, lora_merge_dtype)
        entry = entry_path(cache_dir, self, key)
        if not entry_is_complete(entry, key):
            _build(original, self, cache_dir, entry, key, trust_remote_code, lora_merge_dtype)
        return ModelReference(model=ModelPath(path=entry))

    return merged


def _build(original, reference, cache_dir, entry, key, trust_remote_code, lora_merge_dtype) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    _remove_dead_builds(cache_dir)
    building = os.path.join(cache_dir, f"{BUILDING}{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    os.mkdir(building)
    try:
        built = original(
            reference, cache_dir=building, trust_remote_code=trust_remote_code, lora_merge_dtype=lora_merge_dtype
        ).model.path
        _record(built, key)
        if os.path.lexists(entry):  # incomplete, altered or foreign: rebuilt
            LOG.warning("LoRA merge cache entry %s is not a complete merge of these inputs: rebuilding it", entry)
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry)
            else:
                os.remove(entry)
        try:
            os.rename(built, entry)
        except OSError:
            if not entry_is_complete(entry, key):  # another process finished the same entry first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def forget_loaded() -> None:
    """Drop the loaders mergekit's ``LoaderCache`` keeps for LoRA references: in a second
    merge in one process they would point at the entry of an adapter that may have changed."""
    from mergekit.io.tasks import LoaderCache

    loaders = LoaderCache().loaders
    for reference in list(loaders):
        if getattr(reference, "lora", None) is not None:
            loaders.pop(reference).flush()
