# SPDX-License-Identifier: LGPL-3.0-only
"""The wrappers that adapt mergekit's merge, planner, executor, writer, card and
mergekit-multi for ``layer_swap`` (verified: mergekit 0.1.5).

mergekit's method API gives a kernel the output tensor's name and its inputs, and
only ``validate_inputs(ids, base_id)`` before planning; its planner reads every input
model (plus ``base_model``) for every output tensor. Each function here named
``_<what it does>(original)`` builds the replacement of one mergekit function; which
function each replaces, and why, is the table in ``adaptation.py`` (the one list of
what this package changes in mergekit). Every replacement changes nothing for a recipe
whose ``merge_method`` is not ``layer_swap``.

``MERGEKIT_LAYERSWAP_READ_ALL=1`` plans the unoptimised way (both experts read for
every tensor); outputs are identical, which the tests check.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from mergekit_layerswap.adapter import tensor_checks
from mergekit_layerswap.adapter.tensor_checks import NON_LAYER, VISION
from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.environment import env_flag

LOG = logging.getLogger(__name__)


@dataclass
class SwapRun:
    """What planning one layer_swap merge needs beyond mergekit's own config."""

    recipe: Any  # recipe.SwapRecipe
    info: Any  # checks.ModelsInfo
    magnitudes: Dict[Any, Any] = field(default_factory=dict)  # model -> MagnitudeStat
    integers: Dict[str, str] = field(default_factory=dict)  # integer tensor name -> stored dtype

    def effective_weight(self, expert) -> Optional[float]:
        """weight x 1/m for a scalar weight (None when the weight varies per tensor)."""
        if not isinstance(expert.weight, (int, float)):
            return None
        stat = self.magnitudes.get(expert.model)
        return float(expert.weight) / stat.mean_row_mav if stat else float(expert.weight)


# id(MergeConfiguration) -> (config, SwapRun); the config is kept so the id stays valid
_RUNS: Dict[int, Tuple[Any, SwapRun]] = {}


def is_layer_swap(config) -> bool:
    return getattr(config, "merge_method", None) == METHOD_NAME


def parse(config):
    """``core.recipe.parse_recipe`` with ``blend_method`` checked against mergekit's registry."""
    from mergekit_layerswap.adapter.blend import check_blend
    from mergekit_layerswap.core.recipe import parse_recipe

    return parse_recipe(config, check_blend)


def prepare(config, trust_remote_code: bool = False, check_files: bool = True) -> SwapRun:
    """Validate a layer_swap MergeConfiguration from the recipe, the config.json files and
    (unless ``check_files`` is False: configs without weights) the weight files' headers."""
    from mergekit_layerswap.adapter.header_checks import read_models
    from mergekit_layerswap.adapter.recipe_text_schema import check_dtypes

    recipe = parse(config)
    check_dtypes(config)
    run = SwapRun(recipe=recipe, info=read_models(recipe, trust_remote_code, check_files))
    _RUNS[id(config)] = (config, run)
    return run


def run_for(config) -> Optional[SwapRun]:
    entry = _RUNS.get(id(config))
    return entry[1] if entry and entry[0] is config else None


def read_all() -> bool:
    return env_flag("MERGEKIT_LAYERSWAP_READ_ALL")


def resolve_magnitudes(run: SwapRun, device: str = "cpu", quiet: bool = True) -> None:
    from mergekit_layerswap.adapter.magnitude import magnitudes

    if run.recipe.weighting != "magnitude":
        return
    missing = [e.model for e in run.recipe.experts if e.model not in run.magnitudes]
    if missing:  # one pass: the base is read once for all experts
        run.magnitudes.update(magnitudes(missing, run.recipe.base_model, device=device, quiet=quiet))
    _check_effective_weights(run)


def _check_effective_weights(run: SwapRun) -> None:
    """weight / m must stay usable (core/recipe_value_checks.py); a tiny m makes it huge."""
    from mergekit_layerswap.core.recipe_value_checks import check_normalised, weight_values

    effective = []
    for expert in run.recipe.experts:
        m = run.magnitudes[expert.model].mean_row_mav
        values = weight_values(expert.weight) or []
        effective.append((str(expert.model), [v / m if m > 0 else math.inf for v in values]))
    check_normalised(effective, what="effective weight (weight / mean row change)")


