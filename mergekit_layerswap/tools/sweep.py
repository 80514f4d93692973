# SPDX-License-Identifier: LGPL-3.0-only
"""Sweep swap configurations: assemble each candidate in memory, evaluate it, keep the best.

Experts are loaded once (when they fit in memory) and magnitude statistics come from
the cache, so a candidate costs a re-assembly and an evaluation, not a re-read or a
checkpoint. When the experts do not fit, each candidate is merged through mergekit
into a temporary directory instead (and the sweep says so). Results are appended to
``results.csv`` as they come, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from mergekit_layerswap.core import METHOD_NAME
from mergekit_layerswap.core.errors import OptionError, RecipeError
from mergekit_layerswap.core.files import atomic_write_text
from mergekit_layerswap.core.layers import SwapZones
from mergekit_layerswap.core.parameters import CHOICE_PARAMETERS, SWEEPABLE, SYMBOLS, ZONE_PARAMETERS
from mergekit_layerswap.core.recipe import check_zone_fit
from mergekit_layerswap.core.zones import with_layers
from mergekit_layerswap.tools.sweep_files import ResultsFile, plot, write_best_recipe
from mergekit_layerswap.tools.sweep_inputs import check_eval_data, eval_items, sweep_record
from mergekit_layerswap.tools.sweep_strategy import Grid, Halving, Strategy
from mergekit_layerswap.tools.sweep_worker import Candidate, SweepWorker

BASELINES = ("task-expert", "language-expert", "soup")


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``NAME=V1,V2``; for a zone, ``NAME.FILTER=V1,V2`` sweeps the layers of the tensors
    that FILTER selects (per-module zones) and ``NAME=...`` those no filter selects."""
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise OptionError(f"{item!r}: write NAME=V1,V2,... e.g. bottom_layers=3,4,5", "--grid")
        name, dot, filt = key.partition(".")
        if name not in SWEEPABLE:
            raise OptionError(f"{name!r} cannot be swept; use one of {', '.join(SWEEPABLE)}", "--grid")
        if dot and (name not in ZONE_PARAMETERS or not filt or filt == "*"):
            raise OptionError(
                f"{key!r}: only a zone takes a filter, as NAME.FILTER=V1,V2 e.g. bottom_layers.self_attn=3,4,5",
                "--grid",
            )
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
        grid[key] = parsed
    if not grid:
        raise OptionError("give at least one NAME=V1,V2,...", "--grid")
    return grid


def candidate_name(point: Dict[str, Any]) -> str:
    def symbol(key: str) -> str:
        name, dot, filt = key.partition(".")
        return (SYMBOLS[name].replace("_", "") if name in SYMBOLS else name) + (f".{filt}" if dot else "")

    return "-".join(f"{symbol(k)}{v}" for k, v in point.items())


def candidates(
    grid: Dict[str, List[Any]], num_layers: int, zones: SwapZones, layer_names: Sequence[str] = ()
) -> Tuple[List[Candidate], List[str]]:
    """Every grid point whose zones fit the model, and the names of those that do not.
    A candidate's parameters hold each swept zone's whole value (the recipe's other
    filter entries kept); ``layer_names`` (a decoder layer's tensors) are needed to check
    per-module zones."""
    fitting, skipped = [], []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        parameters = {k: v for k, v in point.items() if k in SWEEPABLE and k not in ZONE_PARAMETERS}
        swept = dataclasses.asdict(zones)
        touched = []
        for key, value in point.items():
            name, _, filt = key.partition(".")
            if name in ZONE_PARAMETERS:
                swept[name] = with_layers(swept[name], filt or None, value)
                touched.append(name)
        parameters.update({name: swept[name] for name in ZONE_PARAMETERS if name in touched})
        try:
            check_zone_fit(SwapZones(**swept), num_layers, layer_names)
        except RecipeError:
            skipped.append(candidate_name(point))
            continue
        fitting.append(Candidate(candidate_name(point), "swap", parameters))
    return fitting, skipped


