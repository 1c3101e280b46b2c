"""Ray for the search: start or join a cluster, size trials, dispatch them and collect their outcomes.

The driver keeps ``parallel`` trials in flight; each is one Ray task running
:func:`pipeline.search.worker.run_trial`. A worker that dies (OOM killer,
segfault) or a cancelled task comes back as a failed :class:`TrialOutcome` with
Ray's reason, so the study records it and goes on.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.backends.registry import AUTO, needs_gpu
from pipeline.config import ConfigError, SearchConfig
from pipeline.search.worker import TrialOutcome, TrialTask, run_trial, warm_worker

@dataclass
class Resources:
    cpus: float
    gpus: float
    capacity: int
    where: str


def ray_init(address: str | None, verbose: bool) -> bool:
    """Connect to ``address``/RAY_ADDRESS or start a quiet local Ray; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        import exporters
        import pipeline
        import search_spaces

        # Ship this checkout's code so workers run what the driver runs (dependencies must be installed there).
        # Folders, not module objects: an editable install can give packages a multi-entry __path__.
        code = [next(str(Path(p).resolve()) for p in m.__path__ if Path(p).is_dir())
                for m in (pipeline, exporters, search_spaces)]
        ray.init(address=address, log_to_driver=verbose, logging_level=logging.WARNING,
                 runtime_env={"py_modules": code})
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.WARNING)
    return True


def shutdown() -> None:
    import ray

    ray.shutdown()


def cluster_resources(config: SearchConfig, parallel: int | None) -> Resources:
    import ray

    return plan_resources(config, parallel, ray.cluster_resources(), ray.nodes())


def plan_resources(config: SearchConfig, parallel: int | None, total: dict[str, float],
                   nodes: list[dict[str, Any]]) -> Resources:
    """CPUs/GPUs per trial and how many trials the cluster holds at once.

    GPU backends (or ``auto`` on a cluster with GPUs): one GPU per trial. CPU
    backends: ``measure.threads`` CPUs per trial (= ORT threads); ``threads: 0``
    means all cores of a node, so each trial is timed alone on its node, unless
    ``--parallel`` asks for more trials at once, which splits the cores.
    """
    gpus = int(total.get("GPU", 0))
    alive = [n for n in nodes if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    node_cpus = min(int(n["Resources"]["CPU"]) for n in alive) if alive else 1
    backend = config.measure.backend
    if (backend != AUTO and needs_gpu(backend)) or (backend == AUTO and gpus > 0):
        if gpus == 0:
            raise ConfigError(f"measure.backend: {backend} needs a GPU, but the Ray cluster has none "
                              "(set RAY_ADDRESS to a GPU cluster, or use backend: ort-cpu)")
        cpus = float(config.measure.threads or 1)
        return Resources(cpus, 1.0, gpus, f"{len(alive)} node(s), {gpus} GPU(s): 1 GPU per trial")
    if config.measure.threads:
        cpus = min(config.measure.threads, node_cpus)
    elif parallel:
        cpus = max(1, min(node_cpus, int(total.get("CPU", 1)) // parallel))
    else:
        cpus = node_cpus  # threads: 0 means "all cores": one trial per node, measured alone
    capacity = max(1, sum(int(n["Resources"]["CPU"]) // cpus for n in alive))
    return Resources(float(cpus), 0.0, capacity,
                     f"{len(alive)} node(s), {int(total.get('CPU', 0))} CPU(s): {cpus} CPU(s)/ORT thread(s) per trial")


def driver_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def warm(n: int, res: Resources, config: dict[str, Any], base_dir: str, cwd: str) -> list:
    """Start ``n`` workers importing the runtimes and loading the datasets; their results are not needed."""
    import ray

    return [ray.remote(max_retries=0)(warm_worker).options(num_cpus=res.cpus, num_gpus=res.gpus)
            .remote(config, base_dir, cwd) for _ in range(n)]


class Dispatcher:
    """Submits trials as Ray tasks and turns what comes back (or Ray's error) into a :class:`TrialOutcome`."""

    def __init__(self, res: Resources):
        import ray

        self.res = res
        self._remote = ray.remote(max_retries=0)(run_trial)

    def submit(self, task: TrialTask, name: str):
        return self._remote.options(num_cpus=self.res.cpus, num_gpus=self.res.gpus, name=name) \
            .remote(task.model_dump())

    @staticmethod
    def wait(refs: list, timeout: float) -> list:
        import ray

        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        return ready

    @staticmethod
    def collect(ref, number: int, t0: float) -> TrialOutcome:
        import ray

        try:
            return TrialOutcome.model_validate(ray.get(ref))
        except ray.exceptions.RayError as exc:  # worker died (OOM killer, segfault) or the task was cancelled
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return TrialOutcome(number=number, status="fail",
                                reason=f"the Ray task failed: {type(exc).__name__}: {first}",
                                seconds=time.monotonic() - t0)


def cancel(ref) -> None:
    import ray

    try:
        ray.cancel(ref, force=True)
    except Exception:  # noqa: BLE001
        pass
