"""Sweep swap configurations: assemble each candidate in memory, evaluate it, keep the best.

Experts are loaded once (when they fit in memory) and magnitude statistics come from
the cache, so a candidate costs a re-assembly and an evaluation, not a re-read or a
checkpoint. When the experts do not fit, each candidate is merged through mergekit
into a temporary directory instead (and the sweep says so). Results are appended to
``results.csv`` as they come, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

from mergekit_layerswap.core.layers import SwapZones
from mergekit_layerswap.core.errors import OptionError, RecipeError
from mergekit_layerswap.core.parameters import CHOICE_PARAMETERS, SWEEPABLE, SYMBOLS, ZONE_PARAMETERS
from mergekit_layerswap.tools.sweep_files import ResultsFile, plot, write_best_recipe
from mergekit_layerswap.core import METHOD_NAME

BASELINES = ("task-expert", "language-expert", "soup")


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # "swap" or "baseline"
    parameters: Dict[str, Any] = field(default_factory=dict)


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    grid: Dict[str, List[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise OptionError(f"{item!r}: write NAME=V1,V2,... e.g. bottom_layers=3,4,5", "--grid")
        if name not in SWEEPABLE:
            raise OptionError(f"{name!r} cannot be swept; use one of {', '.join(SWEEPABLE)}", "--grid")
        parsed = []
        for value in values.split(","):
            if name in ZONE_PARAMETERS:
                if not value.strip().isdigit():
                    raise OptionError(f"{name}={values}: zone sizes are whole numbers >= 0", "--grid")
                parsed.append(int(value))
            elif value not in CHOICE_PARAMETERS[name]:
                raise OptionError(f"{name}={value}: use one of {', '.join(CHOICE_PARAMETERS[name])}", "--grid")
            else:
                parsed.append(value)
        grid[name] = parsed
    if not grid:
        raise OptionError("give at least one NAME=V1,V2,...", "--grid")
    return grid


def candidate_name(parameters: Dict[str, Any]) -> str:
    return "-".join(f"{SYMBOLS[k].replace('_', '') if k in SYMBOLS else k}{v}" for k, v in parameters.items())


def candidates(grid: Dict[str, List[Any]], num_layers: int, zones: SwapZones) -> Tuple[List[Candidate], List[str]]:
    """Every grid point whose zones fit the model, and the names of those that do not."""
    fitting, skipped = [], []
    names = list(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        parameters = dict(zip(names, values))
        zone_values = {k: v for k, v in parameters.items() if k in ZONE_PARAMETERS}
        if dataclasses.replace(zones, **zone_values).total > num_layers:
            skipped.append(candidate_name(parameters))
        else:
            fitting.append(Candidate(candidate_name(parameters), "swap", parameters))
    return fitting, skipped


def variant(recipe, parameters: Dict[str, Any]):
    """The recipe with only the swept parameters changed."""
    zone_values = {k: v for k, v in parameters.items() if k in ZONE_PARAMETERS}
    others = {k: v for k, v in parameters.items() if k not in ZONE_PARAMETERS}
    return dataclasses.replace(recipe, zones=dataclasses.replace(recipe.zones, **zone_values), **others)


def baseline_recipe(recipe, name: str, num_layers: int):
    """task / language expert alone, or the plain 1:1 soup of the two, as layer_swap recipes."""
    if name == "soup":
        half = num_layers // 2
        zones = SwapZones(0, 0, half, num_layers - half)
        return dataclasses.replace(recipe, zones=zones, weighting="uniform", non_layer="average",
                                   transition_shape="flat", blend_method="average", blend_options=(), blend_needs_base=False,
                                   experts=tuple(dataclasses.replace(e, weight=1.0) for e in recipe.experts))
    role = "task" if name == "task-expert" else "language"
    zones = SwapZones(num_layers, 0, 0, 0) if role == "language" else SwapZones(0, 0, 0, 0)
    return dataclasses.replace(recipe, zones=zones, non_layer=role)


def fingerprint(tensors: Dict[str, Any]) -> Dict[str, str]:
    """sha256 of every tensor's bytes: compares weights across runs without storing them."""
    import torch

    out = {}
    for name in sorted(tensors):
        raw = tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(raw).hexdigest()
    return out


def experts_fit_in_memory(run, factor: float = 2.5) -> bool:
    from mergekit_layerswap.adapter.checks import stored_tensors
    from mergekit_layerswap.adapter.weight_files import tensor_bytes

    need = sum(tensor_bytes(s, d) for m in run.recipe.models for s, d in stored_tensors(m).values())
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need * factor < available


