# SPDX-License-Identifier: LGPL-3.0-only
"""``mergekit-layerswap explain``: a dry run that reads configs (and, for local models,
safetensors headers), never tensors.

It validates a recipe exactly as a merge does first, then reports where every layer
comes from, with which mixing weights, what happens to non-layer tensors, and how many
bytes the merge will read from each model.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from mergekit_layerswap.core.errors import RecipeError
from mergekit_layerswap.core.layers import BLEND, ROLES, VISION
from mergekit_layerswap.core.parameters import ZONE_PARAMETERS
from mergekit_layerswap.tools.recipe_file import load_config


def _is_local(model) -> bool:
    return model is not None and os.path.isdir(model.model.path) and not model.lora


def _load_cached_magnitudes(run) -> None:
    """Fill ``run.magnitudes`` from the cache, for local models only: looking up a hub
    model's cache key would download it, and explain reads nothing but configs."""
    from mergekit_layerswap.adapter.magnitude import cached_magnitude

    base = run.recipe.base_model
    if run.recipe.weighting != "magnitude" or not _is_local(base):
        return
    for expert in run.recipe.experts:
        if _is_local(expert.model):
            stat = cached_magnitude(expert.model, base)
            if stat is not None:
                run.magnitudes[expert.model] = stat


def _bytes_to_read(run) -> Dict[str, Optional[int]]:
    """Bytes of stored tensors the merge reads from each model (None: not local).
    Expects ``_load_cached_magnitudes`` to have run: an uncached statistic means the
    magnitude pass reads the whole expert and the whole base."""
    from mergekit_layerswap.adapter.file_checks import tensor_bytes
    from mergekit_layerswap.adapter.header_checks import stored_tensors

    recipe, info = run.recipe, run.info
    magnitude_pass = recipe.weighting == "magnitude"
    result: Dict[str, Optional[int]] = {}
    for expert in recipe.experts:
        if not _is_local(expert.model):
            result[str(expert.model)] = None
            continue
        stored = stored_tensors(expert.model)
        layers = info.stored_positions(expert.model, stored)
        needs_all = magnitude_pass and expert.model not in run.magnitudes
        total = 0
        for name, (shape, dtype) in stored.items():
            if needs_all or recipe.rule.sources(layers.get(name), info.num_layers).reads(expert.role):
                total += tensor_bytes(shape, dtype)
        result[str(expert.model)] = total
    base = recipe.base_model
    if base is not None:
        if not magnitude_pass or all(e.model in run.magnitudes for e in recipe.experts):
            result[str(base)] = 0
        elif _is_local(base):
            result[str(base)] = sum(tensor_bytes(s, d) for s, d in stored_tensors(base).values())
        else:
            result[str(base)] = None
    return result


def _role_weights(run) -> Dict[str, Any]:
    """Each role's mean effective weight (weight x 1/m, as a merge resolves it); None when
    a weight varies per tensor or a magnitude statistic is not cached yet."""
    out: Dict[str, Any] = {}
    for role in ROLES:
        values = []
        for expert in run.recipe.of_role(role):
            known = run.recipe.weighting != "magnitude" or expert.model in run.magnitudes
            w = run.effective_weight(expert) if known else None
            if w is None:
                values = None
                break
            values.append(w)
        out[role] = sum(values) / len(values) if values else None
    return out


