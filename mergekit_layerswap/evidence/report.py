# SPDX-License-Identifier: LGPL-3.0-only
"""The committed table of the evidence run, made from whatever stages have finished.

``write_report`` reads ``<run>/stages/*.json`` and writes a small JSON (means, paired
bootstrap intervals, stage timings; no checkpoints, no per-problem lists) and rewrites
the part of ``docs/evidence.md`` between the two markers below. A cell whose stage has
not run yet says so; nothing is filled in by hand.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from mergekit_layerswap.core.errors import DataError
from mergekit_layerswap.core.files import atomic_write_text
from mergekit_layerswap.evidence.stages import RunDir
from mergekit_layerswap.evidence.stats import paired_bootstrap, reading

START, END = "<!-- evidence-results:start -->", "<!-- evidence-results:end -->"
NOT_YET = "not yet measured"
MODELS = ("base", "math-expert", "swahili-expert", "soup", "swap-default")
BASELINES = ("base", "math-expert", "swahili-expert", "soup")

# column -> (stage name pattern, value key, lower is better)
METRICS = {
    "answer loss, Swahili": ("loss.{}.test-swh", "losses", True),
    "answer loss, English": ("loss.{}.test-eng", "losses", True),
    "Swahili text loss": ("text-loss.{}.test-swh", "losses", True),
    "exact match, chat, Swahili": ("em.{}.chat-swh", "correct", False),
    "exact match, MGSM native CoT (lm-eval, flexible), Swahili": ("em.{}.lm-eval-swh", "correct", False),
    "exact match, chat, English": ("em.{}.chat-eng", "correct", False),
    "exact match, MGSM native CoT, real MGSM sw": ("em.{}.mgsm-mgsm-sw", "correct", False),
}


def _scores(records: Dict[str, dict], pattern: str, model: str, key: str) -> Optional[Dict[str, float]]:
    """id -> value of the metric's stage for ``model``; for exact match the stage over
    the most problems."""
    name = pattern.format(model)
    found = [r for n, r in records.items() if n == name or n.startswith(name + ".")]
    if not found:
        return None
    record = max(found, key=lambda r: len(r["result"]["ids"]))
    return {i: float(v) for i, v in zip(record["result"]["ids"], record["result"][key])}


def _mean(values: Dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def collect(run_dir: str) -> Dict[str, Any]:
    records = RunDir(run_dir, log=lambda _: None).records()
    if not records:
        raise DataError(f"{run_dir} has no finished stages; run `mergekit-layerswap evidence run --run-dir {run_dir}`")
    sweep = records.get("sweep", {}).get("result")
    models = list(MODELS) + ([sweep["best"]] if sweep and sweep["best"] not in MODELS else [])
    table: Dict[str, Dict[str, Any]] = {}
    paired: List[Dict[str, Any]] = []
    for column, (pattern, key, lower) in METRICS.items():
        per_model = {m: _scores(records, pattern, m, key) for m in models}
        for model, values in per_model.items():
            table.setdefault(model, {})[column] = (
                None if values is None else {"value": round(_mean(values), 4), "n": len(values)}
            )
        comparisons = [(m, b) for m in models if m.startswith("swap-") for b in BASELINES]
        comparisons += [("math-expert", "base"), ("swahili-expert", "base")]
        for model, baseline in comparisons:
            a, b = per_model.get(model), per_model.get(baseline)
            if not a or not b:
                continue
            shared = [i for i in a if i in b]
            if len(shared) < 2:
                continue
            interval = paired_bootstrap([a[i] for i in shared], [b[i] for i in shared])
            paired.append(
                {
                    "metric": column,
                    "model": model,
                    "baseline": baseline,
                    **{k: round(v, 4) if isinstance(v, float) else v for k, v in interval.items()},
                    "reading": reading(interval, lower_is_better=lower),
                }
            )
    timings = {
        name: {
            "wall_s": r["wall_s"],
            "cpu_s": r["cpu_s"],
            "finished_at": r["finished_at"],
            "load_average_at_start": r["machine_at_start"]["load_average"],
        }
        for name, r in sorted(records.items(), key=lambda item: item[1]["finished_at"])
    }
    experts = {n: records[n]["result"] for n in ("math-expert", "swahili-expert") if n in records}
    return {
        "models": models,
        "table": table,
        "paired": paired,
        "sweep": sweep,
        "experts": {
            n: {k: v for k, v in e.items() if k in ("mean_loss_first_10", "mean_loss_last_10", "texts", "threads")}
            | {"steps": e.get("settings", {}).get("steps"), "batch_size": e.get("settings", {}).get("batch_size")}
            for n, e in experts.items()
            if "mean_loss_last_10" in e
        },
        "throughput": records.get("throughput", {}).get("result"),
        "data": records.get("data", {}).get("result"),
        "machine": next(iter(records.values()))["machine_at_start"]["cpu"],
        "timings": timings,
    }


# cells the run does not plan to fill (the budget), and why
NOT_PLANNED = {
    "exact match, chat, English": ("base", "math-expert"),  # only these two are planned in English
}


def _cell(entry: Optional[dict], accuracy: bool, model: str = "", column: str = "") -> str:
    if entry is None:
        if column in NOT_PLANNED and model not in NOT_PLANNED[column]:
            return "not planned"
        if column.endswith("real MGSM sw"):
            return "needs --mgsm-tsv"
        return NOT_YET
    if accuracy:
        return f"{entry['value'] * 100:.1f}% (n={entry['n']})"
    return f"{entry['value']:.3f} (n={entry['n']})"


def markdown(results: Dict[str, Any]) -> str:
    columns = list(METRICS)
    lines = [
        "### Means per model (held-out templates 60-99)",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for model in results["models"]:
        cells = [_cell(results["table"][model][c], c.startswith("exact"), model, c) for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Paired differences (model - baseline, same problems; 95% paired bootstrap, 10,000 resamples, seed 0)",
        "",
    ]
    if results["paired"]:
        lines += ["| metric | model | baseline | difference [95% CI] | n | reading |", "|---|---|---|---|---|---|"]
        for p in results["paired"]:
            scale, unit = (100, " pt") if p["metric"].startswith("exact") else (1, "")
            lines.append(
                f"| {p['metric']} | {p['model']} | {p['baseline']} | {p['difference'] * scale:+.3f}{unit} "
                f"[{p['low'] * scale:+.3f}, {p['high'] * scale:+.3f}] | {p['n']} | {p['reading']} |"
            )
    else:
        lines.append(NOT_YET)
    if results["sweep"]:
        lines += ["", f"### Sweep (Swahili answer loss on templates 50-59): best `{results['sweep']['best']}`", ""]
        for rung in results["sweep"]["rungs"]:
            ranked = sorted(rung["scores"].items(), key=lambda item: item[1])
            lines.append(f"- {rung['problems']} problems: " + ", ".join(f"{n} {v:.4f}" for n, v in ranked))
    else:
        lines += ["", f"### Sweep: {NOT_YET}"]
    lines += ["", "### Experts (training loss, mean of the first and last 10 steps)", ""]
    if results["experts"]:
        for name, e in results["experts"].items():
            lines.append(
                f"- {name}: {e['steps']} steps of {e['batch_size']} texts (from {e['texts']}), "
                f"{e['threads']} thread(s); "
                f"loss {e['mean_loss_first_10']:.3f} -> {e['mean_loss_last_10']:.3f}"
            )
    else:
        lines.append(NOT_YET)
    if results["throughput"]:
        t = results["throughput"]
        lines.append(
            f"- throughput probe: {t['tokens_per_cpu_s']} tokens per CPU second, {t['cpu_s_per_step']} CPU s per "
            f"step of 4 x 128 tokens, {t['tokens_per_wall_s']} tokens per wall second ({t['threads']} thread)"
        )
    lines += ["", "### Stage timings (wall / CPU seconds, 1-minute load average when the stage started)", ""]
    lines += ["| stage | wall s | CPU s | load | finished (UTC) |", "|---|---|---|---|---|"]
    for name, t in results["timings"].items():
        load = t["load_average_at_start"][0] if t["load_average_at_start"] else "?"
        lines.append(f"| {name} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {load} | {t['finished_at']} |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str, json_path: str, markdown_path: str) -> str:
    results = collect(run_dir)
    atomic_write_text(json_path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    table = markdown(results)
    if os.path.isfile(markdown_path):
        with open(markdown_path, encoding="utf-8") as handle:
            text = handle.read()
        if START not in text or END not in text:
            raise DataError(f"{markdown_path} has no {START} ... {END} markers to put the results between")
        head, rest = text.split(START, 1)
        text = head + START + "\n" + table + END + rest.split(END, 1)[1]
    else:
        text = f"{START}\n{table}{END}\n"
    atomic_write_text(markdown_path, text)
    return f"wrote {json_path} and the results section of {markdown_path} ({len(results['timings'])} stages)"
