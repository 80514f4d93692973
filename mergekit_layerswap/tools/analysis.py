# SPDX-License-Identifier: LGPL-3.0-only
"""Where did each expert change? Per-tensor row statistics against the base (paper §3.2).

For every floating-point 1-D, 2-D or 3-D tensor an expert stores, the row value is
``mean |expert - base|`` over one row (a 1-D tensor is one row; a fused 3-D
mixture-of-experts tensor's rows are each expert matrix's rows), exactly as
``magnitude.stream_row_mavs`` computes it while reading one tensor of each model at a
time through mergekit's lazy loader. Only the small per-row vectors are kept (about
1.7 million floats for an 8B Llama), so a large model is analysed on a laptop.

Where a tensor sits comes from mergekit's architecture definition: its decoder layer
(``ModelsInfo.layer_of``) and its *parameter name*, derived from the layer template
(``model.layers.${layer_index}.self_attn.q_proj.weight`` -> ``q``):

* the template's path after the layer placeholder, without a final ``weight``;
* the shortest tail of that path that no other template of the layer shares
  (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``);
* a ``_suffix`` that every 2-D weight's name ends with carries no information and is
  dropped (Llama's ``_proj``: q, k, v, o, up, gate, down).

Tensors outside the layers (embeddings, final norm, lm_head, anything the architecture
does not list) are kept under their own tensor name with no layer.

Thresholds: the paper's 1.9e-5 (its math expert) and 1.0e-5 (its language expert),
plus ``auto``: each expert's own 0.9 quantile of the row values of its 2-D layer
matrices, the rows a heatmap shows (numpy's linear interpolation), i.e. the value only
10% of those rows exceed. (Embedding rows are left out of the quantile: there are many
of them and they often move most, which would leave the heatmap nearly empty.) Absolute
values depend on learning rate, steps and dtype, so the automatic one is the one that
reads well for any pair of experts; it is per expert because the paper, too, showed
each expert with its own threshold. A row counts as above a threshold when its value
is strictly greater.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from mergekit_layerswap.core.files import atomic_write_text

AUTO = "auto"
AUTO_QUANTILE = 0.9
PAPER_THRESHOLDS = (1.9e-5, 1.0e-5)
DEFAULT_THRESHOLDS: Tuple[Union[float, str], ...] = PAPER_THRESHOLDS + (AUTO,)
Threshold = Union[float, str]  # a positive number or AUTO


@dataclass(frozen=True)
class Place:
    """Where a stored tensor sits in the architecture."""

    layer: Optional[int]
    parameter: str  # derived template name (``q``) or, outside the layers, the tensor name
    matrix: bool  # a 2-D decoder-layer weight: one column of the heatmap


@dataclass
class ExpertDelta:
    """One expert's row values against the base, tensor by tensor."""

    name: str  # file-safe label, e.g. the model directory's name
    model: Any  # mergekit ModelReference
    num_layers: int
    columns: List[str]  # 2-D layer parameters, in the architecture's template order
    places: Dict[str, Place]  # stored tensor name -> place
    row_mavs: Dict[str, np.ndarray]  # stored tensor name -> row values (float32)

    def all_rows(self) -> np.ndarray:
        return np.concatenate([v for v in self.row_mavs.values()]) if self.row_mavs else np.zeros(0)

    def matrix_rows(self) -> np.ndarray:
        values = [v for name, v in self.row_mavs.items() if self.places[name].matrix]
        return np.concatenate(values) if values else np.zeros(0)

    def auto_threshold(self) -> float:
        rows = self.matrix_rows()
        return float(np.quantile(rows, AUTO_QUANTILE)) if rows.size else 0.0

    def resolve(self, threshold: Threshold) -> float:
        return self.auto_threshold() if threshold == AUTO else float(threshold)

    def layer_profile(self) -> np.ndarray:
        """Mean row value per decoder layer, over all rows of all its tensors."""
        total = np.zeros(self.num_layers)
        rows = np.zeros(self.num_layers)
        for name, values in self.row_mavs.items():
            layer = self.places[name].layer
            if layer is not None:
                total[layer] += float(values.astype(np.float64).sum())
                rows[layer] += values.size
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows > 0, total / np.maximum(rows, 1), np.nan)

    def share_grid(self, threshold: float) -> np.ndarray:
        """[layer, column] share of rows above ``threshold`` (NaN where nothing is stored)."""
        above = np.zeros((self.num_layers, len(self.columns)))
        rows = np.zeros((self.num_layers, len(self.columns)))
        index = {column: i for i, column in enumerate(self.columns)}
        for name, values in self.row_mavs.items():  # several per cell: one 2-D tensor per expert
            place = self.places[name]
            if place.matrix:
                above[place.layer, index[place.parameter]] += int((values > threshold).sum())
                rows[place.layer, index[place.parameter]] += values.size
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(rows > 0, above / np.maximum(rows, 1), np.nan)


# ---------------------------------------------------------------- parameter names