class SerialBackend:
    """Candidates evaluated one after another in this process."""

    def __init__(self, recipe_path: str, run, device: str, echo: Callable[[str], None]):
        self.recipe_path, self.run, self.device, self.echo = recipe_path, run, device, echo
        self._worker: Optional[SweepWorker] = None

    @property
    def worker(self) -> SweepWorker:
        if self._worker is None:
            self._worker = SweepWorker(self.recipe_path, device=self.device, run=self.run)
            if not self._worker.in_memory:
                self.echo(
                    "the experts do not fit in memory: each candidate is merged to a temporary directory (streaming)"
                )
        return self._worker

    @property
    def in_memory(self) -> Optional[bool]:
        return None if self._worker is None else self._worker.in_memory

    def evaluate_all(self, jobs: Sequence[Candidate], evaluator) -> Iterator[Tuple[Candidate, Any]]:
        for candidate in jobs:
            yield candidate, self.worker.evaluate(candidate, evaluator)

    def fingerprint(self, candidate: Candidate) -> Dict[str, str]:
        return self.worker.fingerprint(candidate)

    def close(self) -> None:
        self._worker = None


def absolute_spec(evaluator):
    """The evaluator with its eval file and lm-eval tasks folder as absolute paths (workers
    may run elsewhere, and a resume compares them)."""
    if not dataclasses.is_dataclass(evaluator):
        return evaluator
    kind, _, argument = evaluator.spec.partition(":")
    if kind in ("exact-match", "perplexity") and argument:
        evaluator = dataclasses.replace(evaluator, spec=f"{kind}:{os.path.abspath(argument)}")
    if getattr(evaluator, "tasks_path", None):
        evaluator = dataclasses.replace(evaluator, tasks_path=os.path.abspath(evaluator.tasks_path))
    return evaluator


