"""Moved (issue 13): pipeline.search.{runner,storage,records,plans,ray_exec,worker}; the MLflow-wired
search is pipeline.tracking.search.run_search. Kept only for pipeline/api.py's import; delete with it."""
from pipeline.search.ray_exec import ray_init
from pipeline.search.runner import SearchOptions, SearchSummary  # noqa: F401
from pipeline.tracking.search import run_search  # noqa: F401


def _ray_init(opts: SearchOptions) -> bool:
    return ray_init(opts.ray_address, opts.verbose)
