# SPDX-License-Identifier: LGPL-3.0-only
"""The merges of the evidence run, each one plain ``mergekit-yaml`` on a recipe file.

Zones scaled to 24 layers: the paper's default on Llama 3.1 8B's 32 layers is b=5,
u=2, no transitions; 5 x 24/32 = 3.75 and 2 x 24/32 = 1.5 round to b=4, u=2. The sweep
holds that default and the paper's variants at this depth: transition zones of one
layer each (uniform and magnitude-weighted), bottom-only, top-only, and one fewer /
one more language layer at each end (the paper's b in {3,4,5}, u in {0,1,2}, scaled).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import yaml

from mergekit_layerswap.core.files import atomic_write_text

DEFAULT_ZONES = {"bottom_layers": 4, "top_layers": 2, "bottom_transition": 0, "top_transition": 0}

# name -> (what it is, parameters that differ from the default swap)
SWEEP = {
    "swap-default": ("default swap scaled to 24 layers: b=4 u=2", {}),
    "swap-transition": ("b=4 u=2 with t_b=t_u=1", {"bottom_transition": 1, "top_transition": 1}),
    "swap-transition-magnitude": (
        "b=4 u=2 t_b=t_u=1, magnitude weighting",
        {"bottom_transition": 1, "top_transition": 1, "weighting": "magnitude"},
    ),
    "swap-bottom-only": ("language layers at the bottom only: b=4 u=0", {"top_layers": 0}),
    "swap-top-only": ("language layers at the top only: b=0 u=2", {"bottom_layers": 0}),
    "swap-fewer": ("fewer language layers: b=3 u=1", {"bottom_layers": 3, "top_layers": 1}),
    "swap-more": ("more language layers: b=5 u=3", {"bottom_layers": 5, "top_layers": 3}),
}


def swap_recipe(base: str, task: str, language: str, changes: Optional[Dict[str, object]] = None) -> dict:
    parameters = {**DEFAULT_ZONES, "weighting": "uniform", "non_layer": "average", **(changes or {})}
    recipe = {
        "merge_method": "layer_swap",
        "models": [
            {"model": task, "parameters": {"role": "task"}},
            {"model": language, "parameters": {"role": "language"}},
        ],
        "parameters": parameters,
        "dtype": "float32",
    }
    if parameters["weighting"] == "magnitude":
        recipe["base_model"] = base  # magnitude weighting measures each expert's change from it
    return recipe


def soup_recipe(task: str, language: str) -> dict:
    """The 1:1 soup: mergekit's own linear method, both weights 1, normalised."""
    return {
        "merge_method": "linear",
        "models": [{"model": task, "parameters": {"weight": 1.0}}, {"model": language, "parameters": {"weight": 1.0}}],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


def write_recipe(recipe: dict, path: str, comment: str) -> str:
    text = f"# {comment}\n" + yaml.safe_dump(recipe, sort_keys=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, text)
    return path


def merge(recipe_path: str, out_dir: str, progress: bool = False) -> Dict[str, object]:
    """``mergekit-yaml RECIPE OUT`` (the demo's runner, Hub switched off), written to a
    scratch folder first so a cut-off merge never looks finished."""
    import shutil

    from mergekit_layerswap.demo.merge import run_merge

    scratch = out_dir + ".partial"
    shutil.rmtree(scratch, ignore_errors=True)
    run_merge(recipe_path, scratch, progress=progress)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(scratch, out_dir)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    return {"recipe": os.path.basename(recipe_path), "safetensors_bytes": size}