def describe_weights(run: SwapRun) -> str:
    parts = []
    for expert in run.recipe.experts:
        w = run.effective_weight(expert)
        stat = run.magnitudes.get(expert.model)
        text = f"{expert.role} {expert.model}: weight {expert.weight!r}"
        if stat is not None:
            text += f", mean row change {stat.mean_row_mav:.6g}"
        if w is not None and stat is not None:
            text += f", effective weight {w:.6g}"
        parts.append(text)
    return "layer_swap weights: " + "; ".join(parts)


# ---------------------------------------------------------------- mergekit.plan
def _normalize_config(original):
    def normalize_config(self):
        if not is_layer_swap(self.config):
            return original(self)
        from mergekit_layerswap.adapter.header_checks import check_tensors

        run = run_for(self.config) or prepare(self.config, self.options.trust_remote_code)
        configured_tokenizer = bool(self.config.tokenizer or self.config.tokenizer_source)
        original(self)
        stored = check_tensors(
            run.recipe,
            run.info,
            tokenizer_configured=configured_tokenizer,
            dtype_configured=self.config.dtype is not None,
        )
        run.integers = tensor_checks.integer_tensors(run.recipe.models, stored)
        tensor_checks.check_blended_integers(run.recipe, run.info, run.integers)
        device = self.options.device if self.options.cuda or self.options.read_to_gpu else "cpu"
        resolve_magnitudes(run, device=device or "cpu", quiet=self.options.quiet)
        weights = describe_weights(run)
        LOG.info(weights)
        if not self.options.quiet:
            print(weights, file=sys.stderr)
        self._layer_swap = run
        self._layer_swap_layer = None
        self._layer_swap_module = run.info.module_name
        self._layer_swap_integers = set()

    return normalize_config


def _plan_module(original):
    def plan_module(self, module_name, *args, **kwargs):
        if not is_layer_swap(self.config):
            return original(self, module_name, *args, **kwargs)
        self._layer_swap_module = module_name
        try:
            return original(self, module_name, *args, **kwargs)
        finally:
            self._layer_swap_module = self._layer_swap.info.module_name

    return plan_module


def _plan_layer(original):
    def plan_layer(self, *args, **kwargs):
        if not is_layer_swap(self.config):
            return original(self, *args, **kwargs)
        self._layer_swap_layer = self._current_module_layers
        try:
            return original(self, *args, **kwargs)
        finally:
            self._layer_swap_layer = None

    return plan_layer


def _plan_tensor(original):
    def plan_tensor(self, weight, weights_in, models, cfg_reader):
        if not is_layer_swap(self.config):
            return original(self, weight, weights_in, models, cfg_reader)
        from mergekit.common import ImmutableMap

        run: SwapRun = self._layer_swap
        recipe = run.recipe
        layer = self._layer_swap_layer if self._layer_swap_module == run.info.module_name else VISION
        sources = recipe.rule.sources(layer, run.info.num_layers, weight.name)  # as mergekit resolves filters
        with_base = sources.blends and recipe.base_model is not None and recipe.blend_needs_base
        keep = [
            index
            for index, model in enumerate(models)
            if (recipe.role_of(model) is not None and (read_all() or sources.reads(recipe.role_of(model))))
            or (with_base and model == recipe.base_model)
        ]
        planned = len(self._tensors)
        original(
            self,
            weight,
            [weights_in[i] for i in keep],
            [models[i] for i in keep],
            cfg_reader,
        )
        if len(self._tensors) == planned:
            return  # an optional tensor (untied lm_head) no expert stores
        out_weight, task = self._tensors[-1]
        update = {}
        if run.integers and {weight.name, *(weight.aliases or ())} & set(run.integers):
            # never cast an integer tensor to the recipe's float dtype: it is copied, not averaged
            update["gather_tensors"] = _uncast(task.gather_tensors)
            self._layer_swap_integers.add(out_weight.name)
        parameters = dict(task.parameters.items())
        parameters.update(
            layer_index=NON_LAYER if layer is None else layer,
            num_layers=run.info.num_layers,
            blend_options=recipe.blend_options,
        )
        input_parameters = {
            model: ImmutableMap({**dict(values.items()), "magnitude": _magnitude_of(run, model)})
            for model, values in task.input_parameters.items()
        }
        task = task.model_copy(
            update={
                **update,
                "parameters": ImmutableMap(parameters),
                "input_parameters": ImmutableMap(input_parameters),
            }
        )
        pieces = _per_stored_tensor(run, out_weight, task)
        if out_weight.name in self._layer_swap_integers:
            self._layer_swap_integers.update(piece.name for piece, _ in pieces)
        self._tensors[-1:] = pieces

    return plan_tensor