def run_sweep(recipe_path: str, grid: Dict[str, List[Any]], eval_spec: str, out_dir: str,
              evaluate: Callable[[Any, Any], Any], device: str = "cpu", baselines: bool = True,
              echo: Callable[[str], None] = print, quiet: bool = False) -> Dict[str, Any]:
    """Run (or resume) a sweep; ``evaluate(model, tokenizer)`` returns an evaluate.Score."""
    import torch
    import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_layerswap.tools.assemble import LoadedExperts, assemble
    from mergekit_layerswap.tools.recipe_file import load_config
    from mergekit_layerswap.adapter.planner import prepare, resolve_magnitudes

    config = load_config(recipe_path)
    if config.merge_method != METHOD_NAME:
        raise RecipeError(f"{recipe_path} uses merge_method {config.merge_method!r}; sweep takes a layer_swap recipe")
    run = prepare(config)
    resolve_magnitudes(run, device=device, quiet=quiet)
    todo, skipped = candidates(grid, run.info.num_layers, run.recipe.zones)
    if skipped:
        echo(f"skipped {len(skipped)} grid points whose zones exceed {run.info.num_layers} layers: {', '.join(skipped)}")
    if baselines:
        todo = [Candidate(name, "baseline") for name in BASELINES] + todo
    settings = {"recipe": os.path.abspath(recipe_path), "grid": grid, "eval": eval_spec}
    results = ResultsFile(out_dir, settings)
    pending = [c for c in todo if c.name not in results.rows]
    if len(pending) < len(todo):
        echo(f"resuming: {len(todo) - len(pending)} of {len(todo)} candidates already evaluated")

    donor = run.recipe.donor
    from mergekit.io.tasks import LoaderCache

    donor_path = LoaderCache().get(donor).index.base_path
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype or "", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(donor_path)
    model = None
    in_memory = experts_fit_in_memory(run)
    experts = None
    if pending:
        if in_memory:
            experts = LoadedExperts(run, dtype=config.dtype)
        else:
            echo("the experts do not fit in memory: each candidate is merged to a temporary directory (streaming)")
        model = AutoModelForCausalLM.from_pretrained(donor_path, dtype=torch_dtype).to(device).eval()

    for candidate in tqdm.tqdm(pending, desc="Sweep", disable=quiet):
        recipe = (variant(run.recipe, candidate.parameters) if candidate.kind == "swap"
                  else baseline_recipe(run.recipe, candidate.name, run.info.num_layers))
        candidate_run = dataclasses.replace(run, recipe=recipe)
        if experts is not None:
            state = dict(assemble(candidate_run, experts, out_dtype=config.out_dtype))
        else:
            state = _merge_to_disk(candidate_run, config)
        missing, unexpected = model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=False)
        if unexpected:
            raise RuntimeError(f"candidate tensors the model does not have: {unexpected[:3]}")
        score = evaluate(model, tokenizer)
        row = results.add(candidate, score)
        echo(f"{candidate.name}: {score.metric} = {score.value:.6g}")
        best = results.best()
        if candidate.kind == "swap" and best is not None and best["name"] == candidate.name:
            with open(os.path.join(out_dir, "best_fingerprint.json"), "w", encoding="utf-8") as handle:
                json.dump({"name": candidate.name, "tensors": fingerprint(state)}, handle, indent=1)
        del state, row
    best_score = results.best()
    if best_score is not None:
        write_best_recipe(recipe_path, best_score, os.path.join(out_dir, "best.yaml"))
    plotted = plot(results, os.path.join(out_dir, "scores.png"))
    return {"results": results.path, "best": best_score, "plot": plotted, "in_memory": in_memory}


def _merge_to_disk(run, config) -> Dict[str, Any]:
    """Streaming fallback: write the candidate with mergekit, read it back, delete it."""
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    recipe = run.recipe
    data = {
        "merge_method": METHOD_NAME,
        "models": [{"model": str(e.model), "parameters": {"role": e.role, "weight": e.weight}} for e in recipe.experts],
        "parameters": {**dataclasses.asdict(recipe.zones), "weighting": recipe.weighting,
                       "non_layer": recipe.non_layer, "transition_shape": recipe.transition_shape,
                       "blend_method": recipe.blend_method,
                       **{f"blend_{k}": v for k, v in recipe.blend_options}},
        "dtype": config.dtype,
        "out_dtype": config.out_dtype,
    }
    if recipe.base_model is not None:
        data["base_model"] = str(recipe.base_model)
    from mergekit.config import MergeConfiguration

    out = tempfile.mkdtemp(prefix="layerswap-candidate-")
    try:
        run_merge(MergeConfiguration.model_validate(data), out,
                  MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
        state = {}
        for name in sorted(os.listdir(out)):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(out, name)))
        return state
    finally:
        shutil.rmtree(out, ignore_errors=True)


__all__ = ["run_sweep", "parse_grid", "candidates", "Candidate"]