def explain(path: str, trust_remote_code: bool = False) -> Dict[str, Any]:
    from mergekit_layerswap.adapter.planner import prepare
    from mergekit_layerswap.core import METHOD_NAME

    config = load_config(path)
    if config.merge_method != METHOD_NAME:
        raise RecipeError(f"{path} uses merge_method {config.merge_method!r}; explain describes layer_swap recipes")
    run = prepare(config, trust_remote_code=trust_remote_code)
    recipe, info = run.recipe, run.info
    _load_cached_magnitudes(run)
    weights = _role_weights(run)

    def mix(sources):
        active = {r: sources.shares[r] for r in sources.roles}
        if len(active) == 1 or any(weights[r] is None for r in active):
            return {r: (round(s, 6) if len(active) > 1 else 1.0) for r, s in active.items()}, len(active) == 1
        total = sum(active[r] * weights[r] for r in active)
        return {r: round(active[r] * weights[r] / total, 6) for r in active}, True

    layers: List[Dict[str, Any]] = []
    for layer in range(info.num_layers):
        fractions, resolved = mix(recipe.rule.sources(layer, info.num_layers))
        layers.append(
            {
                "layer": layer,
                "source": recipe.rule.source(layer, info.num_layers),
                "mix": fractions,
                "mix_is_final": resolved,
            }
        )
    non_layer_fractions, non_layer_resolved = mix(recipe.rule.sources(None, None))
    vision = {}
    if len(info.arch_info.modules) > 1:  # a vision-language model: tower and projector follow `vision`
        fractions, resolved = mix(recipe.rule.sources(VISION, None))
        vision = {
            "vision": recipe.vision,
            "vision_modules": [m for m in info.arch_info.modules if m != info.module_name],
            "vision_mix": fractions,
            "vision_mix_is_final": resolved,
        }
    return {
        "recipe": path,
        "architecture": info.arch_info.architectures[0],
        "num_layers": info.num_layers,
        "zones": vars(recipe.zones),
        "weighting": recipe.weighting,
        "non_layer": recipe.non_layer,
        "transition_shape": recipe.transition_shape,
        "experts": [
            {
                "model": str(e.model),
                "role": e.role,
                "weight": e.weight if isinstance(e.weight, (int, float)) else "per tensor",
            }
            for e in recipe.experts
        ],
        "base_model": str(recipe.base_model) if recipe.base_model is not None else None,
        "config_from": str(recipe.donor),
        "layers": layers,
        "non_layer_mix": non_layer_fractions,
        "non_layer_mix_is_final": non_layer_resolved,
        **vision,
        "bytes_to_read": _bytes_to_read(run),
    }


def _human(n: Optional[int]) -> str:
    if n is None:
        return "unknown (not a local checkpoint)"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _mix_text(mix: Dict[str, float], final: bool) -> str:
    if len(mix) == 1:
        return "-"
    text = " + ".join(f"{share:.3g} {role}" for role, share in mix.items())
    return text if final else text + " (before the experts' weights / magnitude)"


def render_text(report: Dict[str, Any]) -> str:
    lines = [
        f"{report['recipe']}: layer_swap over {report['num_layers']} decoder layers ({report['architecture']})",
    ]
    for expert in report["experts"]:
        lines.append(f"  {expert['role']:<8} expert: {expert['model']}  (weight {expert['weight']})")
    zones = report["zones"]
    lines.append(
        "  zones: "
        + " ".join(f"{name}={zones[name]}" for name in ZONE_PARAMETERS)
        + f"; weighting: {report['weighting']}"
        + (f" against {report['base_model']}" if report["base_model"] else "")
    )
    lines.append("")
    lines.append(f"  {'layer':>5}  {'source':<9} mix")
    for row in reversed(report["layers"]):
        source = "blend" if row["source"] == BLEND else row["source"]
        lines.append(f"  {row['layer']:>5}  {source:<9} {_mix_text(row['mix'], row['mix_is_final'])}")
    lines.append("")
    lines.append(
        f"  non-layer tensors (embeddings, final norm, lm_head): {report['non_layer']}"
        + (
            f", {_mix_text(report['non_layer_mix'], report['non_layer_mix_is_final'])}"
            if len(report["non_layer_mix"]) > 1
            else ""
        )
    )
    if "vision" in report:
        lines.append(
            f"  vision tower and projector ({', '.join(report['vision_modules'])}): {report['vision']}"
            + (
                f", {_mix_text(report['vision_mix'], report['vision_mix_is_final'])}"
                if len(report["vision_mix"]) > 1
                else ""
            )
        )
    lines.append(f"  config.json, tokenizer and generation config from: {report['config_from']}")
    lines.append("  bytes to read:")
    for model, n in report["bytes_to_read"].items():
        lines.append(f"    {model}: {_human(n)}")
    return "\n".join(lines)
