# SPDX-License-Identifier: LGPL-3.0-only
"""Validation stage 3, the files: the models' weight files on disk, checked before mergekit
opens them (verified: mergekit 0.1.5).

mergekit's loader answers a missing, empty, truncated or garbage weight file, a missing
shard or a damaged index with a traceback, sometimes after the output directory exists,
and follows whatever shard path an index names (``../elsewhere/x.safetensors``). Here
every local model's weight files are validated from their headers only (no tensor is
read): the header length fits the file, every tensor's byte range lies inside it and
matches its shape and dtype, every shard an index names is a plain relative name that
exists and holds the tensors the index puts there. Paths that name the same files
(``task``, ``task/``, ``./task``, a symlink) are recognised as one model.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Optional, Tuple

from mergekit_layerswap.core.errors import RecipeError

# what mergekit's ShardedTensorIndex.from_disk looks for, in its order
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
_FIX = "re-download or re-save that model"


# element sizes by safetensors header name and by torch name (pickled checkpoints)
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "FLOAT64": 8,
    "FLOAT32": 4,
    "BFLOAT16": 2,
    "FLOAT16": 2,
    "INT64": 8,
    "INT32": 4,
    "INT16": 2,
    "INT8": 1,
    "UINT8": 1,
}


def tensor_bytes(shape, dtype: str) -> int:
    """Bytes of a stored tensor, from its header shape and dtype name."""
    count = 1
    for dim in shape:
        count *= dim
    return count * DTYPE_BYTES[dtype.upper().replace("TORCH.", "")]


def _local_dir(path: Optional[str]) -> Optional[str]:
    return path if path and os.path.isdir(path) else None


def model_identity(model) -> Tuple:
    """What a ModelReference reads: local directories by their real path, so that
    ``task``, ``task/``, ``./task`` and a symlink to it are one model."""

    def place(model_path) -> Tuple:
        if model_path is None:
            return (None,)
        local = _local_dir(model_path.path)
        return (os.path.realpath(local) if local else model_path.path, model_path.revision)

    return place(model.model) + place(model.lora) + (model.override_architecture,)


def _same_place(model) -> str:
    local = _local_dir(model.model.path)
    return os.path.realpath(local) if local else str(model)


def check_distinct_models(recipe) -> None:
    """Every expert is a different model, and none is base_model, however the paths are spelt."""
    base = recipe.base_model
    base_identity = model_identity(base) if base is not None else None
    seen: Dict[Tuple, Tuple[int, Any]] = {}
    for index, expert in enumerate(recipe.experts):
        identity = model_identity(expert.model)
        where = f"models[{index}] ({expert.model})"
        if identity == base_identity:
            raise RecipeError(
                f"{where} is also base_model ({base}; both are {_same_place(base)}); the base is never "
                f"mixed into a layer swap. To swap against the base (the paper's 'revert to base' "
                f"ablation), list it as an expert and drop base_model"
            )
        if identity in seen:
            first, other = seen[identity]
            raise RecipeError(
                f"{where} is listed twice: models[{first}] ({other}) names the same files "
                f"({_same_place(expert.model)}); list each expert once"
            )
        seen[identity] = (index, expert.model)


def _plain_relative(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    if os.path.isabs(name) or name.startswith("~"):
        return False
    return all(part not in ("..", "") for part in name.split("/"))


def read_safetensors_header(path: str) -> Dict[str, Any]:
    """The header of a safetensors file, refused in one line naming the file unless it is
    consistent with the file's size (catches empty, truncated and garbage files)."""
    return read_safetensors_layout(path)[1]


