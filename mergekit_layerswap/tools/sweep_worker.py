# SPDX-License-Identifier: LGPL-3.0-only
"""One sweep worker: builds candidates from experts loaded once and evaluates them.

The serial sweep runs one in its own process; ``--ray`` runs one in each Ray actor
(``sweep_ray.py``), so both paths build candidates exactly the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.layers import SwapZones
from mergekit_layerswap.core.parameters import DEFAULTS, ZONE_PARAMETERS


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # "swap" or "baseline"
    parameters: Dict[str, Any] = field(default_factory=dict)


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
        return dataclasses.replace(
            recipe,
            zones=zones,
            weighting="uniform",
            non_layer="average",
            vision="average",
            transition_shape="flat",
            blend_method="average",
            blend_options=(),
            blend_needs_base=False,
            experts=tuple(dataclasses.replace(e, weight=1.0) for e in recipe.experts),
        )
    role = "task" if name == "task-expert" else "language"
    zones = SwapZones(num_layers, 0, 0, 0) if role == "language" else SwapZones(0, 0, 0, 0)
    return dataclasses.replace(recipe, zones=zones, non_layer=role, vision=role)


def fingerprint(tensors: Dict[str, Any]) -> Dict[str, str]:
    """sha256 of every tensor's bytes: compares weights across runs without storing them."""
    import torch

    out = {}
    for name in sorted(tensors):
        raw = tensors[name].detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        out[name] = hashlib.sha256(raw).hexdigest()
    return out


def experts_fit_in_memory(run, factor: float = 2.5) -> bool:
    from mergekit_layerswap.adapter.file_checks import tensor_bytes
    from mergekit_layerswap.adapter.header_checks import stored_tensors

    need = sum(tensor_bytes(s, d) for m in run.recipe.models for s, d in stored_tensors(m).values())
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need * factor < available


def candidate_recipe(run, candidate: Candidate):
    return (
        variant(run.recipe, candidate.parameters)
        if candidate.kind == "swap"
        else baseline_recipe(run.recipe, candidate.name, run.info.num_layers)
    )


class SweepWorker:
    """Loads the experts and one model once, then assembles each candidate in memory (or,
    when the experts do not fit, merges it through mergekit into a temporary directory) and
    evaluates it. The serial sweep uses one in its own process; ``--ray`` runs one per Ray
    actor, so both paths build candidates the same way."""

    def __init__(
        self,
        recipe_path: str,
        device: str = "cpu",
        magnitudes: Optional[Dict[str, Any]] = None,
        run=None,
        torch_threads: Optional[int] = None,
        cwd: Optional[str] = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from mergekit_layerswap.adapter.mergekit_parts import model_directory
        from mergekit_layerswap.adapter.planner import prepare
        from mergekit_layerswap.tools.assemble import LoadedExperts
        from mergekit_layerswap.tools.recipe_file import load_config

        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative model paths in the recipe mean what they meant to the driver
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.config = load_config(recipe_path)
        if run is None:
            run = prepare(self.config)
            run.magnitudes.update({m: magnitudes[str(m)] for m in run.recipe.models if str(m) in (magnitudes or {})})
        self.run = run
        self.torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            self.config.dtype or "", torch.float32
        )
        donor_path = model_directory(run.recipe.donor)
        self.tokenizer = AutoTokenizer.from_pretrained(donor_path)
        self.in_memory = experts_fit_in_memory(run)
        self.experts = LoadedExperts(run, dtype=self.config.dtype) if self.in_memory else None
        self.model = AutoModelForCausalLM.from_pretrained(donor_path, dtype=self.torch_dtype).to(device).eval()

    def state(self, candidate: Candidate) -> Dict[str, Any]:
        from mergekit_layerswap.tools.assemble import assemble

        candidate_run = dataclasses.replace(self.run, recipe=candidate_recipe(self.run, candidate))
        if self.experts is not None:
            return dict(assemble(candidate_run, self.experts, out_dtype=self.config.out_dtype))
        return _merge_to_disk(candidate_run, self.config)

    def evaluate(self, candidate: Candidate, evaluator) -> Any:
        state = self.state(candidate)
        missing, unexpected = self.model.load_state_dict(
            {k: v.to(self.torch_dtype) for k, v in state.items()}, strict=False
        )
        if unexpected:
            raise RuntimeError(f"candidate tensors the model does not have: {unexpected[:3]}")
        del state
        return evaluator(self.model, self.tokenizer)

    def fingerprint(self, candidate: Candidate) -> Dict[str, str]:
        return fingerprint(self.state(candidate))

    def fits_in_memory(self) -> bool:
        return self.in_memory


def _merge_to_disk(run, config) -> Dict[str, Any]:
    """Streaming fallback: write the candidate with mergekit, read it back, delete it."""
    from safetensors.torch import load_file

    from mergekit_layerswap.adapter.mergekit_parts import run_merge_quietly

    recipe = run.recipe
    data = {
        "merge_method": METHOD_NAME,
        "models": [{"model": str(e.model), "parameters": {"role": e.role, "weight": e.weight}} for e in recipe.experts],
        "parameters": {
            **dataclasses.asdict(recipe.zones),
            "weighting": recipe.weighting,
            "non_layer": recipe.non_layer,
            **({"vision": recipe.vision} if recipe.vision != DEFAULTS["vision"] else {}),
            "transition_shape": recipe.transition_shape,
            "blend_method": recipe.blend_method,
            **{f"blend_{k}": v for k, v in recipe.blend_options},
        },
        "dtype": config.dtype,
        "out_dtype": config.out_dtype,
    }
    if recipe.base_model is not None:
        data["base_model"] = str(recipe.base_model)
    out = tempfile.mkdtemp(prefix="layerswap-candidate-")
    try:
        run_merge_quietly(data, out)
        state = {}
        for name in sorted(os.listdir(out)):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(out, name)))
        return state
    finally:
        shutil.rmtree(out, ignore_errors=True)
