# SPDX-License-Identifier: LGPL-3.0-only
"""Validation stage 3, the files: what the models' configs (architecture, layer count)
and their tensor headers (names, shapes, tying) say. Both run before any output file
exists; the weight files themselves are checked by ``file_checks.py``.

Layer counts and the tensors that form each layer come from mergekit's architecture
definitions (``mergekit/_data/architectures/*.json``), never from tensor names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from mergekit_layerswap.core.architectures import REFUSED, TEXT_MODULE, VISION_LANGUAGE, support_of
from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.files import looks_like_hub_id
from mergekit_layerswap.core.layers import VISION
from mergekit_layerswap.core.recipe import SwapRecipe, check_zone_fit

Position = Union[int, str, None]  # a decoder layer, None (outside the layers) or VISION


@dataclass(frozen=True)
class ModelsInfo:
    arch_info: Any  # mergekit ModelArchitecture, shared by every model
    module_name: str
    configs: Dict[Any, Any]  # ModelReference -> transformers PretrainedConfig
    num_layers: int

    def module(self, model, module_name: Optional[str] = None) -> Any:
        """The text decoder module (or ``module_name``) configured for ``model``."""
        from mergekit.architecture import ConfiguredModuleArchitecture

        definition = self.arch_info.modules[module_name or self.module_name]
        return ConfiguredModuleArchitecture(
            info=definition.architecture,
            config=self.configs[model],
            weight_prefix=definition.weight_prefix,
        )

    def layer_names(self, model) -> List[str]:
        """The tensor names of every decoder layer (what per-module zone filters select)."""
        module = self.module(model)
        return [w.name for layer in range(self.num_layers) for w in module.layer_weights(layer)]

    def weights(self, model) -> List[Tuple[Any, Position]]:
        """(WeightInfo, position) of every tensor mergekit plans, module by module in its
        order: a decoder layer index, None outside the layers, VISION for every tensor of
        a vision-language model's other modules (vision tower, projector)."""
        out: List[Tuple[Any, Position]] = []
        for name in self.arch_info.modules:
            module = self.module(model, name)
            text = name == self.module_name
            count = self.num_layers if text else (module.num_layers() or 0)
            out += [(w, None if text else VISION) for w in module.pre_weights()]
            for layer in range(count):
                out += [(w, layer if text else VISION) for w in module.layer_weights(layer) or ()]
            out += [(w, None if text else VISION) for w in module.post_weights()]
        return out

    def layer_of(self, model) -> Dict[str, Position]:
        """Tensor name (and aliases) -> decoder layer index, None outside the layers,
        VISION outside a vision-language model's text decoder."""
        names: Dict[str, Position] = {}
        for weight, position in self.weights(model):
            for name in (weight.name,) + tuple(weight.aliases or ()):
                names[name] = position
        return names

    @property
    def model_type(self) -> Optional[str]:
        """config.json's model_type, which mergekit's loader converts stored tensors by."""
        return getattr(next(iter(self.configs.values())), "model_type", None)

    def stored_positions(self, model, stored_names) -> Dict[str, Optional[int]]:
        """Stored tensor name -> decoder layer (None outside the layers) for every stored
        tensor the output is made of; a tensor stored one 2-D matrix per expert has the
        position of the fused model-layout tensor it is converted into (``layout.py``)."""
        from mergekit_layerswap.adapter.layout import model_layout_name

        positions = self.layer_of(model)
        out: Dict[str, Optional[int]] = {}
        for name in stored_names:
            target = name if name in positions else model_layout_name(self.model_type, name)
            if target in positions:
                out[name] = positions[target]
        return out


def _all_models(recipe: SwapRecipe) -> List[Any]:
    return recipe.models + ([recipe.base_model] if recipe.base_model is not None else [])


def _describe(model, config) -> str:
    return f"{model} ({(config.architectures or ['?'])[0]})"


def _read_config(model, trust_remote_code: bool):
    path = model.model.path
    if not os.path.exists(path) and not looks_like_hub_id(path):
        raise RecipeError(f"model path {path} does not exist; fix the path in the recipe")
    try:
        return model.config(trust_remote_code=trust_remote_code)
    except Exception as error:  # no network for a hub id, bad json, ...
        text = str(error).strip()
        first_line = text.splitlines()[0] if text else type(error).__name__
        raise RecipeError(f"cannot read config.json of {model}: {first_line}") from None


