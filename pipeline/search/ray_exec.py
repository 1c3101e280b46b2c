"""Ray for the search: start or join a cluster, size trials, dispatch them and collect their outcomes.

The driver keeps ``parallel`` trials in flight; each is one Ray task running
:func:`pipeline.search.worker.run_trial`, placed with Ray's ``SPREAD`` strategy so
trials go round-robin over the nodes instead of filling the driver's node first.
Every task gets the study's shared reference bundle (:mod:`pipeline.search.payload`)
as one object-store reference, so no worker rebuilds the reference or reads the
driver's disk.

Failures: a worker process or node that dies mid-trial (OOM killer, segfault, a
lost node) is a *system* failure, and Ray re-runs the task elsewhere, up to
:data:`MAX_RETRIES` times; the attempt that finished is recorded with the trial. A
trial that still fails, or is cancelled, comes back as a failed
:class:`TrialOutcome` with Ray's reason, so the study records it and goes on.
Errors raised by the trial itself are never retried (the worker turns them into a
failed outcome; a bad candidate stays bad).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pipeline.backends.registry import AUTO, needs_gpu
from pipeline.config import ConfigError, SearchConfig
from pipeline.search import payload
from pipeline.search.worker import (  # noqa: F401 - A_*: the placement attribute names, re-exported
    A_ATTEMPT, A_HOSTNAME, A_NODE_ID, TrialOutcome, TrialTask, run_trial, warm_worker,
)

MAX_RETRIES = 2  # re-runs of a trial whose worker or node died (Ray's system-failure retries)
SCHEDULING = "SPREAD"  # trials round-robin over the nodes (Ray's default packs the driver's node first)


@dataclass
class Resources:
    cpus: float
    gpus: float
    capacity: int  # trials the cluster runs at once
    where: str
    # Trials kept waiting in Ray's queue beyond ``capacity`` (one per node): a node that finishes a trial
    # starts the next at once instead of idling while the driver records the last result and asks Optuna.
    queued: int = 0


def ray_init(address: str | None, verbose: bool, config: SearchConfig | None = None) -> bool:
    """Connect to ``address``/RAY_ADDRESS or start a quiet local Ray; True if this call started it.

    Quiet: workers' output is not forwarded (``log_to_driver``) and Ray's own
    logger is at WARNING unless ``verbose``. On a cluster the project's packages and
    the config's own package (:func:`pipeline.search.payload.user_code`) are shipped
    with ``runtime_env`` ``py_modules``; installed dependencies must exist on the nodes.
    """
    import ray

    if ray.is_initialized():
        return False
    _route_raylet_messages(verbose)
    with _keeping_sigterm():
        _init(ray, address, verbose, config)
    return True


@contextlib.contextmanager
def _keeping_sigterm():
    """Keep the driver's SIGTERM handler across ``ray.init``: Ray installs its own, which exits through the
    core worker's fatal-signal dump (exit 134, no clean-up), so the search's SIGTERM -> KeyboardInterrupt
    path (:func:`pipeline.search.runner.run_search`: in-flight trials orphaned and re-queued, MLflow closed)
    would never run."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM")
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def _init(ray, address: str | None, verbose: bool, config: SearchConfig | None) -> None:
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    user = payload.user_code(config) if config is not None else []
    if address:
        ray.init(address=address, runtime_env={"py_modules": payload.project_code() + user,
                                               "excludes": payload.SHIP_EXCLUDES}, **quiet)
    else:
        # address="local" always starts a new single-node Ray for this process: a plain ray.init() would
        # attach to whatever cluster already runs on this host (another user's, or `make cluster-up`'s).
        env = {"py_modules": user, "excludes": payload.SHIP_EXCLUDES} if user else None
        with _loopback_node():
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env, **quiet)


@contextlib.contextmanager
def _loopback_node():
    """A local run's Ray advertises 127.0.0.1, and Ray's note that it turned token authentication on is not shown.

    On Linux Ray replaces a loopback ``node_ip_address`` by the machine's routable address (it expects other
    nodes to join); its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the default on macOS and
    Windows) advertises 127.0.0.1 instead, so no other host is told where this Ray is. The GCS, raylet, object
    manager and worker gRPC servers still listen on ports Ray picks, on the interfaces Ray binds them to,
    which is why token authentication stays on: Ray 2.60 enables it for a new local cluster (and says so in a
    warning, filtered here: it is the default, not a problem). The processes Ray starts inherit the
    environment at ``ray.init``; the driver's is restored afterwards.
    """
    from ray._private import ray_constants

    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def default_auth_note(record: logging.LogRecord) -> bool:
        return "Token authentication is enabled for this Ray cluster" not in record.getMessage()

    auth_log.addFilter(default_auth_note)
    try:
        yield
    finally:
        auth_log.removeFilter(default_auth_note)
        if flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = flag
        if saved is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved


