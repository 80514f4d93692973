# SPDX-License-Identifier: LGPL-3.0-only
"""Magnitude statistics: how far an expert moved from its base, in one streaming pass.

For every floating-point 1-D, 2-D or 3-D tensor the expert's checkpoint stores (each
stored tensor once; a tied lm_head that is not stored is not counted; other ranks, such
as convolution kernels, are skipped) the row value is ``mean |expert - base|`` over that
row, in float32 from the stored values. A 1-D tensor is one row; a 3-D tensor is a stack
of matrices (a mixture-of-experts layer's experts fused, ``experts x rows x columns``)
and its rows are every expert matrix's rows, so a checkpoint that stores one 2-D tensor
per expert and one that stores them fused have the same rows and the same statistic.
An expert's statistic ``m`` is the mean of the row values over all rows;
``weighting: magnitude`` gives it the weight ``weight / m``.

All experts are measured in one pass over the base (``magnitudes``): each base tensor is
read once and compared with every expert's, so every file is read once. Only one tensor
of each model is in memory at a time. A NaN or infinity in any tensor that enters the
statistic is refused, naming the model and the tensor.

Results are cached on disk, keyed by both models' identity (path or hub id, revision,
and the size, modification time, inode, change time and device of every weight file;
``utime`` can set a file's mtime back, never its ctime), so a second merge with the same
experts (a sweep over zone sizes, say) reads nothing. A cache entry that cannot be read,
is not valid JSON or holds a value that is not finite and positive is recomputed with a
warning; a cache that cannot be written only costs a warning.
``MERGEKIT_LAYERSWAP_NO_CACHE=1`` turns the cache off; ``MERGEKIT_LAYERSWAP_CACHE`` moves it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from mergekit_layerswap.adapter.readahead import Readahead, SafetensorsOffsets, tensor_range
from mergekit_layerswap.core.environment import env_flag
from mergekit_layerswap.core.errors import OptionError, RecipeError
from mergekit_layerswap.core.files import atomic_file, directory_identity

LOG = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: inode, ctime and device in the key
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".index.json")
COUNTED_RANKS = (1, 2, 3)  # tensor ranks the statistic counts (3: fused experts)


@dataclass(frozen=True)
class MagnitudeStat:
    mean_row_mav: float
    rows: int
    tensors: int


def cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "mergekit-layerswap")
    return os.environ.get("MERGEKIT_LAYERSWAP_CACHE", default)


def cache_enabled() -> bool:
    return not env_flag("MERGEKIT_LAYERSWAP_NO_CACHE")


def _identity(model, local_path: str) -> dict:
    return directory_identity(model, local_path, WEIGHT_SUFFIXES)


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


def row_mav(expert_tensor, base_tensor, block_elements: int = 1 << 22, buffers: Optional[list] = None):
    """Per-row mean absolute change in float32; a 1-D tensor is one row, a 3-D tensor's
    rows are the rows of each of its matrices.

    Rows are processed in blocks of about ``block_elements`` values, so the float32
    working copies stay small even for a large embedding matrix in bf16. ``buffers``
    (a list, filled on first use) lets a caller reuse the two float32 blocks from one
    tensor to the next: a fresh allocation per block costs page faults that took a large
    part of the pass. The operations per block are the same either way (same bits)."""
    import torch

    if expert_tensor.ndim != 2:  # 1-D: one row; 3-D: every matrix's rows
        columns = expert_tensor.shape[-1]
        expert_tensor, base_tensor = expert_tensor.reshape(-1, columns), base_tensor.reshape(-1, columns)
    rows, columns = expert_tensor.shape
    step = max(1, block_elements // max(columns, 1))
    device = expert_tensor.device
    out = torch.empty(rows, dtype=torch.float32, device=device)
    if buffers is None:
        buffers = []
    need = min(step, rows) * columns
    if not buffers or buffers[0].numel() < need or buffers[0].device != device:
        buffers[:] = [torch.empty(max(need, min(block_elements, 1 << 22)), dtype=torch.float32, device=device)]
        buffers.append(torch.empty_like(buffers[0]))
    for start in range(0, rows, step):
        count = min(step, rows - start)
        block = buffers[0][: count * columns].view(count, columns)
        base_block = buffers[1][: count * columns].view(count, columns)
        block.copy_(expert_tensor[start : start + count])  # never the input itself
        base_block.copy_(base_tensor[start : start + count])
        block.sub_(base_block).abs_()
        torch.mean(block, dim=1, out=out[start : start + count])
    return out


def _check_finite(values, expert, base, name, x, y) -> None:
    """Refuse a non-finite statistic, naming the model whose tensor holds NaN or inf."""
    import torch

    if bool(torch.isfinite(values).all()):
        return
    for model, tensor, what in ((expert, x, "expert"), (base, y, "base_model")):
        if not bool(torch.isfinite(tensor).all()):
            raise RecipeError(
                f"{what} {model} has non-finite values (NaN or inf) in tensor {name}; weighting: "
                f"magnitude needs finite weights: repair or re-export that checkpoint"
            )
    raise RecipeError(
        f"the change of expert {expert} from base_model {base} in tensor {name} overflows float32; "
        f"weighting: magnitude cannot measure it: use weighting: uniform"
    )


def _base_tensor(base_loader, base, expert, name, shape, device):
    if name not in base_loader.index.tensor_paths:
        raise RecipeError(
            f"base_model {base} has no tensor {name}, which expert {expert} stores; "
            f"base_model must be the model the experts were fine-tuned from"
        )
    y = base_loader.get_tensor(name, device=device)
    if y.shape != shape:
        raise RecipeError(
            f"base_model {base} stores {name} with shape {list(y.shape)} but expert "
            f"{expert} has {list(shape)}; base_model must be the model the experts were "
            f"fine-tuned from"
        )
    return y


def stream_row_mavs(
    expert, base, device: str = "cpu", quiet: bool = True, desc: str = ""
) -> Iterator[Tuple[str, object]]:
    """Yield (tensor name, row-MAV vector) for every counted tensor of ``expert``."""
    for name, values in stream_row_mavs_of(
        [expert], base, device=device, quiet=quiet, desc=desc or f"Magnitude of {expert}"
    ):
        yield name, values[0]


def stream_row_mavs_of(
    experts: Sequence, base, device: str = "cpu", quiet: bool = True, desc: str = ""
) -> Iterator[Tuple[str, list]]:
    """Yield (tensor name, [row-MAV vector or None per expert]) for every tensor any expert
    counts, in the base's shard order: each base tensor is read once for all experts."""
    import tqdm
    from mergekit.io.tasks import LoaderCache

    loaders = [LoaderCache().get(expert) for expert in experts]
    base_loader = LoaderCache().get(base)
    for loader in loaders + [base_loader]:
        loader.flush()  # a shard left open by an earlier merge in this process may be a replaced file
    stored = set()
    for loader in loaders:
        stored.update(loader.index.tensor_paths)
    in_base = [name for name in _ordered_names(base_loader.index) if name in stored]
    rest = sorted(stored - set(in_base))  # not in the base: refused below, by the first expert storing it
    names = in_base + rest
    buffers: list = []  # float32 working blocks, reused for every tensor
    with Readahead(_read_order(names, loaders, base_loader)) as readahead:
        for step, name in enumerate(tqdm.tqdm(names, desc=desc or "Magnitude statistics", disable=quiet)):
            y = None
            values = []
            for expert, loader in zip(experts, loaders):
                if name not in loader.index.tensor_paths:
                    values.append(None)
                    continue
                x = loader.get_tensor(name, device=device)
                if not x.is_floating_point() or x.ndim not in COUNTED_RANKS:
                    values.append(None)
                    continue
                if y is None:
                    y = _base_tensor(base_loader, base, expert, name, x.shape, device)
                elif y.shape != x.shape:
                    _base_tensor(base_loader, base, expert, name, x.shape, device)  # raises
                row_values = row_mav(x, y, buffers=buffers)
                _check_finite(row_values, expert, base, name, x, y)
                values.append(row_values)
                del x
            del y
            readahead.reached(step)
            if any(v is not None for v in values):
                yield name, values
    for loader in loaders:
        loader.flush()
    base_loader.flush()


