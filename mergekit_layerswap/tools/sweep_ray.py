# SPDX-License-Identifier: LGPL-3.0-only
"""Sweeps on a Ray cluster: one actor per GPU (or per N CPU cores), each a ``SweepWorker``
that loads the experts once and assembles candidates in memory exactly as the serial
sweep does. The driver hands each idle actor the next candidate and writes each score to
``results.csv`` as it arrives, so an interrupted Ray sweep resumes like a serial one.

Ray is an extra (``pip install 'mergekit-layerswap[ray]'``). Its usage statistics are
switched off and no dashboard is started: a sweep never reaches the network by itself.
A cluster given by address must see the recipe's model paths and the eval file at the
same paths as this machine (a shared filesystem), and have this package installed.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from mergekit_layerswap.core.errors import LayerSwapError, OptionError

INSTALL_HINT = "--ray needs Ray, which is not installed: pip install 'mergekit-layerswap[ray]'"
LOCAL = "local"
# environment a worker on another machine needs to find and treat files as this driver does
FORWARDED_ENV = (
    "MERGEKIT_LAYERSWAP_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_DATASETS_OFFLINE",
    "HF_DATASETS_CACHE",
)


@dataclass(frozen=True)
class RayOptions:
    address: str = LOCAL  # "local": start a cluster for this run; else ray.init(address=...)
    workers: Optional[int] = None  # default: one per GPU with --cuda, else CPUs // cpus_per_worker
    cpus_per_worker: int = 4
    object_store_mb: int = 100  # candidates never pass through the object store; keep it small


def require_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise OptionError(INSTALL_HINT, "--ray") from None
    return ray


def _unwrap(ray, error: Exception) -> Exception:
    """The package's own error raised inside an actor, so it still prints as one line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LayerSwapError):
        return cause
    return error


class RayBackend:
    """Candidates evaluated on Ray actors, results yielded in the order they finish."""

    def __init__(
        self,
        options: RayOptions,
        recipe_path: str,
        run,
        device: str,
        echo: Callable[[str], None] = print,
        quiet: bool = False,
    ):
        self.options, self.recipe_path, self.run, self.device, self.echo = options, recipe_path, run, device, echo
        self.ray = require_ray()
        self.actors: list = []
        self.in_memory: Optional[bool] = None
        self._started_cluster = False

    # ------------------------------------------------------------------ cluster
    def _connect(self) -> None:
        ray, options = self.ray, self.options
        if ray.is_initialized():
            return  # a caller's own ray.init(): use that cluster, leave it running
        common = dict(include_dashboard=False, log_to_driver=False, logging_level="WARNING", configure_logging=True)
        if options.address == LOCAL:
            cpus = os.cpu_count() or 1
            if options.workers is not None and self.device != "cuda":
                cpus = max(cpus, options.workers * options.cpus_per_worker)
            gpus = 0
            if self.device == "cuda":
                import torch

                gpus = torch.cuda.device_count()
            ray.init(num_cpus=cpus, num_gpus=gpus, object_store_memory=options.object_store_mb * 1024 * 1024, **common)
        else:
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            try:
                ray.init(address=options.address, runtime_env={"env_vars": env} if env else None, **common)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise OptionError(
                    f"cannot connect to the Ray cluster at {options.address}: {' '.join(str(error).split())[:200]}",
                    "--ray",
                ) from None
        self._started_cluster = True

    def _worker_count(self) -> Tuple[int, Dict[str, float]]:
        resources = self.ray.cluster_resources()
        if self.device == "cuda":
            available = int(resources.get("GPU", 0))
            per_worker = {"num_cpus": 1, "num_gpus": 1}
            unit = "GPUs"
        else:
            available = int(resources.get("CPU", 0)) // self.options.cpus_per_worker
            per_worker = {"num_cpus": self.options.cpus_per_worker, "num_gpus": 0}
            unit = f"groups of {self.options.cpus_per_worker} CPUs"
        workers = self.options.workers if self.options.workers is not None else max(available, 1)
        if workers > available:
            raise OptionError(
                f"the Ray cluster has {available} {unit} for {workers} workers; ask for fewer "
                "workers (--ray-workers) or fewer cores each (--ray-cpus-per-worker)",
                "--ray-workers",
            )
        return workers, per_worker

    def _start(self) -> None:
        from mergekit_layerswap.tools.sweep_worker import SweepWorker

        self._connect()
        count, per_worker = self._worker_count()
        remote = self.ray.remote(SweepWorker).options(**per_worker)
        magnitudes = {str(m): stat for m, stat in self.run.magnitudes.items()}
        threads = self.options.cpus_per_worker if self.device != "cuda" else None
        self.actors = [
            remote.remote(
                self.recipe_path, device=self.device, magnitudes=magnitudes, torch_threads=threads, cwd=os.getcwd()
            )
            for _ in range(count)
        ]
        try:
            fits = self.ray.get([a.fits_in_memory.remote() for a in self.actors])
        except Exception as error:  # an actor that could not load the experts
            raise _unwrap(self.ray, error) from None
        self.in_memory = all(fits)
        if not self.in_memory:
            self.echo(
                "the experts do not fit in a worker's memory: each candidate is merged to a temporary "
                "directory (streaming)"
            )
        self.echo(
            f"Ray: {count} workers ({'1 GPU' if self.device == 'cuda' else str(per_worker['num_cpus']) + ' CPUs'} each)"
        )

    # ------------------------------------------------------------------ work
    def evaluate_all(self, jobs: Sequence[Any], evaluator) -> Iterator[Tuple[Any, Any]]:
        if not jobs:
            return
        if not self.actors:
            self._start()
        ray = self.ray
        queue = collections.deque(jobs)
        idle = list(self.actors)
        running: Dict[Any, Tuple[Any, Any]] = {}
        while queue or running:
            while idle and queue:
                actor, candidate = idle.pop(0), queue.popleft()
                running[actor.evaluate.remote(candidate, evaluator)] = (actor, candidate)
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                actor, candidate = running.pop(ref)
                try:
                    score = ray.get(ref)
                except Exception as error:
                    raise _unwrap(ray, error) from None
                idle.append(actor)
                yield candidate, score

    def fingerprint(self, candidate) -> Dict[str, str]:
        if not self.actors:
            self._start()
        return self.ray.get(self.actors[0].fingerprint.remote(candidate))

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # already gone with its cluster
                pass
        self.actors = []
        if self._started_cluster:
            self.ray.shutdown()
            self._started_cluster = False
