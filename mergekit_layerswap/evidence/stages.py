# SPDX-License-Identifier: LGPL-3.0-only
"""A run directory whose stages each leave one result file, so a cut-off run resumes.

``<run>/stages/<name>.json`` holds ``{"parameters", "result", "wall_s", "cpu_s", ...}``,
written atomically when the stage finishes. A rerun returns the stored result of a
stage whose parameters are unchanged and runs the others; a stage whose parameters
changed runs again. Stages that produce files write them under ``<run>/`` first and
record them only once complete, so a half-written checkpoint never counts as done.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from typing import Any, Callable, Dict, Optional

from mergekit_layerswap.core.files import atomic_write_text
from mergekit_layerswap.demo.timing import cpu_seconds

STAGES = "stages"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, Any]:
    """What a timing depends on: the CPU, its cores, and how busy they were."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load}


class RunDir:
    def __init__(self, root: str, log: Callable[[str], None] = print):
        self.root = os.path.abspath(root)
        self.log = log
        os.makedirs(os.path.join(self.root, STAGES), exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _file(self, name: str) -> str:
        return os.path.join(self.root, STAGES, f"{name}.json")

    def record(self, name: str) -> Optional[Dict[str, Any]]:
        """The stored record of a finished stage, or None."""
        try:
            with open(self._file(name), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def done(self, name: str, parameters: Dict[str, Any]) -> bool:
        record = self.record(name)
        return record is not None and record.get("parameters") == _plain(parameters)

    def forget(self, name: str) -> None:
        """Drop a stage's record (its output is gone, so it must run again)."""
        if os.path.exists(self._file(name)):
            os.remove(self._file(name))

    def stage(self, name: str, parameters: Dict[str, Any], work: Callable[[], Any]) -> Any:
        """``work()``'s result, stored under ``name``; a finished stage with the same
        parameters is not run again."""
        parameters = _plain(parameters)
        record = self.record(name)
        if record is not None and record.get("parameters") == parameters:
            self.log(f"[{name}] done earlier ({record['wall_s']:.0f} s), skipped")
            return record["result"]
        self.log(f"[{name}] running ...")
        started, cpu, start_machine = time.perf_counter(), cpu_seconds(), machine()
        result = work()
        record = {
            "stage": name,
            "parameters": parameters,
            "result": _plain(result),
            "wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(cpu_seconds() - cpu, 2),
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine_at_start": start_machine,
            "machine_at_end": machine(),
        }
        atomic_write_text(self._file(name), json.dumps(record, indent=2, sort_keys=True) + "\n")
        self.log(f"[{name}] finished in {record['wall_s']:.0f} s (cpu {record['cpu_s']:.0f} s)")
        return record["result"]

    def records(self) -> Dict[str, Dict[str, Any]]:
        folder = os.path.join(self.root, STAGES)
        found = {}
        for entry in sorted(os.listdir(folder)):
            if entry.endswith(".json"):
                record = self.record(entry[: -len(".json")])
                if record is not None:
                    found[record["stage"]] = record
        return found


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), so stored and new parameters compare."""
    return json.loads(json.dumps(value))
