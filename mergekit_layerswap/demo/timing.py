# SPDX-License-Identifier: LGPL-3.0-only
"""Wall and CPU seconds of each demo step, for the closing summary and ``bench/demo_timing.py``.

CPU seconds are user + system time of this process and of the subprocesses it waited
for (pip, mergekit-yaml): on shared cores wall time is inflated by other jobs, CPU time
much less so.
"""

from __future__ import annotations

import json
import os
import resource
import time
from contextlib import contextmanager
from typing import Dict, Iterator

TIMINGS_FILE = "demo-timings.json"


def cpu_seconds() -> float:
    """User + system seconds of this process and its waited-for children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StepTimes:
    """Records ``{"wall": s, "cpu": s}`` per named step; a step run again adds up."""

    def __init__(self) -> None:
        self.steps: Dict[str, Dict[str, float]] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), cpu_seconds()
        try:
            yield
        finally:
            entry = self.steps.setdefault(name, {"wall": 0.0, "cpu": 0.0})
            entry["wall"] += time.perf_counter() - wall
            entry["cpu"] += cpu_seconds() - cpu

    def summary(self) -> str:
        return ", ".join(f"{name} {t['wall']:.0f} s (cpu {t['cpu']:.0f} s)" for name, t in self.steps.items())

    def write(self, root: str) -> str:
        path = os.path.join(root, TIMINGS_FILE)
        with open(path, "w") as handle:
            json.dump(self.steps, handle, indent=2)
        return path