def _per_stored_tensor(run: SwapRun, weight, task):
    """``(weight, task)`` as one output tensor per stored tensor when every expert it reads
    stores it under other names than mergekit's definition (one 2-D matrix per expert of a
    mixture-of-experts layer, or a module transformers renamed): each is blended and
    written on its own under the experts' own names, so the output has their layout,
    instead of being stacked into the fused 3-D tensor of the definition first (a copy of
    every expert's whole fused tensor in memory, and the output as large again).
    Elementwise blends give the same values either way; transformers loads both layouts.
    A tensor the experts store differently from each other, or as is, stays one task."""
    from mergekit.architecture import WeightInfo
    from mergekit.common import ImmutableMap
    from mergekit.io.tasks import GatherTensors, LoaderCache

    from mergekit_layerswap.adapter.layout import loader_sources

    gather = task.gather_tensors
    if not isinstance(gather, GatherTensors):  # vocabulary permutation: never an expert tensor
        return [(weight, task)]
    names = (weight.name, *(weight.aliases or ()))
    stored = set()
    for model in gather.weight_info:
        loader = LoaderCache().get(model)
        if any(name in loader.index.tensor_paths for name in names):
            return [(weight, task)]
        sources = loader_sources(loader, run.info.model_type).get(weight.name)
        stored.add(tuple(sources or ()))
    if len(stored) != 1 or not next(iter(stored)):
        return [(weight, task)]
    out = []
    for name in next(iter(stored)):
        piece = WeightInfo(name=name, force_dtype=weight.force_dtype)
        per_model = {model: piece for model in gather.weight_info}
        out.append(
            (
                piece,
                task.model_copy(
                    update={
                        "gather_tensors": gather.model_copy(update={"weight_info": ImmutableMap(per_model)}),
                        "output_weight": piece,
                    }
                ),
            )
        )
    return out


def _uncast(gather):
    from mergekit.io.tasks import GatherTensors

    if isinstance(gather, GatherTensors):
        return gather.model_copy(update={"dtype": None})
    return gather.model_copy(update={"gather_tensors": _uncast(gather.gather_tensors)})


def _plan_to_disk(original):
    def plan_to_disk(self, *args, **kwargs):
        tasks = original(self, *args, **kwargs)
        integers = getattr(self, "_layer_swap_integers", None) if is_layer_swap(self.config) else None
        if not integers:
            return tasks
        return _saved_uncast(tasks, integers)

    return plan_to_disk


def _saved_uncast(tasks, integers):
    """Integer tensors are saved in their own dtype, not ``out_dtype``."""
    from mergekit.io.tasks import FinalizeModel, SaveTensor

    replaced = {}
    for task in tasks:
        if isinstance(task, SaveTensor) and task.tensor_name in integers and task.dtype is not None:
            replaced[id(task)] = task.model_copy(update={"dtype": None})
    if not replaced:
        return tasks
    out = []
    for task in tasks:
        if isinstance(task, FinalizeModel):
            saves = tuple(replaced.get(id(t), t) for t in task.tensor_save_tasks)
            task = task.model_copy(update={"tensor_save_tasks": saves})
        out.append(replaced.get(id(task), task))
    return out


def _magnitude_of(run: SwapRun, model) -> float:
    stat = run.magnitudes.get(model)
    return stat.mean_row_mav if stat is not None else 1.0


# --------------------------------------------------------------- mergekit.merge
def _validating_architecture_info(original):
    def get_architecture_info(config, options):
        if not is_layer_swap(config):
            return original(config, options)
        from mergekit_layerswap.adapter.magnitude import cache_enabled
        from mergekit_layerswap.adapter.output import replace_opted_in
        from mergekit_layerswap.adapter.readahead import window_bytes

        # a bad MERGEKIT_LAYERSWAP_* value is refused before anything is read or written
        window_bytes(), read_all(), cache_enabled(), replace_opted_in()
        run = prepare(config, options.trust_remote_code)  # weight files too, before mergekit's loader opens them
        return run.info.arch_info

    return get_architecture_info


