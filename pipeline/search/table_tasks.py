"""The sensitivity table's candidates as Ray tasks, over the same workers as the trials.

Why: the table is measured before the first trial (it decides the seeds and the pruned formats), so
measured on the driver alone it leaves every other worker idle: on a cluster of N nodes the search
waits N times longer than it needs to. Each candidate here is one Ray task with the trials' resources
and placement (``SPREAD``, retried if its worker dies); the workers get the subset config's reference
and eval rows through the object store once (:mod:`pipeline.search.payload`), as trials do, and
measure with :func:`pipeline.sensitivity.measure.measure_unit`, the function ``make sensitivity`` runs
in-process. Results are cached by the driver as they arrive, so a deadline or a Ctrl-C loses only the
candidates still in flight.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import SearchConfig
from pipeline.sensitivity.measure import UnitJob
from pipeline.sensitivity.table import Cell


def measure_unit_task(config: dict[str, Any], base_dir: str, cwd: str, shared: list | None, unit: str,
                      members: list[str], fmt: str, knobs: dict) -> list[dict[str, Any]]:
    """One candidate on a worker; returns its cells as plain dicts. A candidate that cannot be built is a
    cell with its error (a finding, as in-process), never an exception."""
    from pipeline.formats import Format
    from pipeline.search.worker import evaluator_for
    from pipeline.sensitivity.measure import measure_unit

    if cwd and Path(cwd).is_dir() and os.getcwd() != cwd:
        os.chdir(cwd)
    ev = evaluator_for(config, base_dir, cwd, "sensitivity table config", shared)
    out = Path(tempfile.mkdtemp(prefix="sensitivity-"))  # node-local: removed by measure_unit
    cells = measure_unit(ev, unit, members, Format(fmt), knobs, out)
    return [c.model_dump(mode="json") for c in cells]


class RayUnits:
    """A :data:`pipeline.sensitivity.measure.UnitsRunner` that keeps ``parallel`` candidates in flight on Ray."""

    def __init__(self, sub_config: SearchConfig, reference, res, parallel: int, cwd: str | None = None):
        import ray

        from pipeline.search import payload
        from pipeline.search.ray_exec import MAX_RETRIES, SCHEDULING

        cfg = sub_config.model_dump(mode="json")
        cfg["measure"]["threads"] = int(res.cpus)  # ORT threads = CPUs the task holds, as for trials
        cfg["workdir"] = str(sub_config.work_root)
        self.config, self.base_dir = cfg, str(sub_config.base_dir.resolve())
        self.cwd = cwd or os.getcwd()
        self.parallel = max(1, parallel)
        # Nested in a list so Ray passes the reference as is; a worker fetches the bundle once per config.
        self.shared = [ray.put(payload.build_shared(sub_config, reference))]
        self.remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(measure_unit_task).options(
            num_cpus=res.cpus, num_gpus=res.gpus, scheduling_strategy=SCHEDULING)

    def __call__(self, jobs: list[UnitJob], knobs: dict, deadline: float | None) -> Iterator[tuple[UnitJob, list[Cell]]]:
        import ray

        pending, in_flight = list(jobs), {}
        try:
            while pending or in_flight:
                while pending and len(in_flight) < self.parallel and (deadline is None or time.monotonic() < deadline):
                    job = pending.pop(0)
                    ref = self.remote.remote(self.config, self.base_dir, self.cwd, self.shared, job.unit,
                                             job.members, job.fmt.value, dict(knobs))
                    in_flight[ref] = job
                if not in_flight:
                    return  # the deadline passed: the rest stays unmeasured (TableIncomplete)
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = in_flight.pop(ref)
                    yield job, self._collect(ref, job)
        finally:
            for ref in in_flight:  # interrupted: nothing in flight is waited for
                ray.cancel(ref, force=True)

    @staticmethod
    def _collect(ref, job: UnitJob) -> list[Cell]:
        import ray

        try:
            return [Cell.model_validate(c) for c in ray.get(ref)]
        except ray.exceptions.RayError as exc:  # its worker died MAX_RETRIES + 1 times
            first = (str(exc).strip().splitlines() or [""])[0]
            error = f"the Ray task failed: {type(exc).__name__}: {first}"[:300]
            group = job.unit if len(job.members) > 1 else None
            return [Cell(layer=m, format=job.fmt, error=error, group=group) for m in job.members]


def ray_units_for(config: SearchConfig, opts, sub_config: SearchConfig, reference, say=None
                  ) -> tuple[RayUnits | None, bool]:
    """For the search driver: start (or join) Ray now, early, and return Ray tasks for the table when the
    search runs several trials at once, else None (one by one on the driver: a single worker gains nothing
    from a second process). Also returns whether this call started Ray (the driver shuts it down at the end)."""
    from pipeline.search import ray_exec

    started = ray_exec.ray_init(opts.ray_address, opts.verbose, config)
    res = ray_exec.cluster_resources(config, opts.parallel)
    parallel = max(1, opts.parallel or res.capacity)
    if parallel == 1:
        return None, started
    if say is not None:
        say(f"sensitivity table: {parallel} candidates at a time on Ray ({res.where})")
    return RayUnits(sub_config, reference, res, parallel), started
