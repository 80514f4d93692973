#!/usr/bin/env python
# SPDX-License-Identifier: LGPL-3.0-only
"""Merge time of the default layer_swap recipe with this checkout against an older
commit of the package, side by side in one run (issue 14: measure a change, not a day).

    python bench/ab.py --shape 3b --old 7942f54 --repeats 2

Uses bench/bench.py's models (generated if missing), recipe, eviction and measuring.
The older package is exported with ``git archive`` into a scratch folder put first on
PYTHONPATH for its jobs (it shadows the editable install; mergekit and torch are the
same). Jobs rotate: new, old, copy one expert / old, copy, new / ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=bench.SHAPES, default="1b")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--old", required=True, help="git commit of the package to compare with")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="results file (default bench/results/ab-<shape>.json)")
    opts = ap.parse_args()
    shape = dict(bench.SHAPES[opts.shape])
    label = opts.shape
    if opts.layers and opts.layers != shape["layers"]:
        shape["layers"], label = opts.layers, f"{opts.shape}-L{opts.layers}"
    data = os.path.join(bench.HERE, "data", label)
    bench.generate(label, shape, data, int(2e9))
    dirs = bench.model_dirs(data)
    recipe = os.path.join(data, "recipe_a.yaml")
    bench.write_yaml(bench.recipes(data, shape["layers"])["a"], recipe)
    old_src = tempfile.mkdtemp(prefix="ab-old-")
    archive = subprocess.run(
        ["git", "-C", bench.REPO, "archive", opts.old, "mergekit_layerswap"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", old_src], input=archive, check=True)
    base_env = dict(
        os.environ, MERGEKIT_LAYERSWAP_CACHE=os.path.join(data, "magnitude-cache"), TOKENIZERS_PARALLELISM="false"
    )
    envs = {"new": base_env, "old": dict(base_env, PYTHONPATH=old_src), "copy": base_env}
    largest = max(bench.numel(s) for _, s in bench.tensor_specs(shape)) * 2
    outdir = os.path.join(data, "out")
    results = {job: [] for job in envs}
    jobs = list(envs)
    for rep in range(opts.repeats):
        k = rep % len(jobs)
        for job in jobs[k:] + jobs[:k]:
            out = os.path.join(outdir, job)
            shutil.rmtree(outdir, ignore_errors=True)
            os.sync()
            bench.evict(bench.files_under(data))
            argv = (
                ["copy", dirs["lang"], out]
                if job == "copy"
                else ["merge", recipe, out, "--out-shard-size", bench.OUT_SHARD]
            )
            row = bench.run_job(argv, envs[job], os.path.join(data, f"log_ab_{job}_{rep}.txt"))
            if job != "copy":
                row["memory_ratio"] = bench.memory_ratio(row, largest)
            results[job].append(row)
            print(
                f"repeat {rep + 1} {job:5s} job {row['job_s']:6.1f} s  wall {row['wall_s']:6.1f} s  RssAnon "
                f"{row['rss_anon_peak_mb']:6.0f} MB  load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            shutil.rmtree(outdir, ignore_errors=True)
    shutil.rmtree(old_src, ignore_errors=True)
    med = {job: statistics.median(r["job_s"] for r in rows) for job, rows in results.items()}
    out = {
        "shape": label,
        "old": opts.old,
        "repeats": opts.repeats,
        "median_job_s": med,
        "merge_over_copy": {"old": med["old"] / med["copy"], "new": med["new"] / med["copy"]},
        "runs": results,
        "loadavg_end": os.getloadavg(),
    }
    print(json.dumps({k: out[k] for k in ("median_job_s", "merge_over_copy")}, indent=2))
    path = opts.json or os.path.join(bench.HERE, "results", f"ab-{label}.json")
    json.dump(out, open(path, "w"), indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