def read_models(recipe: SwapRecipe, trust_remote_code: bool = False, check_files: bool = True) -> ModelsInfo:
    """Read every model's config.json and check they can be layer-swapped, then check their
    weight files (``check_model_files``): every command that reads a model (a merge,
    ``explain``, ``analyze``, ``suggest``, ``sweep``) comes through here before mergekit's
    tensor index opens a file."""
    from mergekit.architecture import arch_info_for_config

    from mergekit_layerswap.adapter.file_checks import check_distinct_models

    check_distinct_models(recipe)
    configs = {}
    archs = {}
    for model in _all_models(recipe):
        config = _read_config(model, trust_remote_code)
        configs[model] = config
        support = support_of((config.architectures or ["?"])[0], config.model_type)
        if support is not None and support.kind == REFUSED:
            raise RecipeError(f"{_describe(model, config)}: layer_swap cannot describe it: {support.note}")
        arch = arch_info_for_config(config)
        if arch is None:
            raise RecipeError(
                f"{_describe(model, config)}: mergekit has no architecture definition for it, "
                f"so its layers are unknown; use a model of an architecture mergekit supports"
            )
        vision_language = support is not None and support.kind == VISION_LANGUAGE and TEXT_MODULE in arch.modules
        if len(arch.modules) != 1 and not vision_language:
            raise RecipeError(
                f"{_describe(model, config)} has several modules ({', '.join(arch.modules)}) and is not a "
                f"vision-language model whose text decoder the rule can place; layer_swap supports decoder "
                f"models and the vision-language models listed in the README"
            )
        archs[model] = arch

    models = list(configs)
    first = models[0]
    for model in models[1:]:
        if archs[model] != archs[first]:
            raise RecipeError(
                f"architectures differ: {_describe(first, configs[first])} vs "
                f"{_describe(model, configs[model])}; every expert (and base_model) must share one "
                f"architecture"
            )
    arch_info = archs[first]
    module_name = TEXT_MODULE if TEXT_MODULE in arch_info.modules else next(iter(arch_info.modules))
    module_arch = arch_info.modules[module_name].architecture
    counts = {model: module_arch.num_layers(configs[model]) for model in models}
    if len(set(counts.values())) != 1:
        listing = ", ".join(f"{m}: {n}" for m, n in counts.items())
        raise RecipeError(
            f"layer counts differ ({listing}); every expert (and base_model) must have the same "
            f"number of decoder layers"
        )
    num_layers = counts[first]
    info = ModelsInfo(arch_info=arch_info, module_name=module_name, configs=configs, num_layers=num_layers)
    check_zone_fit(recipe.zones, num_layers, info.layer_names(first) if recipe.zones.per_module else ())
    if check_files:
        check_model_files(recipe)
    return info


def check_model_files(recipe: SwapRecipe) -> None:
    """Every local model's weight files are complete and safe to open (headers only)."""
    from mergekit_layerswap.adapter.file_checks import check_weight_files

    for model in _all_models(recipe):
        check_weight_files(model)