def run_sweep(
    recipe_path: str,
    grid: Dict[str, List[Any]],
    out_dir: str,
    evaluator,
    device: str = "cpu",
    baselines: bool = True,
    strategy: Optional[Strategy] = None,
    ray: Optional[Any] = None,
    restart: bool = False,
    echo: Callable[[str], None] = print,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Run (or resume) a sweep. ``evaluator`` is an evaluate.Evaluator (or anything with its
    ``spec``, ``limit``, ``with_limit``, ``settings`` and ``__call__(model, tokenizer) -> Score``);
    ``strategy`` is Grid() or Halving(minimum, eta); ``ray`` a sweep_ray.RayOptions, or None to
    run in this process."""
    import tqdm

    from mergekit_layerswap.adapter.planner import prepare, resolve_magnitudes
    from mergekit_layerswap.tools.recipe_file import load_config

    strategy = strategy or Grid()
    evaluator = absolute_spec(evaluator)
    recipe_path = os.path.abspath(recipe_path)
    if ray is not None:
        from mergekit_layerswap.tools.sweep_ray import require_ray

        require_ray()
    check_eval_data(evaluator)  # before any candidate is built
    config = load_config(recipe_path)
    if config.merge_method != METHOD_NAME:
        raise RecipeError(f"{recipe_path} uses merge_method {config.merge_method!r}; sweep takes a layer_swap recipe")
    run = prepare(config)
    resolve_magnitudes(run, device=device, quiet=quiet)
    per_module = run.recipe.zones.per_module or any("." in key for key in grid)
    layer_names = run.info.layer_names(run.recipe.donor) if per_module else ()
    swaps, skipped = candidates(grid, run.info.num_layers, run.recipe.zones, layer_names)
    if skipped:
        echo(
            f"skipped {len(skipped)} grid points whose zones exceed {run.info.num_layers} layers: {', '.join(skipped)}"
        )
    extra = [Candidate(name, "baseline") for name in BASELINES] if baselines else []
    problems = eval_items(evaluator, _tokenizer(run)) if isinstance(strategy, Halving) else None
    rungs = strategy.rungs(len(swaps), problems, evaluator.limit)
    models = list(run.recipe.models) + ([run.recipe.base_model] if run.recipe.base_model is not None else [])
    record = sweep_record(recipe_path, models, evaluator, strategy.describe(rungs), grid, baselines, device)
    results = ResultsFile(out_dir, record, restart=restart)
    try:
        done = len(results.rows)
        if done:
            echo(f"resuming: {done} evaluations already in {results.path}")

        if ray is not None:
            from mergekit_layerswap.tools.sweep_ray import RayBackend

            backend = RayBackend(ray, recipe_path, run, device, echo=echo, quiet=quiet)
        else:
            backend = SerialBackend(recipe_path, run, device, echo)
        names = [c.name for c in swaps]
        alive = list(swaps)
        total = sum(r.candidates for r in rungs) + len(extra)
        try:
            with tqdm.tqdm(total=total, initial=min(done, total), desc="Sweep", disable=quiet) as bar:
                for index, rung in enumerate(rungs):
                    final = index == len(rungs) - 1
                    batch = alive + (extra if final else [])
                    pending = [c for c in batch if results.get(c.name, index) is None]
                    rung_evaluator = evaluator.with_limit(rung.limit)
                    for candidate, score in backend.evaluate_all(pending, rung_evaluator):
                        row = results.add(candidate, score, rung=index, limit=rung.limit)
                        where = f" (rung {index}, {score.count} items)" if len(rungs) > 1 else ""
                        status = "" if row["status"] == "ok" else f"  [{row['status']}]"
                        echo(f"{candidate.name}: {score.metric} = {score.value:.6g}{where}{status}")
                        bar.update(1)
                    if not final:
                        keep = {
                            r["name"]
                            for r in results.ranked(index, [c.name for c in alive])[: rungs[index + 1].candidates]
                        }
                        bar.total -= rungs[index + 1].candidates - len(keep)  # failures are not promoted
                        bar.refresh()
                        alive = [c for c in alive if c.name in keep]
            final_rung = len(rungs) - 1
            best_score = results.best(final_rung, names)
            if best_score is not None:
                write_best_recipe(recipe_path, best_score, os.path.join(out_dir, "best.yaml"))
                _write_best_fingerprint(out_dir, best_score["name"], swaps, backend)
        finally:
            backend.close()
        spent = summarize(results, rungs, swaps, strategy)
        atomic_write_text(os.path.join(out_dir, "summary.json"), json.dumps(spent, indent=1))
        if len(rungs) > 1:
            echo(
                f"successive halving: {spent['items_spent']} item evaluations for the swap candidates; "
                f"the full grid would take {spent['items_full_grid']}"
            )
        plotted = plot(results, os.path.join(out_dir, "scores.png"))
        return {
            "results": results.path,
            "best": best_score,
            "plot": plotted,
            "in_memory": backend.in_memory,
            "summary": spent,
        }
    finally:
        results.close()


def _tokenizer(run):
    from transformers import AutoTokenizer

    from mergekit_layerswap.adapter.mergekit_parts import model_directory

    return AutoTokenizer.from_pretrained(model_directory(run.recipe.donor))


def _write_best_fingerprint(out_dir: str, name: str, swaps: Sequence[Candidate], backend) -> None:
    """best_fingerprint.json: sha256 of every tensor of the best candidate, for checking
    that best.yaml merged by mergekit-yaml reproduces it bit for bit."""
    path = os.path.join(out_dir, "best_fingerprint.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            try:
                if json.load(handle).get("name") == name:
                    return
            except ValueError:
                pass
    candidate = next(c for c in swaps if c.name == name)
    atomic_write_text(path, json.dumps({"name": name, "tensors": backend.fingerprint(candidate)}, indent=1))


def summarize(results, rungs, swaps: Sequence[Candidate], strategy) -> Dict[str, Any]:
    """Items evaluated per rung for the swap candidates, against the full grid's count."""
    names = {c.name for c in swaps}
    per_rung = []
    for index, rung in enumerate(rungs):
        rows = [r for (n, i), r in results.rows.items() if i == index and n in names]
        per_rung.append(
            {"rung": index, "limit": rung.limit, "candidates": len(rows), "items": sum(int(r["count"]) for r in rows)}
        )
    final_rows = [r for (n, i), r in results.rows.items() if i == len(rungs) - 1]
    full_items = int(final_rows[0]["count"]) if final_rows else None
    stopped = {}
    for (n, i), _row in results.rows.items():
        if n in names:
            stopped[n] = max(stopped.get(n, 0), i)
    return {
        "strategy": strategy.name,
        "rungs": per_rung,
        "items_spent": sum(r["items"] for r in per_rung),
        "items_full_grid": None if full_items is None else full_items * len(swaps),
        "stopped_at_rung": stopped,
    }


__all__ = ["run_sweep", "parse_grid", "candidates", "Candidate", "SweepWorker", "Grid", "Halving"]
