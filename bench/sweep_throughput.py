#!/usr/bin/env python
# SPDX-License-Identifier: LGPL-3.0-only
"""Sweep throughput in candidates per hour: serial vs ``--ray`` with two CPU workers vs
successive halving (issue 13). Not a test.

    python bench/sweep_throughput.py                       # writes bench/results/sweep_throughput.json
    python bench/sweep_throughput.py --repeats 2 --json bench/results-committed/sweep_throughput.json

Models: a small Llama (hidden 256, 8 layers, vocabulary 2048, ~7.4M parameters, fp32)
and two experts (base + seeded noise), generated once into bench/data/sweep-small with
a word-level tokenizer. Each job is the installed ``mergekit-layerswap sweep`` in its own
process on the same 9-candidate grid (bottom_layers x top_layers in {1,2,3}), no
baselines, perplexity on a fixed slice of a local text (``--limit`` 512-token windows),
into a fresh --out directory. Measured: wall time of the whole command (interpreter
start-up, imports, loading the experts, Ray's cluster start-up where used, every
candidate), candidates per hour = 9 / wall time, and item evaluations (tokens scored)
from the sweep's summary.json.

Jobs:
  serial           one process, torch's default threads (2 here)
  serial-1thread   the same with OMP_NUM_THREADS=1 (what each Ray worker gets); on a machine
                   whose cores are busy with other work, 2 threads that wait on each other can
                   be slower than 1
  ray2       --ray --ray-workers 2 --ray-cpus-per-worker 1 (a local cluster started for the run)
  halving    serial, --strategy halving --halving-min 1 --halving-eta 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "sweep-small")
GRID = ["--grid", "bottom_layers=1,2,3", "--grid", "top_layers=1,2,3"]
CANDIDATES = 9
JOBS = {
    "serial": [],
    "serial-1thread": [],
    "ray2": ["--ray", "--ray-workers", "2", "--ray-cpus-per-worker", "1"],
    "halving": ["--strategy", "halving", "--halving-min", "1", "--halving-eta", "3"],
}


def make_models() -> str:
    """Base and experts of a small Llama with a 2048-word tokenizer (once)."""
    if os.path.exists(os.path.join(DATA, "recipe.yaml")):
        return DATA
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from checkpoints import Arch, make_model
    from transformers import LlamaConfig

    def config():
        return LlamaConfig(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=2048,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        )

    arch = Arch("llama-small", config, "model.layers.{}.", 8)
    os.makedirs(DATA, exist_ok=True)
    base = make_model(arch, os.path.join(DATA, "base"), seed=1)
    task = make_model(arch, os.path.join(DATA, "task"), seed=2, base_path=base, noise=0.02)
    lang = make_model(arch, os.path.join(DATA, "lang"), seed=3, base_path=base, noise=0.05)
    words = " ".join(f"w{(7919 * i) % 2047 + 1}" for i in range(512 * 12))
    with open(os.path.join(DATA, "text.txt"), "w") as handle:
        handle.write(words)
    import yaml

    recipe = {
        "merge_method": "layer_swap",
        "base_model": base,
        "dtype": "float32",
        "models": [
            {"model": task, "parameters": {"role": "task"}},
            {"model": lang, "parameters": {"role": "language"}},
        ],
        "parameters": {"weighting": "magnitude"},
    }
    with open(os.path.join(DATA, "recipe.yaml"), "w") as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    return DATA


def run_job(name: str, limit: int, cache: str) -> dict:
    exe = os.path.join(os.path.dirname(sys.executable), "mergekit-layerswap")
    out = tempfile.mkdtemp(prefix=f"sweep-bench-{name}-")
    command = [
        exe,
        "sweep",
        os.path.join(DATA, "recipe.yaml"),
        *GRID,
        "--eval",
        f"perplexity:{os.path.join(DATA, 'text.txt')}",
        "--limit",
        str(limit),
        "--no-baselines",
        "--quiet",
        "--out",
        out,
        *JOBS[name],
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MERGEKIT_LAYERSWAP_CACHE": cache, "RAY_USAGE_STATS_ENABLED": "0"}
    if name == "serial-1thread":
        env["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stdout}\n{done.stderr}")
    with open(os.path.join(out, "summary.json")) as handle:
        summary = json.load(handle)
    best = [line for line in done.stdout.splitlines() if line.startswith("best:")]
    shutil.rmtree(out)
    return {
        "job": name,
        "wall_s": round(wall, 2),
        "candidates_per_hour": round(CANDIDATES * 3600 / wall, 1),
        "items_spent": summary["items_spent"],
        "items_full_grid": summary["items_full_grid"],
        "rungs": summary["rungs"],
        "best": best[0] if best else None,
        "load_average_1min_at_start": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--limit", type=int, default=6, help="512-token windows per candidate (the fixed slice)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "sweep_throughput.json"))
    args = parser.parse_args()
    make_models()
    cache = tempfile.mkdtemp(prefix="sweep-bench-cache-")
    runs = []
    order = list(JOBS)
    for repeat in range(args.repeats):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:  # rotate the order
            result = run_job(name, args.limit, cache)
            print(json.dumps(result))
            runs.append(result)
    shutil.rmtree(cache)
    best_wall = {name: min(r["wall_s"] for r in runs if r["job"] == name) for name in JOBS}
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "note": "2 CPU cores shared with other jobs running at the same time (see the load "
            "averages): absolute numbers are noisy, compare within one run; no GPU",
        },
        "setup": {
            "model": "Llama, hidden 256, 8 layers, vocab 2048, ~7.4M parameters, fp32",
            "grid": "bottom_layers x top_layers in {1,2,3}: 9 candidates, no baselines",
            "eval": f"perplexity on {args.limit} windows of 512 tokens",
            "weighting": "magnitude",
        },
        "load_average_1min_end": os.getloadavg()[0],
        "runs": runs,
        "best_wall_s": best_wall,
        "candidates_per_hour": {name: round(CANDIDATES * 3600 / wall, 1) for name, wall in best_wall.items()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps(report["candidates_per_hour"]))


if __name__ == "__main__":
    main()
