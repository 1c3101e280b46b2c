"""Shared by the search tests: a local Ray their module fixtures start."""

from __future__ import annotations

import contextlib

from tests.conftest import ROOT


@contextlib.contextmanager
def local_ray(num_cpus: int, **env: str):
    """A quiet local Ray with ``num_cpus`` CPUs whose workers can import ``tests.*`` (``env``: more variables
    for the workers' environment)."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **env}})
    try:
        yield
    finally:
        ray.shutdown()
