# SPDX-License-Identifier: LGPL-3.0-only
"""Validation stage 2, the recipe values: read a ``layer_swap`` recipe (a parsed mergekit
``MergeConfiguration``) and refuse bad ones with one line that names the parameter and
the fix.

Only the recipe's own structure is checked here; nothing is read from the models.
Checks that need model configs or tensor headers live in ``header_checks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.layers import LANGUAGE, ROLES, SwapRule, SwapZones
from mergekit_layerswap.core.parameters import (
    BLEND_PREFIX,
    CHOICE_PARAMETERS,
    DEFAULTS,
    PER_MODEL_PARAMETERS,
    PLANNER_PARAMETERS,
    SHARED_PARAMETERS,
    ZONE_PARAMETERS,
)

# (blend_method, blend_<name> settings, base_model) -> (options, needs_base)
BlendChecker = Callable[[str, Dict[str, Any], Any], Tuple[Tuple[Tuple[str, Any], ...], bool]]


@dataclass(frozen=True)
class Expert:
    model: Any  # mergekit.common.ModelReference
    role: str
    weight: Any = 1.0  # a mergekit ParameterSetting: scalar, gradient list or filters


@dataclass(frozen=True)
class SwapRecipe:
    experts: Tuple[Expert, ...]
    base_model: Any = None
    zones: SwapZones = field(default_factory=SwapZones)
    weighting: str = DEFAULTS["weighting"]
    non_layer: str = DEFAULTS["non_layer"]
    vision: str = DEFAULTS["vision"]
    transition_shape: str = DEFAULTS["transition_shape"]
    blend_method: str = DEFAULTS["blend_method"]
    blend_options: Tuple[Tuple[str, Any], ...] = ()
    blend_needs_base: bool = False  # the blend method reads base_model (set by the adapter)

    def of_role(self, role: str) -> List[Expert]:
        return [e for e in self.experts if e.role == role]

    @property
    def models(self) -> list:
        return [e.model for e in self.experts]

    @property
    def donor(self):
        """The model whose config.json, tokenizer and chat template the output gets:
        the first language expert of the recipe (its bottom and top layers, which read
        and write tokens, are the language expert's)."""
        return self.of_role(LANGUAGE)[0].model

    @property
    def rule(self) -> SwapRule:
        """The layer rule this recipe sets (``core/layers.py``)."""
        return SwapRule(self.zones, self.non_layer, self.transition_shape, self.vision)

    def role_of(self, model) -> Optional[str]:
        for e in self.experts:
            if e.model == model:
                return e.role
        return None


def is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _check_weight(setting: Any, where: str) -> None:
    from mergekit_layerswap.core.recipe_value_checks import check_weight

    check_weight(setting, where)


def _check_shared(name: str, setting: Any) -> Any:
    if not is_scalar(setting):
        raise RecipeError(
            f"parameters.{name} must be one value for the whole model, not a per-tensor "
            f"list or filter; write e.g. `{name}: {DEFAULTS[name]}`"
        )
    if name == "blend_method":
        if not isinstance(setting, str):
            raise RecipeError(f"parameters.blend_method must be a merge method name; got {setting!r}")
        return setting
    if name in ZONE_PARAMETERS:
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
            raise RecipeError(f"parameters.{name} must be a non-negative whole number of layers; got {setting!r}")
        return setting
    choices = CHOICE_PARAMETERS[name]
    if setting not in choices:
        raise RecipeError(f"parameters.{name} must be one of {', '.join(choices)}; got {setting!r}")
    return setting


def _refuse_unknown(names, allowed, where: str) -> None:
    for name in names:
        if name in allowed:
            continue
        if name in PLANNER_PARAMETERS:
            raise RecipeError(
                f"{where}.{name} is computed by layer_swap for each tensor and cannot be set in a recipe; remove it"
            )
        if name == "role" and where == "parameters":
            raise RecipeError(
                "parameters.role is set for the whole recipe, which would give every model "
                "the same role; set `role: task` or `role: language` under each model's "
                "own `parameters:` instead"
            )
        if name in SHARED_PARAMETERS and where != "parameters":
            raise RecipeError(
                f"{where}.{name} applies to the whole merge; move it to the top-level `parameters:` block"
            )
        known = ", ".join(allowed)
        raise RecipeError(f"{where}.{name} is not a layer_swap parameter (known: {known})")


def parse_recipe(config, check_blend: Optional[BlendChecker] = None) -> SwapRecipe:
    """Validate the structure of a ``layer_swap`` MergeConfiguration.

    ``check_blend(method, settings, base_model)`` validates a ``blend_method`` other than
    ``average`` against mergekit's registry and returns ``(options, needs_base)``; the
    adapter passes it (core does not know mergekit's methods)."""
    if config.slices or config.modules:
        raise RecipeError(
            "layer_swap takes a `models:` list, not `slices:` or `modules:` (layer positions "
            "would be ambiguous); list each expert once under `models:` with its role"
        )
    params = dict(config.parameters or {})
    blend_settings = {
        k: v
        for k, v in params.items()
        if k.startswith(BLEND_PREFIX) and k != "blend_method" and k not in PLANNER_PARAMETERS
    }
    _refuse_unknown([k for k in params if k not in blend_settings], SHARED_PARAMETERS + ("weight",), "parameters")
    shared = {name: _check_shared(name, params.get(name, DEFAULTS[name])) for name in SHARED_PARAMETERS}
    if "weight" in params:
        _check_weight(params["weight"], "parameters")

    base = config.base_model
    experts: List[Expert] = []
    seen = set()
    for index, model_in in enumerate(config.models or []):
        where = f"models[{index}] ({model_in.model})"
        if base is not None and model_in.model == base:
            raise RecipeError(
                f"{where} is also base_model; the base is never mixed into a layer swap. To "
                f"swap against the base (the paper's 'revert to base' ablation), list it as an "
                f"expert and drop base_model"
            )
        if model_in.model in seen:
            raise RecipeError(f"{where} is listed twice; list each expert once")
        seen.add(model_in.model)
        model_params = dict(model_in.parameters or {})
        _refuse_unknown(model_params, PER_MODEL_PARAMETERS, f"models[{index}].parameters")
        role = model_params.get("role")
        if role is None:
            raise RecipeError(
                f"{where} has no role; add `parameters: {{role: task}}` or `parameters: {{role: language}}`"
            )
        if not isinstance(role, str) or role not in ROLES:
            raise RecipeError(f"{where} has role {role!r}; role must be `task` or `language`, one value per model")
        weight = model_params.get("weight", params.get("weight", 1.0))
        _check_weight(weight, where)
        experts.append(Expert(model=model_in.model, role=role, weight=weight))

    from mergekit_layerswap.core.recipe_value_checks import check_normalised, weight_values

    check_normalised([(f"models[{i}] ({e.model})", weight_values(e.weight)) for i, e in enumerate(experts)])
    for role in ROLES:
        if not any(e.role == role for e in experts):
            raise RecipeError(f"the recipe has no {role} expert; add a model with `parameters: {{role: {role}}}`")
    if shared["weighting"] == "magnitude" and base is None:
        raise RecipeError(
            "weighting: magnitude needs base_model (the model both experts were fine-tuned "
            "from); add `base_model:` or use `weighting: uniform`"
        )
    blend_options, blend_needs_base = _check_blend(shared["blend_method"], blend_settings, base, check_blend)
    return SwapRecipe(
        experts=tuple(experts),
        base_model=base,
        zones=SwapZones(*(shared[name] for name in ZONE_PARAMETERS)),
        weighting=shared["weighting"],
        non_layer=shared["non_layer"],
        vision=shared["vision"],
        transition_shape=shared["transition_shape"],
        blend_method=shared["blend_method"],
        blend_options=blend_options,
        blend_needs_base=blend_needs_base,
    )


def _check_blend(method: str, settings: Dict[str, Any], base, check_blend: Optional[BlendChecker]):
    if method == "average":
        if settings:
            raise RecipeError(
                f"parameters.{next(iter(settings))} only applies with a blend_method other than average; "
                f"remove it or set blend_method"
            )
        return (), False
    if check_blend is None:
        raise RecipeError(f"parameters.blend_method {method!r} needs mergekit's method registry to be checked")
    return check_blend(method, settings, base)


def check_zone_fit(zones: SwapZones, num_layers: int) -> None:
    if zones.total > num_layers:
        raise RecipeError(
            f"bottom_layers + bottom_transition + top_transition + top_layers = {zones.total} "
            f"exceeds the {num_layers} decoder layers of the models; make the zones smaller"
        )


__all__ = ["SwapRecipe", "Expert", "parse_recipe", "check_zone_fit"]
