# SPDX-License-Identifier: LGPL-3.0-only
"""Build a layer-swapped state dict in memory from experts already loaded.

A sweep loads each expert's tensors once and then assembles many candidates, each a
re-assembly rather than a re-read. Every output tensor goes through the registered
``layer_swap`` kernel with the parameters mergekit's planner would give it (same
tensor names, same layer positions from mergekit's architecture definitions, same
gradient/filter resolution of ``weight``, same dtype casts), so a candidate's weights
are bit-identical to ``mergekit-yaml`` on the equivalent recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from mergekit_layerswap.adapter import mergekit_parts
from mergekit_layerswap.adapter.header_checks import stored_sources
from mergekit_layerswap.adapter.layout import load_weight, sources_by_target
from mergekit_layerswap.adapter.tensor_checks import NON_LAYER

BASE_ID = "__base__"


def output_weights(run) -> List[Tuple[Any, Any]]:
    """(WeightInfo, layer index, None or VISION) for every tensor mergekit would plan."""
    return run.info.weights(run.recipe.donor)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    return mergekit_parts.dtype_from_name(name)


class LoadedExperts:
    """Every tensor of every expert (and of the base when a blend method needs it)."""

    def __init__(self, run, dtype: Optional[str] = None, device: str = "cpu"):
        self.run = run
        self.dtype = _dtype(dtype)
        models = list(run.recipe.models)
        if run.recipe.base_model is not None and run.recipe.blend_needs_base:
            models.append(run.recipe.base_model)
        self.tensors: Dict[Any, Dict[str, torch.Tensor]] = {}
        self.stored_weights: Dict[Any, set] = {}  # weights each model stores without tying
        for model in models:
            loader = mergekit_parts.loader(model)
            stored = loader.index.tensor_paths
            by_target = sources_by_target(run.info.model_type, stored)
            self.stored_weights[model] = {
                w.name for w, _ in output_weights(run) if stored_sources(run.info, w, stored, False, by_target)
            }
            own: Dict[str, torch.Tensor] = {}
            for weight, _layer in output_weights(run):
                tensor = load_weight(model, loader, weight, device, by_target, run.info.model_type)
                if tensor is None:
                    continue
                if self.dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(self.dtype)
                own[weight.name] = tensor
            loader.flush()
            self.tensors[model] = own

    def stores(self, model, weight) -> bool:
        return weight.name in self.stored_weights[model]


def assemble(run, experts: LoadedExperts, out_dtype: Optional[str] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (tensor name, merged tensor) for the recipe in ``run`` (zones may be replaced
    with ``dataclasses.replace(run.recipe, ...)`` between calls)."""
    from mergekit_layerswap.adapter.registration import ensure_registered

    method = ensure_registered()
    recipe, info = run.recipe, run.info
    cast = _dtype(out_dtype)
    for weight, layer in output_weights(run):
        if weight.optional and not any(experts.stores(e.model, weight) for e in recipe.experts):
            continue  # an untied lm_head no expert stores: the output stays tied
        # (a vision tower tensor gets t = 0; mergekit plans it with its own module's t)
        t = mergekit_parts.gradient_t(layer if isinstance(layer, int) else None, info.num_layers)
        entries, roles, weights, magnitudes = [], {}, {}, {}
        for expert in recipe.experts:
            key = str(expert.model)
            entries.append((key, experts.tensors[expert.model][weight.name], False))
            roles[key] = expert.role
            weights[key] = mergekit_parts.setting_at(expert.weight, weight.name, t)
            stat = run.magnitudes.get(expert.model)
            magnitudes[key] = stat.mean_row_mav if stat is not None else 1.0
        if recipe.base_model in experts.tensors:
            entries.append((BASE_ID, experts.tensors[recipe.base_model][weight.name], True))
            roles[BASE_ID], weights[BASE_ID], magnitudes[BASE_ID] = None, 1.0, 1.0
        parameters = {
            "role": roles,
            "weight": weights,
            "magnitude": magnitudes,
            **dataclasses.asdict(recipe.zones),
            "weighting": recipe.weighting,
            "non_layer": recipe.non_layer,
            "vision": recipe.vision,
            "transition_shape": recipe.transition_shape,
            "blend_method": recipe.blend_method,
            "blend_options": recipe.blend_options,
            "layer_index": NON_LAYER if layer is None else layer,
            "num_layers": info.num_layers,
        }
        group = mergekit_parts.tensor_group(entries, weight)
        (tensor,) = method((group,), parameters=parameters)
        if cast is not None and tensor.is_floating_point():  # integers keep their dtype
            tensor = tensor.to(cast)
        yield weight.name, tensor
