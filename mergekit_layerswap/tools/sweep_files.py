# SPDX-License-Identifier: LGPL-3.0-only
"""A sweep's files: ``results.csv`` (appended per evaluation, so a sweep resumes),
``sweep.json`` (what the scores were computed from, so a directory is never mixed
between sweeps), ``summary.json``, ``best.yaml`` and ``scores.png``."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import yaml

from mergekit_layerswap.core.errors import OutputError
from mergekit_layerswap.core.files import atomic_file, atomic_write_text
from mergekit_layerswap.core.parameters import SWEEPABLE, ZONE_PARAMETERS
from mergekit_layerswap.core.zones import to_recipe
from mergekit_layerswap.tools.sweep_inputs import check_resume, is_finite

FIELDS = [
    "name",
    "kind",
    *SWEEPABLE,
    "rung",
    "limit",
    "metric",
    "score",
    "stderr",
    "count",
    "higher_is_better",
    "status",
]
# every file a sweep writes into its --out directory (and all that --restart removes)
SWEEP_FILES = ("results.csv", "sweep.json", "summary.json", "best.yaml", "best_fingerprint.json", "scores.png")
OK = "ok"
NON_FINITE = "failed: non-finite score"


class ResultsFile:
    """``results.csv``: one row per (candidate, rung) evaluated; rows survive interruptions.

    A grid sweep has one rung (0, the full set); successive halving has one per slice size.
    """

    def __init__(self, out_dir: str, record: Dict[str, Any], restart: bool = False):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self._lock: Optional[int] = _lock_directory(out_dir)
        try:
            self._open(record, restart)
        except BaseException:
            self.close()
            raise

    def _open(self, record: Dict[str, Any], restart: bool) -> None:
        out_dir = self.out_dir
        self.path = os.path.join(out_dir, "results.csv")
        record_path = os.path.join(out_dir, "sweep.json")
        if restart:
            for name in SWEEP_FILES:
                if os.path.isfile(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        if os.path.exists(record_path) or os.path.exists(self.path):
            check_resume(record_path, record)
        else:
            atomic_write_text(record_path, json.dumps(record, indent=1, sort_keys=True))
        self.rows: Dict[tuple, Dict[str, str]] = {}
        if os.path.exists(self.path):
            _drop_torn_last_line(self.path)
            with open(self.path, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    self.rows[(row["name"], int(row["rung"]))] = row

    def close(self) -> None:
        """Release the directory for the next sweep."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def get(self, name: str, rung: int) -> Optional[Dict[str, str]]:
        return self.rows.get((name, rung))

    def add(self, candidate, score, rung: int = 0, limit: Optional[int] = None) -> Dict[str, str]:
        """Append one evaluation of a candidate (a sweep.Candidate) with its evaluate.Score;
        a non-finite score is kept as a failure, never ranked."""
        row = {
            "name": candidate.name,
            "kind": candidate.kind,
            **{k: _cell(k, candidate.parameters.get(k, "")) for k in SWEEPABLE},
            "rung": rung,
            "limit": "" if limit is None else limit,
            "metric": score.metric,
            "score": repr(float(score.value)),
            "stderr": "" if score.stderr is None else repr(score.stderr),
            "count": score.count,
            "higher_is_better": score.higher_is_better,
            "status": OK if is_finite(score.value) else NON_FINITE,
        }
        new_file = not os.path.exists(self.path)
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        row = {k: str(v) for k, v in row.items()}
        self.rows[(candidate.name, rung)] = row
        return row

    def ranked(self, rung: int, names: Sequence[str]) -> List[Dict[str, str]]:
        """Rows of ``names`` at ``rung`` with a finite score, best first; ties go to the
        earlier name in ``names`` (grid order), so Ray's arrival order never decides."""
        order = {name: i for i, name in enumerate(names)}
        rows = [self.rows[(n, rung)] for n in names if (n, rung) in self.rows]
        rows = [r for r in rows if r["status"] == OK and is_finite(r["score"])]
        if not rows:
            return []
        sign = -1.0 if rows[0]["higher_is_better"] == "True" else 1.0
        return sorted(rows, key=lambda r: (sign * float(r["score"]), order[r["name"]]))

    def best(self, rung: int, names: Sequence[str]) -> Optional[Dict[str, str]]:
        ranked = self.ranked(rung, names)
        return ranked[0] if ranked else None


def _cell(name: str, value: Any) -> Any:
    """A results.csv cell: a per-module zone as the JSON of its recipe form (a plain number
    stays a plain number)."""
    return json.dumps(to_recipe(value)) if name in ZONE_PARAMETERS and isinstance(value, tuple) else value


def _lock_directory(out_dir: str) -> int:
    """Hold an exclusive lock on ``out_dir`` while this sweep runs (released when the process
    ends, however it ends): two sweeps in one directory would evaluate every candidate twice
    and interleave their rows."""
    import fcntl

    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(
            f"another sweep is running in {out_dir}; wait for it to finish (then run this one again to "
            f"resume), or give another --out"
        ) from None
    return fd


def _drop_torn_last_line(path: str) -> None:
    """A sweep killed while appending leaves a last line without its newline: drop it (that
    evaluation runs again) so the next row does not glue onto it."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data and not data.endswith(b"\n"):
        with open(path, "wb") as handle:
            handle.write(data[: data.rfind(b"\n") + 1])


def write_best_recipe(recipe_path: str, row: Dict[str, Any], out_path: str) -> None:
    with open(recipe_path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    parameters = dict(data.get("parameters") or {})
    for name in SWEEPABLE:
        if row.get(name, "") != "":
            parameters[name] = json.loads(row[name]) if name in ZONE_PARAMETERS else row[name]
    data["parameters"] = parameters
    header = (
        f"# best of a layer_swap sweep: {row['name']} with {row['metric']} = {float(row['score']):.6g}"
        f" over {row['count']} items\n"
    )
    atomic_write_text(out_path, header + yaml.safe_dump(data, sort_keys=False))


def plot(results: ResultsFile, out_path: str) -> bool:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        return False
    del matplotlib
    final = max((rung for _name, rung in results.rows), default=0)
    rows = [r for (_name, rung), r in results.rows.items() if rung == final and r["status"] == OK]
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
    with atomic_file(out_path, "wb") as handle:
        figure.savefig(handle, format="png")
    return True
