# SPDX-License-Identifier: LGPL-3.0-only
"""The output's README.md: what was swapped, from where, with which weights."""

from __future__ import annotations

from typing import List, Optional, Tuple

import yaml

from mergekit_layerswap.core import PAPER_URL
from mergekit_layerswap.core.files import looks_like_hub_id
from mergekit_layerswap.core.layers import BLEND, LANGUAGE, layer_table, transition_depth

CARD = """---
{metadata}
---
# {name}

This model was made by **Layer Swapping** ([Bandarkar et al., ICLR 2025]({paper})) with
[mergekit](https://github.com/arcee-ai/mergekit) and mergekit-layerswap: the bottom and top
decoder layers come from a language expert, the middle layers from a task expert, and
transition layers (if any) are weighted averages of both.

## Experts

| role | model | weight | mean row change vs. reference | effective weight |
|---|---|---|---|---|
{experts}

{reference}

## Where each layer comes from

{num_layers} decoder layers; zones: bottom_layers={b}, top_layers={u},
bottom_transition={tb}, top_transition={tu} (transition shape: {shape}).

| layers | source |
|---|---|
{layers}

Non-layer tensors (embeddings, final norm, lm_head): {non_layer}.{vision}
config.json, tokenizer and generation config come from {donor}.

## Recipe

```yaml
{config_yaml}
```
"""


def _ranges(rows: List[Tuple[int, str]]) -> List[Tuple[int, int, str]]:
    out: List[Tuple[int, int, str]] = []
    for layer, label in rows:
        if out and out[-1][2] == label and out[-1][1] == layer - 1:
            out[-1] = (out[-1][0], layer, label)
        else:
            out.append((layer, layer, label))
    return out


def layer_labels(run) -> List[Tuple[int, str]]:
    recipe = run.recipe
    rows = []
    for layer, source in layer_table(run.info.num_layers, recipe.zones):
        if source == BLEND:
            label = "blend of task and language experts"
            if recipe.transition_shape == "linear":
                j, t = transition_depth(layer, run.info.num_layers, recipe.zones)
                label += f" (task share {j}/{t + 1})"
        else:
            label = f"{source} expert" + ("s (averaged)" if len(recipe.of_role(source)) > 1 else "")
        rows.append((layer, label))
    return rows


def layer_swap_card(run, config_yaml: str, name: Optional[str] = None) -> str:
    recipe = run.recipe
    experts = []
    for expert in recipe.experts:
        stat = run.magnitudes.get(expert.model)
        effective = run.effective_weight(expert)
        experts.append(
            f"| {expert.role} | {expert.model} | {expert.weight!r} | "
            f"{f'{stat.mean_row_mav:.6g}' if stat else '-'} | "
            f"{f'{effective:.6g}' if effective is not None else 'per tensor'} |"
        )
    if recipe.weighting == "magnitude":
        reference = (
            f"Weighting: magnitude. {recipe.base_model} is only the reference the experts' "
            f"changes were measured against; none of its weights are in this model."
        )
    else:
        reference = "Weighting: uniform (each expert's `weight`)."
    layers = [f"| {lo}{f'-{hi}' if hi != lo else ''} | {label} |" for lo, hi, label in _ranges(layer_labels(run))]
    policies = {
        "average": "weighted average of both experts",
        LANGUAGE: "taken from the language expert",
        "task": "taken from the task expert",
    }
    non_layer = policies[recipe.non_layer]
    vision = ""
    if len(run.info.arch_info.modules) > 1:  # a vision-language model
        modules = ", ".join(m for m in run.info.arch_info.modules if m != run.info.module_name)
        vision = f"\nVision tower and projector ({modules}; `vision: {recipe.vision}`): {policies[recipe.vision]}."
    hub_models = [str(m.model.path) for m in recipe.models if looks_like_hub_id(m.model.path)]
    metadata = yaml.safe_dump(
        {
            "base_model": hub_models,
            "library_name": "transformers",
            "tags": ["mergekit", "merge", "layer-swapping"],
        },
        sort_keys=True,
    ).rstrip()
    return CARD.format(
        metadata=metadata,
        name=name or "Layer-swapped model",
        paper=PAPER_URL,
        experts="\n".join(experts),
        reference=reference,
        num_layers=run.info.num_layers,
        b=recipe.zones.bottom_layers,
        u=recipe.zones.top_layers,
        tb=recipe.zones.bottom_transition,
        tu=recipe.zones.top_transition,
        shape=recipe.transition_shape,
        layers="\n".join(layers),
        non_layer=non_layer,
        vision=vision,
        donor=recipe.donor,
        config_yaml=config_yaml.rstrip(),
    )
