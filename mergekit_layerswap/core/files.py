# SPDX-License-Identifier: LGPL-3.0-only
"""Two small file-system rules used across the package (standard library only)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", **open_kwargs):
    """Write ``path`` through a temporary file beside it, renamed over ``path`` only when
    the block finishes: a reader never sees a half-written file, and a failure leaves
    the previous file (or none) in place."""
    tmp = f"{path}.{os.getpid()}.tmp"
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str, newline=None) -> None:
    with atomic_file(path, "w", newline=newline) as handle:
        handle.write(text)


def file_identity(path: str) -> dict:
    """What changes whenever a file's content may have changed: size and mtime, and also the
    inode, ctime and device, which ``utime`` cannot set back and a copy over it changes."""
    stat = os.stat(path)
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "ctime_ns": stat.st_ctime_ns,
        "device": stat.st_dev,
    }


def directory_identity(model, local_path: str, suffixes=None) -> dict:
    """The identity of a model directory: its name, resolved path and ``file_identity`` of
    each top-level entry (only names ending in one of ``suffixes``, when given). Any
    rewrite of one of those files changes it (the magnitude cache and the LoRA merge cache
    are keyed by it)."""
    files = []
    for name in sorted(os.listdir(local_path)):
        if suffixes is None or name.endswith(suffixes):
            files.append([name, file_identity(os.path.join(local_path, name))])
    return {"model": str(model), "path": os.path.abspath(local_path), "files": files}


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` that is not a local path: what mergekit would look up on the Hub."""
    return not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "/", "~"))
