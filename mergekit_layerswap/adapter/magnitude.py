"""Magnitude statistics: how far an expert moved from its base, in one streaming pass.

For every floating-point 1-D or 2-D tensor the expert's checkpoint stores (each stored
tensor once; a tied lm_head that is not stored is not counted; other ranks are
skipped) the row value is ``mean |expert - base|`` over that row, in float32 from the
stored values (a 1-D tensor is one row). An expert's statistic ``m`` is the mean of the
row values over all rows; ``weighting: magnitude`` gives it the weight ``weight / m``.

Only one tensor of each model is in memory at a time. Results are cached on disk,
keyed by both models' identity (path or hub id, revision, and the size and
modification time of every weight file), so a second merge with the same experts
(a sweep over zone sizes, say) reads nothing. ``MERGEKIT_LAYERSWAP_NO_CACHE=1`` turns
the cache off; ``MERGEKIT_LAYERSWAP_CACHE`` moves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, Optional, Tuple

from mergekit_layerswap.core.errors import RecipeError

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".index.json")


@dataclass(frozen=True)
class MagnitudeStat:
    mean_row_mav: float
    rows: int
    tensors: int


def cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "mergekit-layerswap")
    return os.environ.get("MERGEKIT_LAYERSWAP_CACHE", default)


def cache_enabled() -> bool:
    return os.environ.get("MERGEKIT_LAYERSWAP_NO_CACHE", "").lower() not in ("1", "true", "yes")


def _identity(model, local_path: str) -> dict:
    files = []
    for name in sorted(os.listdir(local_path)):
        if name.endswith(WEIGHT_SUFFIXES):
            stat = os.stat(os.path.join(local_path, name))
            files.append([name, stat.st_size, stat.st_mtime_ns])
    return {"model": str(model), "path": os.path.abspath(local_path), "files": files}


def cache_key(expert_path: str, expert, base_path: str, base) -> str:
    payload = {
        "version": CACHE_VERSION,
        "expert": _identity(expert, expert_path),
        "base": _identity(base, base_path),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _ordered_names(index) -> Iterator[str]:
    """Tensor names shard by shard, so each shard is opened once."""
    by_shard: Dict[str, list] = {}
    for name, shard in index.tensor_paths.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard):
        yield from by_shard[shard]


def row_mav(expert_tensor, base_tensor, block_elements: int = 1 << 22):
    """Per-row mean absolute change in float32; a 1-D tensor is one row.

    Rows are processed in blocks of about ``block_elements`` values, so the float32
    working copies stay small even for a large embedding matrix in bf16."""
    import torch

    if expert_tensor.ndim == 1:
        expert_tensor, base_tensor = expert_tensor.reshape(1, -1), base_tensor.reshape(1, -1)
    rows, columns = expert_tensor.shape
    step = max(1, block_elements // max(columns, 1))
    out = torch.empty(rows, dtype=torch.float32, device=expert_tensor.device)
    for start in range(0, rows, step):
        block = expert_tensor[start:start + step].float()
        block.sub_(base_tensor[start:start + step].float()).abs_()
        out[start:start + step] = block.mean(dim=1)
    return out


def stream_row_mavs(expert, base, device: str = "cpu", quiet: bool = True, desc: str = "") -> Iterator[Tuple[str, object]]:
    """Yield (tensor name, row-MAV vector) for every counted tensor of ``expert``."""
    import tqdm
    from mergekit.io.tasks import LoaderCache

    expert_loader = LoaderCache().get(expert)
    base_loader = LoaderCache().get(base)
    names = list(_ordered_names(expert_loader.index))
    for name in tqdm.tqdm(names, desc=desc or f"Magnitude of {expert}", disable=quiet):
        x = expert_loader.get_tensor(name, device=device)
        if not x.is_floating_point() or x.ndim not in (1, 2):
            continue
        if name not in base_loader.index.tensor_paths:
            raise RecipeError(
                f"base_model {base} has no tensor {name}, which expert {expert} stores; "
                f"base_model must be the model the experts were fine-tuned from"
            )
        y = base_loader.get_tensor(name, device=device)
        if y.shape != x.shape:
            raise RecipeError(
                f"base_model {base} stores {name} with shape {list(y.shape)} but expert "
                f"{expert} has {list(x.shape)}; base_model must be the model the experts were "
                f"fine-tuned from"
            )
        yield name, row_mav(x, y)
        del x, y
    expert_loader.flush()
    base_loader.flush()


def compute_magnitude(expert, base, device: str = "cpu", quiet: bool = True) -> MagnitudeStat:
    total = 0.0
    rows = 0
    tensors = 0
    for _name, values in stream_row_mavs(expert, base, device=device, quiet=quiet):
        total += float(values.double().sum())
        rows += values.numel()
        tensors += 1
    if rows == 0 or total <= 0.0:
        raise RecipeError(
            f"expert {expert} does not differ from base_model {base} (mean row change is 0); "
            f"weighting: magnitude needs experts fine-tuned away from the base"
        )
    return MagnitudeStat(mean_row_mav=total / rows, rows=rows, tensors=tensors)


def local_path(model) -> str:
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model).index.base_path


def _cache_file(expert, base) -> str:
    key = cache_key(local_path(expert), expert, local_path(base), base)
    return os.path.join(cache_dir(), f"magnitude-{key}.json")


def cached_magnitude(expert, base) -> Optional[MagnitudeStat]:
    """The cached statistic, or None; never reads a tensor."""
    if not cache_enabled():
        return None
    path = _cache_file(expert, base)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return MagnitudeStat(**json.load(handle))


def magnitude(expert, base, device: str = "cpu", quiet: bool = True) -> MagnitudeStat:
    """The expert's mean row change against ``base``, from the cache when possible."""
    stat = cached_magnitude(expert, base)
    if stat is not None:
        LOG.info("magnitude of %s from cache: %.6g", expert, stat.mean_row_mav)
        return stat
    stat = compute_magnitude(expert, base, device=device, quiet=quiet)
    if cache_enabled():
        path = _cache_file(expert, base)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(asdict(stat), handle)
        os.replace(tmp, path)
    return stat
