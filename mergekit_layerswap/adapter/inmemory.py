# SPDX-License-Identifier: LGPL-3.0-only
"""``layer_swap`` through mergekit's in-memory API (``mergekit.merge_methods.api``:
``merge_state_dicts``, ``merge_tensors``), which calls the method without the planner.

The swap needs each tensor's decoder-layer position. When the caller does not pass
``layer_index`` (one value per tensor, ``PerGroupValues``, an int or ``"non_layer"``) and
``num_layers``, they are found from mergekit's own architecture definitions
(``mergekit/_data/architectures/*.json``): every definition's layer templates are
expanded for layers 0, 1, ... and matched against the tensor names of the call. The
positions are used only when the names are one whole model of a definition (every tensor
listed, every required one present: a partial state dict would miscount the layers) and
exactly one placement fits (Llama,
Mistral and Qwen2 name their tensors alike and place them alike); a name no definition
places, or two definitions that disagree, is refused with how to merge instead. A single
tensor (``merge_tensors``) never says how many layers the model has, so it needs the
explicit parameters.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mergekit.merge_methods.base import FunctionalGroupMergeMethod, PerGroupValues

from mergekit_layerswap.adapter.tensor_checks import HOW_TO_MERGE, NON_LAYER
from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.layers import LANGUAGE, TASK

Position = Union[int, str]  # a decoder layer index or NON_LAYER
ROLE_ORDER = (TASK, LANGUAGE)  # the non-base inputs' roles when the caller gives none
LOG = logging.getLogger(__name__)
_PROBE_LAYERS = 1 << 20  # stands for "many layers" while counting them


class LayerSwapMethod(FunctionalGroupMergeMethod):
    """The registered method: mergekit's group method, plus layer positions for callers
    that give none (the planner and the sweep assembler always give them)."""

    def __call__(self, groups, /, *, parameters=None, **options):
        groups = tuple(groups)
        parameters = dict(parameters or {})
        if groups and parameters.get("role") is None:
            parameters["role"] = default_roles(groups[0])
        if groups:
            parameters.update(per_tensor_zones(groups, parameters))
        if groups and "layer_index" not in parameters:
            names = [group.metadata.name for group in groups]
            positions, num_layers = infer_positions(names)
            given = parameters.get("num_layers")
            if given is not None and given != num_layers:
                raise RecipeError(
                    f"num_layers={given}, but the tensor names hold {num_layers} decoder layers; drop "
                    f"num_layers or pass layer_index too"
                )
            parameters["layer_index"] = PerGroupValues([positions[name] for name in names])
            parameters["num_layers"] = num_layers
        return super().__call__(groups, parameters=parameters, **options)


def per_tensor_zones(groups, parameters) -> Dict[str, PerGroupValues]:
    """Zone sizes given in mergekit's filter form (``[{filter: self_attn, value: 5},
    {value: 3}]``), resolved for each tensor as mergekit's planner resolves them for a
    recipe: the in-memory API hands parameters to the kernel as given."""
    from mergekit_layerswap.core.parameters import ZONE_PARAMETERS
    from mergekit_layerswap.core.zones import check_zone_value, resolve

    out = {}
    for name in ZONE_PARAMETERS:
        setting = parameters.get(name)
        if isinstance(setting, (list, tuple)) or hasattr(setting, "value"):
            zone = check_zone_value(name, setting, 2)
            out[name] = PerGroupValues([resolve(zone, group.metadata.name) for group in groups])
    return out


def default_roles(group) -> Dict[object, Optional[str]]:
    """Roles of inputs given none: the documented order, base (if any) first, then the task
    expert, then the language expert. Anything but exactly two non-base inputs is refused."""
    experts = [entry.id for entry in group.entries if not entry.is_base]
    if len(experts) != len(ROLE_ORDER):
        raise RecipeError(
            f"{METHOD_NAME} got {len(experts)} non-base inputs and no roles; without roles the inputs are, "
            f"in order, the base (base=...), the task expert and the language expert; otherwise give "
            f"parameters={{'role': {{<input id>: 'task' or 'language', ...}}}} (a sequence in input order "
            f"works too)"
        )
    roles: Dict[object, Optional[str]] = {entry.id: None for entry in group.entries if entry.is_base}
    roles.update(zip(experts, ROLE_ORDER))
    return roles


def _names(weight) -> Tuple[str, ...]:
    return (weight.name,) + tuple(weight.aliases or ())


def _module_config(module_arch, num_layers: int):
    from transformers import PretrainedConfig

    key = module_arch.num_layers_config_key() or "num_hidden_layers"
    if "." in key:
        return None  # a nested (multimodal) config: not placed from names alone
    config = PretrainedConfig()
    setattr(config, key, num_layers)
    return config


def _placement(module_def, names: set) -> Optional[Tuple[int, Dict[str, Position]]]:
    """(layer count, name -> position) for one architecture module, None if no layer matches."""
    from mergekit.architecture import ConfiguredModuleArchitecture

    info = module_def.architecture

    def configured(num_layers):
        config = _module_config(info, num_layers)
        if config is None:
            return None
        return ConfiguredModuleArchitecture(info=info, config=config, weight_prefix=module_def.weight_prefix)

    try:
        probe = configured(_PROBE_LAYERS)
        if probe is None:
            return None
        count = 0
        while any(n in names for w in probe.layer_weights(count) or () for n in _names(w)):
            count += 1
        if count == 0:  # no layer 0: still a model of this definition if it names any tensor
            return (0, {}, sorted(names)) if _mentions(probe, names) else None
        module = configured(count)
        placed: Dict[str, Position] = {}
        required = []
        for weight in module.pre_weights() + module.post_weights():
            for name in _names(weight):
                placed.setdefault(name, NON_LAYER)
            required.append(weight)
        for layer in range(count):
            for weight in module.layer_weights(layer) or ():
                for name in _names(weight):
                    placed[name] = layer
                required.append(weight)
    except Exception:  # a definition that cannot be expanded without a real config
        return None
    absent = [w.name for w in required if not w.optional and not any(n in names for n in _names(w))]
    return count, placed, absent


def _mentions(module, names: set) -> bool:
    """Whether ``module`` names any of ``names``: a pre/post weight, or a layer weight of
    a layer whose index appears as a dotted component of one of the names."""
    indices = {int(part) for name in names for part in name.split(".") if part.isdigit()}
    weights = list(module.pre_weights() + module.post_weights())
    for index in sorted(i for i in indices if i < _PROBE_LAYERS):
        weights.extend(module.layer_weights(index) or ())
    return any(n in names for w in weights for n in _names(w))


def _architectures() -> Iterable[Tuple[str, object]]:
    from mergekit.architecture.json_definitions import JSON_ARCHITECTURES

    for arch in JSON_ARCHITECTURES:
        for module_def in arch.modules.values():
            yield f"{arch.architectures[0]}", module_def


def infer_positions(names: Sequence[Optional[str]]) -> Tuple[Dict[str, Position], int]:
    """name -> layer index or NON_LAYER, and the layer count, from mergekit's architecture
    definitions; refuses unless exactly one placement covers every name."""
    if any(name is None for name in names):
        raise RecipeError(f"{METHOD_NAME} needs tensor names to place tensors in layers; {HOW_TO_MERGE}")
    wanted = set(names)
    found: Dict[Tuple, List[str]] = {}
    closest: Tuple[int, List[str]] = (-1, [])
    for arch_name, module_def in _architectures():
        result = _placement(module_def, wanted)
        if result is None:
            continue
        count, placed, absent = result
        # every tensor placed, and a whole model: a partial state dict would miscount the layers
        missing = sorted(wanted - set(placed)) or absent
        if missing:
            covered = len(wanted & set(placed))  # >= 0: some definition knows these names
            if covered > closest[0]:
                closest = (covered, missing)
            continue
        key = (count, tuple(sorted((name, placed[name]) for name in wanted)))
        found.setdefault(key, []).append(arch_name)
    if not found:
        if closest[0] < 0:
            # not one name any definition knows (nor a layer of it): tensors of no decoder model
            LOG.warning(
                "%s: no mergekit architecture definition names any of these %d tensors (%s): each is "
                "treated as a non-layer tensor (the non_layer rule applies); to swap layers, %s",
                METHOD_NAME,
                len(wanted),
                sorted(wanted)[0],
                HOW_TO_MERGE,
            )
            return {name: NON_LAYER for name in wanted}, 0
        raise RecipeError(
            f"{METHOD_NAME} cannot place tensor {closest[1][0]} in a decoder layer: the tensors are not the "
            f"whole of any model mergekit's architecture definitions describe ({closest[1][0]} is not "
            f"listed, or missing); {HOW_TO_MERGE}"
        )
    if len(found) > 1:
        (first, first_archs), (second, second_archs) = list(found.items())[:2]
        raise RecipeError(
            f"{METHOD_NAME} cannot tell these tensors' layers apart: architectures {first_archs[0]} and "
            f"{second_archs[0]} place them differently; {HOW_TO_MERGE}"
        )
    ((count, pairs),) = found.keys()
    return dict(pairs), count