def _template_path(template: str) -> Tuple[str, ...]:
    parts = template.split(".")
    marks = [i for i, part in enumerate(parts) if "${" in part]
    path = tuple(parts[marks[0] + 1 :]) if marks else tuple(parts)
    if len(path) > 1 and path[-1] == "weight":
        path = path[:-1]
    return path


def _shortest_unique_tails(paths: Sequence[Tuple[str, ...]]) -> List[Tuple[str, ...]]:
    tails = []
    for path in paths:
        tail = path
        for size in range(1, len(path) + 1):
            if sum(1 for other in paths if other[-size:] == path[-size:]) == 1:
                tail = path[-size:]
                break
        tails.append(tail)
    return tails


def _common_suffix(words: Sequence[str]) -> str:
    """The ``_suffix`` every word ends with ("" when there is none)."""
    if len(words) < 2 or any("_" not in word.strip("_") for word in words):
        return ""
    ends = {word.rsplit("_", 1)[1] for word in words}
    return "_" + ends.pop() if len(ends) == 1 else ""


def parameter_names(templates: Sequence[str], matrix: Sequence[bool]) -> List[str]:
    """Short, unique names for a layer's weight templates (see the module docstring)."""
    tails = _shortest_unique_tails([_template_path(t) for t in templates])
    suffix = _common_suffix([tail[-1] for tail, is_matrix in zip(tails, matrix) if is_matrix])

    def strip(part: str) -> str:
        return part[: -len(suffix)] if suffix and part.endswith(suffix) else part

    stripped = [".".join(strip(p) for p in tail) for tail in tails]
    if len(set(stripped)) == len(stripped):
        return stripped
    return [".".join(tail) for tail in tails]


def _layer_templates(info, module) -> List[str]:
    module_arch = info.arch_info.modules[info.module_name].architecture
    definition = getattr(module_arch, "definition", None)
    if definition is not None:  # a JSON architecture: the templates themselves
        return [weight.name for weight in definition.layer_templates.weights]
    return [weight.name for weight in module.layer_weights(0)]


def tensor_places(info, model, shapes: Dict[str, Tuple[Tuple[int, ...], str]]) -> Tuple[Dict[str, Place], List[str]]:
    """Stored tensor name -> Place, and the heatmap columns in template order. A
    mixture-of-experts tensor stored one 2-D matrix per expert takes the place of the
    fused 3-D tensor it is converted into; both count as matrices (their rows are the
    experts' rows)."""
    from mergekit_layerswap.adapter.layout import sources_by_target

    module = info.module(model)
    per_layer = [module.layer_weights(layer) for layer in range(info.num_layers)]
    templates = _layer_templates(info, module)
    by_target = sources_by_target(info.model_type, shapes)

    def stored_names(weight) -> List[str]:
        for n in (weight.name,) + tuple(weight.aliases or ()):
            if n in shapes:
                return [n]
        return next((by_target[n] for n in (weight.name,) + tuple(weight.aliases or ()) if n in by_target), [])

    matrix = []
    for position in range(len(templates)):
        names = [n for weights in per_layer for n in stored_names(weights[position])]
        matrix.append(any(len(shapes[n][0]) in (2, 3) for n in names))
    parameters = parameter_names(templates, matrix)

    places: Dict[str, Place] = {}
    for layer, weights in enumerate(per_layer):
        for position, weight in enumerate(weights):
            for name in stored_names(weight):
                places[name] = Place(layer, parameters[position], matrix[position])
    for name in shapes:
        places.setdefault(name, Place(None, name, False))
    columns = [p for p, is_matrix in zip(parameters, matrix) if is_matrix]
    return places, columns


# ---------------------------------------------------------------- streaming


def expert_names(models: Sequence[Any], reserved: Sequence[str] = ("comparison",)) -> List[str]:
    """File-safe, distinct labels: the model directory's (or hub repo's) own name."""
    names: List[str] = []
    for model in models:
        base = os.path.basename(str(model.model.path).rstrip("/\\")) or "expert"
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base)
        name, count = base, 1
        while name in names or name in reserved:
            count += 1
            name = f"{base}-{count}"
        names.append(name)
    return names


def analyze_experts(
    base, experts: Sequence[Any], device: str = "cpu", quiet: bool = True, trust_remote_code: bool = False
) -> List[ExpertDelta]:
    """Stream every expert against ``base``; configs and headers are checked first."""
    from mergekit_layerswap.adapter.header_checks import read_models, stored_tensors
    from mergekit_layerswap.adapter.magnitude import stream_row_mavs
    from mergekit_layerswap.core.layers import LANGUAGE, SwapZones
    from mergekit_layerswap.core.recipe import Expert, SwapRecipe

    # read_models checks one architecture and one layer count; roles play no part here
    recipe = SwapRecipe(
        experts=tuple(Expert(m, LANGUAGE) for m in experts), base_model=base, zones=SwapZones(0, 0, 0, 0)
    )
    info = read_models(recipe, trust_remote_code=trust_remote_code)
    deltas = []
    for model, name in zip(experts, expert_names(experts)):
        places, columns = tensor_places(info, model, stored_tensors(model))
        row_mavs = {
            tensor: _finite_rows(values.detach().float().cpu().numpy(), model, base, tensor)
            for tensor, values in stream_row_mavs(model, base, device=device, quiet=quiet, desc=f"Rows of {name}")
        }
        deltas.append(ExpertDelta(name, model, info.num_layers, columns, places, row_mavs))
    return deltas