def _route_raylet_messages(verbose: bool) -> None:
    """Unless ``verbose``, the "(raylet) ..." lines Ray prints on the driver go to the ``ray.raylet`` logger.

    Ray's driver prints every error the cluster publishes ("Task run_trial failed. There are 2 retries
    remaining", "A worker died or was killed ...") straight to stdout, whatever ``log_to_driver`` says. The
    search records each of those outcomes itself (the trial's fail reason, its ``ray_attempt``), so in
    --no-progress logs they are noise. Ray has no switch for it: the module-level printer its listener thread
    calls is wrapped (Ray's private API; if it moves, the lines are simply printed as before).
    """
    if verbose:
        return
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_routed", False):
        return
    raylet_log = logging.getLogger("ray.raylet")

    def routed(data, ignore_prefix, *args, **kwargs):
        if isinstance(data, dict) and data.get("pid") == "raylet":
            for line in data.get("lines", []):
                raylet_log.info("%s", line)
            return None
        return original(data, ignore_prefix, *args, **kwargs)

    routed._routed = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = routed


def shutdown() -> None:
    import ray

    _SHARED.clear()  # object references die with the Ray session
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
        return Resources(cpus, 1.0, gpus, f"{len(alive)} node(s), {gpus} GPU(s): 1 GPU per trial",
                         queued=max(1, len(alive)))
    if config.measure.threads:
        cpus = min(config.measure.threads, node_cpus)
    elif parallel:
        cpus = max(1, min(node_cpus, int(total.get("CPU", 1)) // parallel))
    else:
        cpus = node_cpus  # threads: 0 means "all cores": one trial per node, measured alone
    capacity = max(1, sum(int(n["Resources"]["CPU"]) // cpus for n in alive))
    return Resources(float(cpus), 0.0, capacity,
                     f"{len(alive)} node(s), {int(total.get('CPU', 0))} CPU(s): {cpus} CPU(s)/ORT thread(s) per trial",
                     queued=max(1, len(alive)))


def driver_node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def warm(n: int, res: Resources, config: dict[str, Any], base_dir: str, cwd: str) -> list:
    """Start ``n`` workers (spread over the nodes) importing the runtimes and the config's modules; their
    results are not needed."""
    import ray

    return [ray.remote(max_retries=0)(warm_worker)
            .options(num_cpus=res.cpus, num_gpus=res.gpus, scheduling_strategy=SCHEDULING)
            .remote(config, base_dir, cwd) for _ in range(n)]


_SHARED: dict[str, Any] = {}  # shared_key(config) -> the bundle's ObjectRef, for this Ray session


def shared_key(config: SearchConfig) -> str:
    import hashlib

    return hashlib.sha256(f"{config.model_dump_json()}|{config.base_dir}".encode()).hexdigest()[:16]


def share(config: SearchConfig, reference) -> Any:
    """Build the study's reference bundle on the driver and put it in Ray's object store once; what runs
    later in this Ray session for the same config (the re-measurement) finds it with :func:`shared_for`."""
    import ray

    ref = ray.put(payload.build_shared(config, reference))
    _SHARED[shared_key(config)] = ref
    return ref


def shared_for(config: SearchConfig) -> Any:
    """The bundle :func:`share` put for ``config`` in the running Ray session, or None."""
    import ray

    return _SHARED.get(shared_key(config)) if ray.is_initialized() else None


def record_placement(trial, outcome: TrialOutcome) -> dict[str, str]:
    """Where the trial ran, as Optuna user attributes on ``trial``; returns them (for the MLflow tags)."""
    placed = outcome.placement()
    for key, value in placed.items():
        trial.set_user_attr(key, value)
    return placed


class Dispatcher:
    """Submits trials as Ray tasks and turns what comes back (or Ray's error) into a :class:`TrialOutcome`."""

    def __init__(self, res: Resources, shared: Any = None):
        import ray

        self.res = res
        # Nested in a list, the reference is passed as is (not fetched by Ray before every task): a worker
        # fetches the bundle once and keeps it (pipeline.search.worker).
        self._shared = [shared] if shared is not None else None
        # retry_exceptions=False: only system failures (a dead worker or node) are retried.
        self._remote = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False)(run_trial)

    def submit(self, task: TrialTask, name: str):
        return self._remote.options(num_cpus=self.res.cpus, num_gpus=self.res.gpus, name=name,
                                    scheduling_strategy=SCHEDULING).remote(task.model_dump(), self._shared)

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
        except ray.exceptions.RayError as exc:  # died MAX_RETRIES + 1 times, or the task was cancelled
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            tries = "" if isinstance(exc, ray.exceptions.TaskCancelledError) else \
                f" (after {MAX_RETRIES} retries of system failures)"
            return TrialOutcome(number=number, status="fail",
                                reason=f"the Ray task failed{tries}: {type(exc).__name__}: {first}",
                                seconds=time.monotonic() - t0)


def cancel(ref) -> None:
    import ray

    try:
        ray.cancel(ref, force=True)
    except Exception:  # noqa: BLE001
        pass
