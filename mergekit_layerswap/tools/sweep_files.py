"""A sweep's files: ``results.csv`` (appended per candidate, so a sweep resumes),
``sweep.json`` (the settings, so a directory is not mixed between sweeps), ``best.yaml``
and ``scores.png``."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, Optional

import yaml

from mergekit_layerswap.core.errors import OptionError
from mergekit_layerswap.core.parameters import SWEEPABLE, ZONE_PARAMETERS

FIELDS = ["name", "kind", *SWEEPABLE, "metric", "score", "stderr", "count", "higher_is_better"]


class ResultsFile:
    """``results.csv`` with one row per evaluated candidate; rows survive interruptions."""

    def __init__(self, out_dir: str, settings: Dict[str, Any]):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "results.csv")
        settings_path = os.path.join(out_dir, "sweep.json")
        if os.path.exists(settings_path):
            with open(settings_path, encoding="utf-8") as handle:
                previous = json.load(handle)
            if previous != settings:
                raise OptionError(f"{out_dir} holds results of a different sweep; use a new --out directory", "--out")
        else:
            with open(settings_path, "w", encoding="utf-8") as handle:
                json.dump(settings, handle, indent=2, sort_keys=True)
        self.rows: Dict[str, Dict[str, Any]] = {}
        if os.path.exists(self.path):
            with open(self.path, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    self.rows[row["name"]] = row

    def add(self, candidate, score) -> Dict[str, Any]:
        """Append one evaluated candidate (a sweep.Candidate) with its evaluate.Score."""
        row = {"name": candidate.name, "kind": candidate.kind, **{k: candidate.parameters.get(k, "") for k in SWEEPABLE},
               "metric": score.metric, "score": repr(score.value),
               "stderr": "" if score.stderr is None else repr(score.stderr), "count": score.count,
               "higher_is_better": score.higher_is_better}
        new_file = not os.path.exists(self.path)
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        self.rows[candidate.name] = {k: str(v) for k, v in row.items()}
        return row

    def best(self) -> Optional[Dict[str, Any]]:
        swaps = [r for r in self.rows.values() if r["kind"] == "swap"]
        if not swaps:
            return None
        higher = swaps[0]["higher_is_better"] == "True"
        return (max if higher else min)(swaps, key=lambda r: float(r["score"]))


def write_best_recipe(recipe_path: str, row: Dict[str, Any], out_path: str) -> None:
    with open(recipe_path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    parameters = dict(data.get("parameters") or {})
    for name in SWEEPABLE:
        if row.get(name, "") != "":
            parameters[name] = int(row[name]) if name in ZONE_PARAMETERS else row[name]
    data["parameters"] = parameters
    header = (f"# best of a layer_swap sweep: {row['name']} with {row['metric']} = {float(row['score']):.6g}"
              f" over {row['count']} items\n")
    with open(out_path, "w", encoding="utf-8") as handle:
        handle.write(header + yaml.safe_dump(data, sort_keys=False))


def plot(results: ResultsFile, out_path: str) -> bool:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        return False
    del matplotlib
    rows = list(results.rows.values())
    swaps = [r for r in rows if r["kind"] == "swap"]
    baselines = [r for r in rows if r["kind"] == "baseline"]
    figure = Figure(figsize=(max(6, 0.35 * len(swaps) + 2), 4.5), dpi=100)
    axes = figure.add_subplot()
    axes.bar(range(len(swaps)), [float(r["score"]) for r in swaps], color="#4c72b0")
    axes.set_xticks(range(len(swaps)), [r["name"] for r in swaps], rotation=70, fontsize=7)
    for row, style in zip(baselines, ("--", ":", "-.")):
        axes.axhline(float(row["score"]), linestyle=style, color="#c44e52", label=row["name"])
    if baselines:
        axes.legend(fontsize=8)
    metric = rows[0]["metric"] if rows else ""
    axes.set_ylabel(metric)
    axes.set_title(f"layer_swap sweep: {metric} per configuration")
    figure.tight_layout()
    figure.savefig(out_path)
    return True
