"""A search recorded in MLflow: the runner handed the tracker (writer) and the review (finisher).

This is the wiring of the layers, done once for every caller (``precision-search search``, the
Python API): pipeline.search never imports tracking; tracking hands itself to the runner.
"""

from __future__ import annotations

from pipeline.search.runner import SearchOptions, SearchSummary
from pipeline.search.runner import run_search as run_study
from pipeline.tracking.record import StudyTracker
from pipeline.tracking.remeasure import remeasure_finisher
from pipeline.tracking.review import review_finisher


def run_search(config, opts: SearchOptions | None = None) -> SearchSummary:
    """Run (or resume) a study until it holds ``opts.trials`` finished trials, with its MLflow record
    and, at the end, the interleaved re-measurement of the front and the baselines
    (:mod:`pipeline.tracking.remeasure`) and the review on the parent run."""
    import os

    from pipeline.urls import check_separate_stores

    opts = opts or SearchOptions()
    check_separate_stores(opts.storage or os.environ.get("PRECISION_SEARCH_STORAGE"),
                          opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    return run_study(config, opts, recorder=StudyTracker.factory(config, opts.tracking_uri),
                     # the re-measurement first: the review then reads the final front
                     finishers=(remeasure_finisher(config), review_finisher(config)))