def _safetensors_shapes(path: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    from mergekit_layerswap.adapter.file_checks import read_safetensors_header

    header = read_safetensors_header(path)
    return {name: (tuple(entry["shape"]), entry["dtype"]) for name, entry in header.items() if name != "__metadata__"}


def _pickle_shapes(path: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise RecipeError(
            f"cannot read weight file {path} ({type(error).__name__}); the file is damaged or not a "
            f"PyTorch checkpoint: re-download or re-save that model"
        ) from None
    return {name: (tuple(t.shape), str(t.dtype)) for name, t in state.items()}


def stored_tensors(model) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor a model stores, from file headers only
    (pickled ``.bin`` shards are memory-mapped, not read)."""
    from mergekit.io.tasks import LoaderCache

    index = LoaderCache().get(model).index
    shapes: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for shard in sorted(set(index.tensor_paths.values())):
        path = os.path.join(index.base_path, shard)
        read = _safetensors_shapes if path.endswith(".safetensors") else _pickle_shapes
        shapes.update(read(path))
    return {name: shapes[name] for name in index.tensor_paths if name in shapes}


def stored_sources(info: ModelsInfo, weight, stored, with_tied: bool, by_target=None) -> Optional[List[str]]:
    """The stored tensors ``weight`` is read from (several for a tensor stored one 2-D
    matrix per expert), None when the model lacks it."""
    from mergekit_layerswap.adapter.layout import weight_sources

    return weight_sources(weight, stored, info.model_type, with_tied, by_target)


def find_stored(weight, stored: Dict[str, Any], with_tied: bool) -> Optional[str]:
    """The name under which a checkpoint stores ``weight`` (aliases, and tied names if asked)."""
    names = [weight.name] + list(weight.aliases or [])
    if with_tied:
        names += list(weight.tied_names or [])
    return next((n for n in names if n in stored), None)


def check_tensors(
    recipe: SwapRecipe, info: ModelsInfo, tokenizer_configured: bool, dtype_configured: bool = True
) -> Dict[Any, Dict[str, Tuple[Tuple[int, ...], str]]]:
    """Every tensor the output needs exists in every expert with matching shapes (and,
    without ``dtype:``, the same floating dtypes). Returns each model's stored tensors
    (name -> shape, dtype), read from the headers once, for the checks that follow."""
    experts = recipe.models
    stored = {model: stored_tensors(model) for model in _all_models(recipe)}
    if not dtype_configured:
        _check_same_floating_dtypes(experts, stored)
    vocab_hint = (
        "add `tokenizer: {source: base}` (or `source: union`) so mergekit aligns the vocabularies before the swap"
    )
    weights = [weight for weight, _position in info.weights(experts[0])]
    from mergekit_layerswap.adapter.layout import sources_by_target

    targets = {m: sources_by_target(info.model_type, stored[m]) for m in _all_models(recipe)}

    def sources(model, weight, with_tied):
        return stored_sources(info, weight, stored[model], with_tied, targets[model])

    for weight in weights:
        own = {m: sources(m, weight, with_tied=False) for m in experts}
        if weight.optional:
            present = [m for m in experts if own[m]]
            if present and len(present) != len(experts) and not tokenizer_configured:
                missing = [str(m) for m in experts if not own[m]]
                raise RecipeError(
                    f"{weight.name} is stored by {present[0]} but tied to the embeddings in "
                    f"{', '.join(missing)}; untie that expert (save it with an explicit "
                    f"{weight.name}) or {vocab_hint}"
                )
            if not present:
                continue
        found = {m: sources(m, weight, with_tied=weight.optional) for m in experts}
        for model, names in found.items():
            if names is None:
                raise RecipeError(
                    f"{model} has no tensor {weight.name}, which its architecture "
                    f"({info.arch_info.architectures[0]}) requires; check the checkpoint"
                )
        shapes = {m: _shape_of(stored[m], found[m]) for m in experts}
        if recipe.base_model is not None and recipe.weighting == "magnitude":
            base_names = sources(recipe.base_model, weight, with_tied=weight.optional)
            if base_names is not None:
                shapes[recipe.base_model] = _shape_of(stored[recipe.base_model], base_names)
        if len({len(names) == 1 for names in found.values()}) > 1:
            _check_same_size(weight.name, shapes)
            continue
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{m}: {list(s)}" for m, s in shapes.items())
            if weight.vocabulary_axis is not None and _differ_beyond(shapes, weight.vocabulary_axis):
                raise RecipeError(
                    f"tensor shapes differ for {weight.name} ({listing}) in more than the vocabulary "
                    f"size (e.g. the hidden size); experts must be fine-tunes of one base model"
                )
            if weight.vocabulary_axis is not None:
                if tokenizer_configured:
                    continue
                raise RecipeError(f"vocabulary sizes differ for {weight.name} ({listing}); {vocab_hint}")
            raise RecipeError(
                f"tensor shapes differ for {weight.name} ({listing}); experts must be fine-tunes of one base model"
            )
    return stored


def _shape_of(stored, names: List[str]):
    """The stored shape, or for a converted tensor the tuple of its sources' shapes."""
    if len(names) == 1:
        return stored[names[0]][0]
    return tuple(stored[name][0] for name in names)


def _check_same_size(name: str, shapes) -> None:
    """One expert stores ``name`` fused (3-D), another one 2-D tensor per expert: the
    element counts must agree (the number of experts and their sizes)."""

    def size(shape):
        if shape and isinstance(shape[0], tuple):
            return sum(size(s) for s in shape)
        count = 1
        for d in shape:
            count *= d
        return count

    if len({size(s) for s in shapes.values()}) > 1:
        listing = ", ".join(f"{m}: {size(s)} values" for m, s in shapes.items())
        raise RecipeError(f"tensor sizes differ for {name} ({listing}); experts must be fine-tunes of one base model")


def _differ_beyond(shapes: Dict[Any, Tuple[int, ...]], axis: int) -> bool:
    """Whether shapes differ in rank or along any axis other than ``axis``."""
    if len({len(shape) for shape in shapes.values()}) > 1:
        return True
    trimmed = {tuple(d for i, d in enumerate(shape) if i != axis % max(len(shape), 1)) for shape in shapes.values()}
    return len(trimmed) > 1


_FLOATING = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "FLOAT64", "FLOAT32", "FLOAT16", "BFLOAT16")


def _check_same_floating_dtypes(experts, stored) -> None:
    """Without ``dtype:`` mergekit keeps each tensor's stored dtype, so fp16 + fp32 experts
    give an output whose tensors have mixed dtypes."""
    kinds = {}
    for model in experts:
        names = {dtype.upper().replace("TORCH.", "") for _shape, dtype in stored[model].values()}
        kinds[model] = sorted(n for n in names if n in _FLOATING)
    if len({tuple(v) for v in kinds.values()}) > 1:
        listing = ", ".join(f"{m}: {'/'.join(v) or 'none'}" for m, v in kinds.items())
        raise RecipeError(
            f"the experts store different floating dtypes ({listing}) and the recipe sets no dtype, "
            f"so the output would mix them; add `dtype: bfloat16` (or float16 / float32) to the recipe"
        )