def _read_order(names, loaders, base_loader):
    """The byte ranges the pass reads, in its order (each expert's tensor, then the base's)."""
    offsets = SafetensorsOffsets()
    ranges = []
    for step, name in enumerate(names):
        for loader in [*loaders, base_loader]:
            where = tensor_range(offsets, loader.index, [name])
            if where is not None:
                ranges.append((step, *where))
    return ranges


def compute_magnitudes(experts: Sequence, base, device: str = "cpu", quiet: bool = True) -> List[MagnitudeStat]:
    """Every expert's statistic in one pass over the base."""
    totals = [0.0] * len(experts)
    rows = [0] * len(experts)
    tensors = [0] * len(experts)
    for _name, values in stream_row_mavs_of(experts, base, device=device, quiet=quiet):
        for k, v in enumerate(values):
            if v is not None:
                totals[k] += float(v.double().sum())
                rows[k] += v.numel()
                tensors[k] += 1
    stats = []
    for expert, total, count, n in zip(experts, totals, rows, tensors):
        if count == 0 or total <= 0.0:
            raise RecipeError(
                f"expert {expert} does not differ from base_model {base} (mean row change is 0); "
                f"weighting: magnitude needs experts fine-tuned away from the base"
            )
        stats.append(MagnitudeStat(mean_row_mav=total / count, rows=count, tensors=n))
    return stats


