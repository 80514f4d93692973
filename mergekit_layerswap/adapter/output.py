# SPDX-License-Identifier: LGPL-3.0-only
"""Where a ``layer_swap`` merge writes, and how (verified: mergekit 0.1.5).

mergekit writes straight into the output directory, over whatever is there: into an
input expert, over an earlier merge (whose other shards then stay behind), or half of a
model when the process dies or the disk fills. For ``merge_method: layer_swap`` this
module, called from ``planner.py``'s wrappers of ``mergekit.merge.run_merge`` and
``mergekit.scripts.multimerge.MergeModelTask.execute``, makes every merge:

* refuse, before anything is written, an output that is, lies inside or contains any
  input (experts, base_model, LoRA adapters, tokenizer sources, the LoRA merge cache),
  however the paths are spelt: paths are resolved and directories compared by identity;
* refuse an existing output directory holding anything no earlier merge wrote there
  (decided by the merge's record of its files, ``ownership.py``, never by file names),
  unless ``MERGEKIT_LAYERSWAP_REPLACE_OUTPUT=1``;
* refuse when the free space is below the bytes the output's tensors need;
* build the merge in a sibling ``<target>.layerswap-tmp-<pid>``, record the files it
  wrote there (``ownership.RECORD``), and swap it into place only when complete
  (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old directory is renamed aside
  first, a short gap in which the target is absent and the previous merge lies in
  ``<target>.layerswap-old-<pid>``);
* remove the temporary directories of dead processes it finds next to the target.

A killed, interrupted or failed merge therefore leaves the previous target intact (or
no target), and a finished one holds nothing but its own files.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import re
import shutil
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

from mergekit_layerswap.adapter.ownership import write_record
from mergekit_layerswap.core.environment import env_flag
from mergekit_layerswap.core.errors import OutputError

LOG = logging.getLogger(__name__)

REPLACE_ENV = "MERGEKIT_LAYERSWAP_REPLACE_OUTPUT"
TEMP_MARK = ".layerswap-tmp-"
ASIDE_MARK = ".layerswap-old-"

# margin for safetensors headers, config and tokenizer files beyond the tensors
_SPACE_MARGIN = 64 << 10

# temporary directory basename -> the basename mergekit would have seen without it
# (the model card is named after the output directory, never the temporary one)
_FINAL_NAMES: Dict[str, str] = {}


def replace_opted_in() -> bool:
    return env_flag(REPLACE_ENV)


def card_name(name: Optional[str]) -> Optional[str]:
    """The name mergekit gives the card, with the temporary directory's name undone."""
    return _FINAL_NAMES.get(name, name) if name is not None else None