def _with_donor_as_base(original):
    def with_donor(config, *args, **kwargs):
        run = run_for(config) if is_layer_swap(config) else None
        if run is not None:
            config = config.model_copy(update={"base_model": run.recipe.donor})
        return original(config, *args, **kwargs)

    return with_donor


def _layer_swap_card(original):
    def generate_card(config, config_yaml, name=None):
        run = run_for(config) if is_layer_swap(config) else None
        if run is None:
            return original(config, config_yaml, name=name)
        from mergekit_layerswap.adapter.card import layer_swap_card
        from mergekit_layerswap.adapter.output import card_name

        return layer_swap_card(run, config_yaml, name=card_name(name))

    return generate_card


def _atomic_run_merge(original):
    def run_merge(merge_config, out_path, options, config_source=None, **kwargs):
        if not is_layer_swap(merge_config):
            return original(merge_config, out_path, options, config_source, **kwargs)
        from mergekit_layerswap.adapter import lora_cache
        from mergekit_layerswap.adapter.output import Writeback, run_atomically

        global _WRITEBACK
        outer, _WRITEBACK = _WRITEBACK, Writeback()
        try:
            with lora_cache.active():
                lora_cache.forget_loaded()
                return run_atomically(original, merge_config, out_path, options, config_source, **kwargs)
        finally:
            _WRITEBACK.close()
            _WRITEBACK = outer

    return run_merge


# set while a layer_swap run_merge executes: its executor reads ahead, its writer hands
# each finished shard to this
_WRITEBACK = None


def _reading_ahead(original):
    def _run(self, quiet: bool = False, desc=None):
        if _WRITEBACK is None:
            yield from original(self, quiet=quiet, desc=desc)
            return
        from mergekit_layerswap.adapter.readahead import Readahead

        with Readahead(_load_ranges(self.schedule.tasks, self.targets)) as readahead:
            for step, handle, value in _execute(self, quiet, desc):
                readahead.reached(step)  # every earlier task has run
                yield handle, value

    return _run


def _execute(executor, quiet: bool, desc):
    """mergekit 0.1.5's ``Executor._run`` loop: the same tasks in the same order on the
    same devices, each value dropped after the same step (its ``last_use_index``), the
    targets yielded as they finish; with ``(step, handle, value)`` yielded. Only its
    bookkeeping differs: mergekit asks at every step whether the task is in the targets
    list and walks every value kept so far (the targets' are kept to the end), which is
    O(tasks x tensors), minutes for a mixture-of-experts model's tens of thousands of
    tensors; here a set and values grouped by the step they expire after."""
    from tqdm import tqdm

    last_use = executor.schedule.last_use_index
    targets = set(executor.targets)
    values = dict(executor.cached_values or {})
    expiring: Dict[int, list] = {}
    for handle in values:
        expiring.setdefault(last_use[handle], []).append(handle)
    steps = list(enumerate(executor.schedule.tasks))
    for step, handle in tqdm(steps, disable=quiet, desc=desc or "Executing graph"):
        task = handle.task()
        on_math_device = task.uses_accelerator()
        arguments = {}
        for name, dependency in handle.arguments().items():
            value = values[dependency]
            if on_math_device:
                value = executor._move_tensors(value, executor.math_device)
            arguments[name] = value
            del value
        result = task.execute(**arguments)
        del arguments
        values[handle] = executor._move_tensors(result, executor.storage_device)
        del result
        expiring.setdefault(last_use[handle], []).append(handle)
        if handle in targets:
            yield step, handle, values[handle]
        for expired in expiring.pop(step, ()):
            del values[expired]
    del values


def _shard_keys_once(original):
    def get_tensor(self, key, *args, **kwargs):
        if _WRITEBACK is not None:
            with self.lock:
                if self.current_shard is not None and not isinstance(self.current_shard, _ShardKeys):
                    self.current_shard = _ShardKeys(self.current_shard)
        return original(self, key, *args, **kwargs)

    return get_tensor