def compute_magnitude(expert, base, device: str = "cpu", quiet: bool = True) -> MagnitudeStat:
    return compute_magnitudes([expert], base, device=device, quiet=quiet)[0]


def local_path(model) -> str:
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model).index.base_path


def _cache_file(expert, base) -> str:
    key = cache_key(local_path(expert), expert, local_path(base), base)
    return os.path.join(cache_dir(), f"magnitude-{key}.json")


def _valid(data) -> Optional[MagnitudeStat]:
    if not isinstance(data, dict) or set(data) != {"mean_row_mav", "rows", "tensors"}:
        return None
    m, rows, tensors = data["mean_row_mav"], data["rows"], data["tensors"]
    if not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m) or m <= 0:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (rows, tensors)):
        return None
    return MagnitudeStat(mean_row_mav=float(m), rows=rows, tensors=tensors)


def cached_magnitude(expert, base) -> Optional[MagnitudeStat]:
    """The cached statistic, or None (absent, unreadable or invalid: a warning says
    which); never reads a tensor."""
    if not cache_enabled():
        return None
    path = _cache_file(expert, base)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        LOG.warning("magnitude cache entry %s cannot be read (%s); recomputing", path, error)
        return None
    stat = _valid(data)
    if stat is None:
        LOG.warning("magnitude cache entry %s holds no valid statistic (finite, positive); recomputing", path)
    return stat


def _store(expert, base, stat: MagnitudeStat) -> None:
    """Write a cache entry atomically; a cache that cannot be written costs a warning only."""
    if not cache_enabled():
        return
    path = _cache_file(expert, base)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path) as handle:
            json.dump(asdict(stat), handle)
    except OSError as error:
        LOG.warning("magnitude cache %s cannot be written (%s); the statistic is not cached", path, error)


def check_cache_location(models: Sequence) -> None:
    """The cache is never a model directory or inside one: its entries would be new files
    in an input, which a merge never changes."""
    if not cache_enabled():
        return
    cache = os.path.realpath(cache_dir())
    for model in models:
        place = os.path.realpath(local_path(model))
        if cache == place or cache.startswith(place.rstrip(os.sep) + os.sep):
            raise OptionError(
                f"MERGEKIT_LAYERSWAP_CACHE={cache_dir()} lies in the directory of model {model}, which "
                f"the cache would add files to; point it at a directory of its own (or unset it)"
            )


def magnitudes(experts: Sequence, base, device: str = "cpu", quiet: bool = True) -> Dict[object, MagnitudeStat]:
    """Each expert's mean row change against ``base``: from the cache when possible, the
    rest in one pass that reads the base and each uncached expert once."""
    check_cache_location([*experts, base])
    out: Dict[object, MagnitudeStat] = {}
    missing = []
    for expert in experts:
        if expert in out or expert in missing:
            continue
        stat = cached_magnitude(expert, base)
        if stat is not None:
            LOG.info("magnitude of %s from cache: %.6g", expert, stat.mean_row_mav)
            out[expert] = stat
        else:
            missing.append(expert)
    if missing:
        for expert, stat in zip(missing, compute_magnitudes(missing, base, device=device, quiet=quiet)):
            _store(expert, base, stat)
            out[expert] = stat
    return out


def magnitude(expert, base, device: str = "cpu", quiet: bool = True) -> MagnitudeStat:
    """One expert's mean row change against ``base``, from the cache when possible."""
    return magnitudes([expert], base, device=device, quiet=quiet)[expert]