def read_safetensors_layout(path: str) -> Tuple[int, Dict[str, Any]]:
    """(file offset where the tensor data starts, header), checked as ``read_safetensors_header``
    says: a tensor's bytes lie at that offset plus its ``data_offsets``."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if size == 0:
                raise RecipeError(f"weight file {path} is empty; {_FIX}")
            if len(prefix) < 8:
                raise RecipeError(f"weight file {path} is truncated ({size} bytes, not even a header); {_FIX}")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise RecipeError(
                    f"weight file {path} is truncated or not a safetensors file (its header claims "
                    f"{length} bytes, the file has {size}); {_FIX}"
                )
            raw = handle.read(length)
    except FileNotFoundError:
        raise RecipeError(f"weight file {path} is missing; {_FIX}") from None
    except OSError as error:
        raise RecipeError(
            f"cannot read weight file {path} ({error.strerror or error}); check its permissions"
        ) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise RecipeError(f"weight file {path} is not a safetensors file (its header is not a JSON mapping); {_FIX}")

    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            shape = [int(d) for d in entry["shape"]]
            dtype = str(entry["dtype"])
            ok = isinstance(start, int) and isinstance(end, int) and 0 <= start <= end and all(d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise RecipeError(f"weight file {path} has a damaged header entry for tensor {name}; {_FIX}")
        if end > data_size:
            raise RecipeError(
                f"weight file {path} is truncated: tensor {name} ends at byte {end} of the data, which "
                f"has only {data_size} bytes; {_FIX}"
            )
        if dtype.upper() in DTYPE_BYTES and end - start != tensor_bytes(shape, dtype):
            raise RecipeError(
                f"weight file {path} is damaged: tensor {name} ({dtype} {shape}) spans {end - start} "
                f"bytes, not {tensor_bytes(shape, dtype)}; {_FIX}"
            )
    return 8 + length, header


def _check_file(path: str) -> Optional[Dict[str, Any]]:
    if path.endswith(".safetensors"):
        return read_safetensors_header(path)
    if not os.path.exists(path):
        raise RecipeError(f"weight file {path} is missing; {_FIX}")
    if os.path.getsize(path) == 0:
        raise RecipeError(f"weight file {path} is empty; {_FIX}")
    return None


def check_weight_files(model) -> None:
    """A local model's weight files, as mergekit's loader will find them, are complete; so
    is its LoRA adapter, if it has one (``check_adapter_files``)."""
    directory = _local_dir(model.model.path)
    if directory is None:
        return  # a Hub id: mergekit downloads it
    stored = _check_model_directory(model, directory)
    if model.lora is not None:
        check_adapter_files(model, stored)


def _check_model_directory(model, directory: str) -> Optional[Dict[str, Any]]:
    """The model's stored tensors (name -> safetensors header entry) once its files are
    checked; None when a pickled ``.bin`` file holds some of them."""
    chosen = next(
        (
            os.path.join(directory, n)
            for n in WEIGHT_FILES
            if os.path.exists(os.path.join(directory, n)) or os.path.exists(os.path.join(directory, n + ".index.json"))
        ),
        None,
    )
    if chosen is None:
        raise RecipeError(
            f"{model} has no weight file ({' or '.join(WEIGHT_FILES)}, or a sharded .index.json) in "
            f"{directory}; point the recipe at a saved model directory"
        )
    index_path = chosen + ".index.json"
    if not os.path.exists(index_path):
        return _check_file(chosen)
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise RecipeError(f"index {index_path} is damaged (no JSON `weight_map`); {_FIX}") from None
    shards: Dict[str, list] = {}
    for tensor, shard in weight_map.items():
        if not _plain_relative(shard):
            raise RecipeError(
                f"index {index_path} names shard {shard!r} for {tensor}; shard names must be plain "
                f"relative names inside the model directory (no `..`, no absolute path); fix the index"
            )
        shards.setdefault(shard, []).append(tensor)
    stored: Optional[Dict[str, Any]] = {}
    for shard, tensors in sorted(shards.items()):
        path = os.path.join(directory, shard)
        if not os.path.exists(path):
            raise RecipeError(f"shard {path} named by {index_path} is missing; {_FIX}")
        header = _check_file(path)
        if header is None:
            stored = None
            continue
        absent = [t for t in tensors if t not in header]
        if absent:
            raise RecipeError(f"index {index_path} puts {absent[0]} in {path}, which does not hold it; {_FIX}")
        if stored is not None:
            stored.update(header)
    return stored


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what peft loads, in its order
_ADAPTER_FIX = "use the adapter with the model it was trained on, or re-save it with peft's save_pretrained"


def check_adapter_files(model, stored: Optional[Dict[str, Any]]) -> None:
    """A local LoRA adapter (``model+adapter``) before mergekit merges it with peft, which
    answers a missing or damaged file, a rank that contradicts its config or an adapter
    trained on another model with a traceback (and an empty LoRA merge cache entry).
    ``stored``: the base model's header entries, None when they are not known (``.bin``)."""
    adapter = model.lora.path
    where = f"LoRA adapter {adapter} of {model.model.path}"
    if not os.path.isdir(adapter):
        if os.path.exists(adapter) or adapter.count("/") != 1 or adapter.startswith((".", "/", "~")):
            raise RecipeError(f"{where} is not a directory; after `+` give the directory peft's save_pretrained wrote")
        return  # a Hub id: peft downloads it
    config_path = os.path.join(adapter, ADAPTER_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise RecipeError(f"{where} has no {ADAPTER_CONFIG}; {_ADAPTER_FIX}") from None
    except (OSError, ValueError, UnicodeDecodeError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise RecipeError(f"{where}: {config_path} is damaged (not a JSON mapping with an integer `r`); {_ADAPTER_FIX}")
    weights = next(
        (os.path.join(adapter, n) for n in ADAPTER_WEIGHTS if os.path.exists(os.path.join(adapter, n))), None
    )
    if weights is None:
        raise RecipeError(f"{where} has no weight file ({' or '.join(ADAPTER_WEIGHTS)}); {_ADAPTER_FIX}")
    header = _check_file(weights)
    if header is None or stored is None:
        return
    targets = config.get("target_modules")
    if isinstance(targets, list):
        modules = {name.rsplit(".", 1)[0] for name in stored}
        missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if missing:
            raise RecipeError(f"{where} targets modules the model does not have ({', '.join(missing)}); {_ADAPTER_FIX}")
    uniform_rank = not config.get("rank_pattern")
    for name, entry in header.items():
        stem, dot, part = name.rpartition(".lora_")
        if not dot or part not in ("A.weight", "B.weight"):
            continue
        module = stem.removeprefix("base_model.model.")
        shape, target = entry["shape"], stored.get(module + ".weight")
        rank = shape[0] if part == "A.weight" else shape[-1]
        if uniform_rank and rank != config["r"]:
            raise RecipeError(
                f"{where}: {name} has rank {rank} but {ADAPTER_CONFIG} says r={config['r']}; {_ADAPTER_FIX}"
            )
        if target is None:
            raise RecipeError(f"{where}: {name} adapts {module}, which the model does not have; {_ADAPTER_FIX}")
        expected = target["shape"][-1] if part == "A.weight" else target["shape"][0]
        got = shape[-1] if part == "A.weight" else shape[0]
        if len(shape) != 2 or len(target["shape"]) != 2 or got != expected:
            raise RecipeError(
                f"{where} does not fit the model: {name} is {list(shape)} but {module}.weight is "
                f"{list(target['shape'])}; {_ADAPTER_FIX}"
            )