class _ShardKeys:
    """An open shard whose ``keys()`` is built once: mergekit's loader asks whether each
    tensor it reads is in the open shard's ``keys()``, which safetensors builds afresh as a
    list every call (O(tensors in the shard) per read). Everything else is the shard's."""

    def __init__(self, shard):
        self._shard = shard
        self._keys = frozenset(shard.keys())

    def keys(self):
        return self._keys

    def __getattr__(self, name):
        return getattr(self._shard, name)


def _converting_from_sources(original):
    def _load_converted_tensor(self, loader):
        if _WRITEBACK is None:  # not a layer_swap merge
            return original(self, loader)
        from mergekit.io.tasks import LoaderCache

        from mergekit_layerswap.adapter.layout import load_converted, loader_sources

        model_type = self.model.config(trust_remote_code=LoaderCache().trust_remote_code).model_type
        by_target = loader_sources(loader, model_type)
        for target in [self.tensor] + list(self.aliases or []):
            if by_target.get(target) and target not in by_target[target]:
                tensor = load_converted(loader, model_type, by_target[target], target, self.device or "cpu")
                if tensor is not None:
                    return tensor
        return original(self, loader)

    return _load_converted_tensor


def _writing_back(original):
    def _write_shard_task(self, shard_data, shard_index, shard_path, *args, **kwargs):
        original(self, shard_data, shard_index, shard_path, *args, **kwargs)
        if _WRITEBACK is not None:
            _WRITEBACK.submit(shard_path)

    return _write_shard_task


def _load_ranges(schedule, targets):
    """(step, path, offset, bytes) of every safetensors tensor a LoadTensor task of the
    schedule reads (named as ``LoadTensor._resolve_name`` resolves it), at the step of the
    first target that needs it: mergekit's loader only maps a file, so the bytes are
    touched when the tensor is blended or written, not when it is "loaded"."""
    from mergekit.io.tasks import LoaderCache, LoadTensor

    from mergekit_layerswap.adapter.readahead import SafetensorsOffsets, tensor_range

    offsets = SafetensorsOffsets()
    targets = set(targets)
    seen = set()
    ranges = []
    for step, handle in enumerate(schedule):
        if handle not in targets:
            continue
        pending = [handle]
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            task = current.task()
            if isinstance(task, LoadTensor):
                names = [task.tensor, *(task.aliases or ()), *(task.tied_names or ())]
                where = tensor_range(offsets, LoaderCache().get(task.model).index, names)
                if where is not None:
                    ranges.append((step, *where))
            else:
                pending.extend(current.arguments().values())
    return ranges


def _local_paths_are_local(original):
    def is_hf(path: str) -> bool:
        if os.path.exists(path):
            return False
        return original(path)

    return is_hf


# ------------------------------------------------- mergekit.scripts.multimerge
def _checking_stages(original):
    def load_config(*args, **kwargs):
        merge_configs, dependencies = original(*args, **kwargs)
        for config in merge_configs.values():
            if is_layer_swap(config):
                parse(config)
        return merge_configs, dependencies

    return load_config


def _checking_stage_outputs(original):
    def make_tasks(*args, **kwargs):
        tasks = original(*args, **kwargs)
        from mergekit_layerswap.adapter.output import check_stage_output

        for task in tasks:  # every layer_swap stage, before the first stage runs
            if _stage_is_layer_swap(task):
                check_stage_output(task.out_path, task.config_yaml, task.options, task.lazy)
        return tasks

    return make_tasks


def _stage_is_layer_swap(task) -> bool:
    import yaml

    return (yaml.safe_load(task.config_yaml) or {}).get("merge_method") == METHOD_NAME


def _lazy_only_when_unchanged(original):
    def execute(self, **kwargs):
        if not self.lazy or not _stage_is_layer_swap(self):
            return original(self, **kwargs)
        from mergekit_layerswap.adapter.output import stored_config_matches

        if os.path.exists(self.out_path) and not stored_config_matches(self.out_path, self.config_yaml):
            LOG.info("%s holds a different merge than stage %s: rebuilding it", self.out_path, self.name)
            return original(self.model_copy(update={"lazy": False}), **kwargs)
        return original(self, **kwargs)

    return execute