# ------------------------------------------------------------------ inputs
def _model_references(value: Any, where: str) -> Iterator[Tuple[str, Any]]:
    """(location in the recipe, ModelReference) for every model the config names."""
    from mergekit.common import ModelReference
    from pydantic import BaseModel

    if isinstance(value, ModelReference):
        yield where, value
    elif isinstance(value, BaseModel):
        for key in type(value).model_fields:
            yield from _model_references(getattr(value, key), f"{where}.{key}" if where else key)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _model_references(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _model_references(item, f"{where}[{index}]")


def _with_role(config, where: str) -> str:
    match = re.fullmatch(r"models\[(\d+)\]", where)
    if match and config.models:
        role = (config.models[int(match.group(1))].parameters or {}).get("role")
        if isinstance(role, str):
            return f"the {role} expert {where}"
    return where


def input_locations(config, options) -> List[Tuple[str, str]]:
    """(where the recipe names it, path as spelt) of every local directory the merge reads."""
    found: List[Tuple[str, str]] = []
    for where, reference in _model_references(config, ""):
        where = where[: -len(".model")] if where.endswith(".model") else where
        where = _with_role(config, where)
        found.append((where, reference.model.path))
        if reference.lora is not None:
            found.append((f"{where} LoRA adapter", reference.lora.path))
    cache = getattr(options, "lora_merge_cache", None)
    if cache:
        found.append(("the LoRA merge cache (--lora-merge-cache)", cache))
    return [(where, path) for where, path in found if path and os.path.exists(path)]


def _identities(path: str) -> List[Tuple[int, int]]:
    """(device, inode) of ``path`` and of each of its existing ancestors."""
    out = []
    current = os.path.realpath(path)
    while True:
        try:
            info = os.stat(current)
            out.append((info.st_dev, info.st_ino))
        except OSError:
            pass
        parent = os.path.dirname(current)
        if parent == current:
            return out
        current = parent


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _within(inner: str, outer: str) -> bool:
    """``inner`` is ``outer`` or lies inside it (by resolved path or by directory identity)."""
    inner_real, outer_real = os.path.realpath(inner), os.path.realpath(outer)
    if inner_real == outer_real or inner_real.startswith(outer_real.rstrip(os.sep) + os.sep):
        return True
    outer_id = _identity(outer_real)
    return outer_id is not None and outer_id in _identities(inner_real)


def check_not_an_input(out_path: str, inputs: List[Tuple[str, str]]) -> None:
    for where, path in inputs:
        if _within(out_path, path):
            same = _identity(out_path) is not None and _identity(out_path) == _identity(path)
            relation = "is" if same or os.path.realpath(out_path) == os.path.realpath(path) else "is inside"
        elif _within(path, out_path):
            relation = "contains"
        else:
            continue
        raise OutputError(
            f"output directory {out_path} {relation} an input of the merge, {where} ({path}); "
            f"a merge never writes into, over or inside its inputs: choose an output directory "
            f"outside every model"
        )


# ------------------------------------------------------------------ target
def check_target(out_path: str, target: str) -> None:
    """An existing target may be replaced only when nothing in it would be lost: empty, or
    holding only files an earlier merge wrote, unchanged (``ownership.py``), or opted in."""
    from mergekit_layerswap.adapter.ownership import unowned_entries

    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise OutputError(f"output path {out_path} exists and is not a directory; choose a directory path")
    if os.path.ismount(target):
        raise OutputError(
            f"output directory {out_path} is a mount point, which cannot be replaced atomically; "
            f"merge into a directory inside it (e.g. {os.path.join(out_path, 'merged')})"
        )
    if replace_opted_in():
        return
    lost, kind = unowned_entries(target)
    if lost:
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        whose = (
            "it is not the output of a merge (no mergekit_config.yml, no record of a merge's files)"
            if kind.startswith("not")
            else f"it holds {kind}, which did not write them"
        )
        raise OutputError(
            f"output directory {out_path} holds files a merge does not write ({shown}): {whose}, and "
            f"replacing it would lose them; move them away, choose another output directory, or set "
            f"{REPLACE_ENV}=1 to replace the whole directory"
        )


def pid_alive(pid: int) -> bool:
    """Whether the process that named a temporary directory after its pid still runs."""
    if pid == os.getpid():
        return False  # a directory of ours from an earlier, failed attempt of this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: str, inputs: List[Tuple[str, str]]) -> None:
    """Remove ``<target>.layerswap-tmp-<pid>`` (and ``-old-``) directories of dead processes.
    An old directory left by the fallback swap's gap is moved back when the target is absent."""
    parent, base = os.path.split(target)
    pattern = re.compile(re.escape(base) + r"\.layerswap-(tmp|old)-(\d+)$")
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        path = os.path.join(parent, name)
        if not match or os.path.islink(path) or not os.path.isdir(path) or pid_alive(int(match.group(2))):
            continue
        if any(_within(path, p) or _within(p, path) for _, p in inputs):
            continue
        if match.group(1) == "old" and not os.path.lexists(target):
            LOG.warning("restoring %s from %s (a replacement was interrupted)", target, path)
            os.rename(path, target)
            continue
        LOG.info("removing %s, left by a merge that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------ space
def _dtype_bytes(name: Optional[str]) -> Optional[int]:
    from mergekit_layerswap.adapter.file_checks import DTYPE_BYTES

    return DTYPE_BYTES.get(str(name).upper()) if name else None


def output_bytes(config) -> Optional[int]:
    """Bytes the output needs: the first local expert's stored tensors in the output dtype
    (from the file headers, as ``explain`` counts them), plus its other small files.
    None when no expert is a plain local checkpoint (hub ids, LoRA) or its headers cannot
    be read (the merge's own checks then report the problem)."""
    from mergekit_layerswap.adapter.file_checks import DTYPE_BYTES, tensor_bytes
    from mergekit_layerswap.adapter.header_checks import stored_tensors

    out_dtype = config.out_dtype or config.dtype
    element = _dtype_bytes(out_dtype)
    if out_dtype and element is None:
        return None
    for reference in config.referenced_models():
        if reference == config.base_model or reference.lora or not os.path.isdir(reference.model.path):
            continue
        try:
            stored = stored_tensors(reference)
        except Exception:  # noqa: BLE001 - unreadable headers are reported by the merge's checks
            return None
        total = 0
        for shape, dtype in stored.values():
            raw = tensor_bytes(shape, dtype)
            total += raw if element is None else raw // DTYPE_BYTES[dtype.upper().replace("TORCH.", "")] * element
        for entry in os.scandir(reference.model.path):
            if entry.is_file() and not entry.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                total += entry.stat().st_size
        return total + _SPACE_MARGIN
    return None


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def check_free_space(out_path: str, target: str, needed: Optional[int]) -> None:
    if needed is None:
        return
    where = _existing_ancestor(os.path.dirname(target))
    free = shutil.disk_usage(where).free
    if free < needed:
        raise OutputError(
            f"not enough free space for the merge in {out_path}: it needs about {_human(needed)} "
            f"and {where} has {_human(free)} free; free some space or choose an output directory "
            f"on a larger disk"
        )


# ------------------------------------------------------------------ swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(new: str, target: str) -> bool:
    """Atomically swap two existing directories (Linux); False where unsupported."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False  # kernel or filesystem without RENAME_EXCHANGE
    raise OSError(code, os.strerror(code), target)


def start_writeback(path: str) -> None:
    """Ask the kernel to write a finished shard now and to drop its pages once written.
    Left to itself it keeps gigabytes of dirty output in the page cache, then throttles
    the writer and flushes in ``_fsync_tree``: 6.4 GB in 500 MB files took 15-18 s that
    way and 5.5-7 s with this hint on the bench machine (docs/performance.md). The call
    waits while the disk takes the data, so ``Writeback`` makes it on its own thread. A
    hint only: a write error still surfaces at the fsync."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


class Writeback:
    """``start_writeback`` for each finished shard, in order, on one background thread,
    so the merge goes on while the disk writes. ``close`` waits for the thread."""

    def __init__(self) -> None:
        self._paths: "queue.Queue[Optional[str]]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, path: str) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="layerswap-writeback", daemon=True)
            self._thread.start()
        self._paths.put(path)

    def _run(self) -> None:
        while (path := self._paths.get()) is not None:
            start_writeback(path)

    def close(self) -> None:
        if self._thread is not None:
            self._paths.put(None)
            self._thread.join()
            self._thread = None


def _fsync_tree(path: str) -> None:
    """Flush the finished merge to disk before it becomes the target (a crash of the
    machine must not leave a target of empty files)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install(temp: str, target: str) -> None:
    """Put the finished ``temp`` in place of ``target`` and remove what was there."""
    _fsync_tree(temp)
    if not os.path.lexists(target):
        os.rename(temp, target)
    elif exchange(temp, target):
        shutil.rmtree(temp, ignore_errors=True)  # now the previous contents
    else:
        # no atomic exchange: the target is absent between these two renames; a process
        # killed in that gap leaves the previous merge in <target>.layerswap-old-<pid>,
        # which the next run moves back
        aside = f"{target}{ASIDE_MARK}{os.getpid()}"
        os.rename(target, aside)
        os.rename(temp, target)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(os.path.dirname(target))


# ------------------------------------------------------------------ the run
def _io_reason(error: BaseException) -> Optional[str]:
    """The operating system's words for an I/O failure (OSError, or safetensors' writer)."""
    if isinstance(error, OSError):
        text = error.strerror or str(error)
        return f"{text} ({error.filename})" if error.filename else text
    if type(error).__name__ == "SafetensorError":
        match = re.search(r"os error (\d+)", str(error))
        if match:
            return os.strerror(int(match.group(1)))
    return None


def _make_parents(parent: str) -> List[str]:
    """Create missing parents of the target; return those created (to remove on failure)."""
    created = []
    path = parent
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    for path in reversed(created):
        os.mkdir(path)
    return created


def run_atomically(original, merge_config, out_path: str, options, config_source=None, **kwargs):
    """``mergekit.merge.run_merge`` for a layer_swap config, with the guarantees above."""
    from mergekit_layerswap.adapter.devices import check_merge_options

    check_merge_options(options)
    out_path = os.fspath(out_path)
    target = os.path.realpath(out_path)
    inputs = input_locations(merge_config, options)
    check_not_an_input(out_path, inputs)
    check_target(out_path, target)
    remove_stale_temporaries(target, inputs)
    check_free_space(out_path, target, output_bytes(merge_config))

    temp = f"{target}{TEMP_MARK}{os.getpid()}"
    created: List[str] = []
    try:
        created = _make_parents(os.path.dirname(target))
        if os.path.lexists(temp):
            shutil.rmtree(temp)
        os.mkdir(temp)
    except OSError as error:
        _remove_created(created)
        raise OutputError(
            f"cannot write to the output location of {out_path}: {_io_reason(error)}; choose an "
            f"output directory on a writable disk"
        ) from None

    if config_source is None:
        # mergekit writes ``merge_config.to_yaml()`` after planning, which rewrites the
        # config in place (``models:`` becomes ``modules: ... slices:``): record the recipe
        # as given, so mergekit-multi's lazy mode can recognise its stage
        config_source = merge_config.to_yaml()
    _FINAL_NAMES[os.path.basename(temp)] = os.path.basename(out_path)
    try:
        original(merge_config, temp, options, config_source, **kwargs)
        if not os.path.isdir(temp) or not os.listdir(temp):
            raise OutputError(f"the merge wrote nothing for {out_path}; {out_path} was left as it was")
        write_record(temp)
        install(temp, target)
    except BaseException as error:
        shutil.rmtree(temp, ignore_errors=True)
        _remove_created(created)
        reason = _io_reason(error)
        if reason is None:
            raise
        state = "was left as it was" if os.path.lexists(target) else "was not created"
        raise OutputError(
            f"writing the merge failed: {reason}; {out_path} {state} and the partial output was "
            f"removed; free space or fix the output location and run again"
        ) from None
    finally:
        _FINAL_NAMES.pop(os.path.basename(temp), None)


def _remove_created(created: List[str]) -> None:
    for path in created:  # innermost first
        try:
            os.rmdir(path)
        except OSError:
            return


# ------------------------------------------------------------- mergekit-multi
def _normalised(text: str):
    import yaml
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(yaml.safe_load(text)).model_dump(mode="json")


def check_stage_output(out_path: str, config_yaml: str, options, lazy: bool) -> None:
    """A layer_swap stage of mergekit-multi, before any stage runs: its devices, and its
    output unless the lazy mode will skip it (the same recipe is already there)."""
    from mergekit_layerswap.adapter.devices import check_merge_options

    check_merge_options(options)
    if lazy and stored_config_matches(out_path, config_yaml):
        return
    check_target(out_path, os.path.realpath(out_path))


def stored_config_matches(out_path: str, config_yaml: str) -> bool:
    """The output's ``mergekit_config.yml`` describes the same merge as ``config_yaml``."""
    try:
        with open(os.path.join(out_path, "mergekit_config.yml"), encoding="utf-8") as handle:
            stored = handle.read()
        return _normalised(stored) == _normalised(config_yaml)
    except Exception:  # noqa: BLE001 - missing, unreadable or not a recipe: rebuild
        return False