def _finite_rows(values: np.ndarray, model, base, tensor: str) -> np.ndarray:
    """A NaN or inf in either model makes its row values meaningless: say so, naming the
    model and tensor (read again only on that failure, to tell which of the two it is)."""
    if np.all(np.isfinite(values)):
        return values
    import torch

    from mergekit_layerswap.adapter.mergekit_parts import loader
    from mergekit_layerswap.core.errors import RecipeError

    culprit = f"expert {model} or base {base}"  # (the difference overflowed)
    for candidate, label in ((model, "expert"), (base, "base")):
        if not bool(torch.isfinite(loader(candidate).get_tensor(tensor)).all()):
            culprit = f"{label} {candidate}"
            break
    raise RecipeError(
        f"{culprit} has non-finite values (NaN or inf) in tensor {tensor}, so its change from the base "
        f"cannot be measured; repair or re-export that checkpoint"
    )


# ---------------------------------------------------------------- stats files


def threshold_label(threshold: Threshold) -> str:
    return AUTO if threshold == AUTO else f"{float(threshold):g}"


def stat_rows(deltas: Sequence[ExpertDelta], thresholds: Sequence[Threshold]) -> List[Dict[str, Any]]:
    """One row per expert x stored tensor: layer (None outside the layers), parameter,
    row count, mean and max row value, share of rows above each threshold."""
    rows = []
    for delta in deltas:
        values_of = {threshold_label(t): delta.resolve(t) for t in thresholds}
        order = sorted(delta.row_mavs, key=lambda n: (delta.places[n].layer is None, delta.places[n].layer or 0))
        for tensor in order:
            values = delta.row_mavs[tensor]
            place = delta.places[tensor]
            rows.append(
                {
                    "expert": delta.name,
                    "layer": place.layer,
                    "parameter": place.parameter,
                    "tensor": tensor,
                    "rows": int(values.size),
                    "mean_row_mav": float(values.astype(np.float64).mean()),
                    "max_row_mav": float(values.max()),
                    "share_above": {label: float((values > v).mean()) for label, v in values_of.items()},
                }
            )
    return rows


def _csv_text(rows: List[Dict[str, Any]], labels: List[str], autos: Dict[str, float]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extra = ["auto_threshold"] if AUTO in labels else []
    writer.writerow(
        ["expert", "layer", "parameter", "tensor", "rows", "mean_row_mav", "max_row_mav"]
        + [f"share_above_{label}" for label in labels]
        + extra
    )
    for row in rows:
        writer.writerow(
            [
                row["expert"],
                "" if row["layer"] is None else row["layer"],
                row["parameter"],
                row["tensor"],
                row["rows"],
                repr(row["mean_row_mav"]),
                repr(row["max_row_mav"]),
            ]
            + [repr(row["share_above"][label]) for label in labels]
            + ([repr(autos[row["expert"]])] if extra else [])
        )
    return buffer.getvalue()


def write_stats(deltas: Sequence[ExpertDelta], thresholds: Sequence[Threshold], out_dir: str) -> List[str]:
    """Write ``stats.csv`` and ``stats.json`` into ``out_dir``; returns their paths."""
    rows = stat_rows(deltas, thresholds)
    labels = [threshold_label(t) for t in thresholds]
    autos = {d.name: d.auto_threshold() for d in deltas}
    document = {
        "thresholds": [
            {
                "label": label,
                "value": None if t == AUTO else float(t),
                **({"quantile": AUTO_QUANTILE, "per_expert": autos} if t == AUTO else {}),
            }
            for label, t in zip(labels, thresholds)
        ],
        "experts": [
            {
                "name": d.name,
                "model": str(d.model),
                "num_layers": d.num_layers,
                "columns": d.columns,
                "rows": int(d.all_rows().size),
                "mean_row_mav": float(d.all_rows().astype(np.float64).mean()),
                "layer_profile": [None if np.isnan(v) else float(v) for v in d.layer_profile()],
            }
            for d in deltas
        ],
        "rows": rows,
    }
    os.makedirs(out_dir, exist_ok=True)
    csv_path, json_path = os.path.join(out_dir, "stats.csv"), os.path.join(out_dir, "stats.json")
    atomic_write_text(csv_path, _csv_text(rows, labels, autos), newline="")
    atomic_write_text(json_path, json.dumps(document, indent=1) + "\n", newline="")
    return [csv_path, json_path]
