"""Judge the front against the runtime's one-liner (``Backend.peer_artifacts``), on equal terms.

The uniform baselines are the product's own plans; a user's alternative is the runtime's
one-call quantizer (for ONNX Runtime, ``quantize_dynamic``). :func:`build_peers` builds it from
the reference graph the trials start from and scores it on the study's eval set through the same backend session
and metric as every trial; the re-measurement (:mod:`pipeline.search.remeasure`) then times it
interleaved with the front and the baselines, so the report can say by how much the front beats
it (:func:`pipeline.tracking.remeasure.comparison`). A peer that cannot be built or scored is
reported with its error and left out; it never fails the search.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.search.remeasured import PEER_PREFIX, PeerResult  # noqa: F401 - the report type, re-exported

if TYPE_CHECKING:
    from pipeline.evaluation import Evaluator

log = logging.getLogger(__name__)


def build_peers(ev: "Evaluator", out_dir: Path) -> list[PeerResult]:
    """The backend's one-liner artifacts for this model, each scored on the eval set (cached per folder)."""
    from pipeline.data_check import onnx_input_specs
    from pipeline.measure import run_dataset, task_metric
    from pipeline.metrics import accuracy_drop

    cfg = ev.config
    try:
        # The reference graph the trials start from (the export after ``export.optimize``'s standard-op
        # passes, which ORT's docs recommend before quantize_dynamic): on a worker it comes from the search's
        # reference bundle, so the user's model code is not run again there.
        built = ev.backend.peer_artifacts(ev.reference.onnx_path, out_dir)
    except Exception as exc:  # noqa: BLE001 - the comparison is extra; the search's own results stand
        log.warning("could not build the runtime's one-liner to compare with: %s: %s", type(exc).__name__, exc)
        return [PeerResult(label="one-liner", error=f"{type(exc).__name__}: {exc}")]
    out = []
    for label, path in built.items():
        try:
            session = ev.backend.open(path, cfg.measure.threads)
            outputs = run_dataset(session, ev.eval_set, cfg.measure.eval_batch, input_specs=onnx_input_specs(path))
            acc = task_metric(cfg, outputs, ev.eval_set.targets)
            ref = ev.reference_accuracy
            drop = accuracy_drop(ref, acc, cfg.metric.higher_is_better)
            budget = cfg.search.max_accuracy_drop
            out.append(PeerResult(label=label, artifact=path, accuracy=acc, reference_accuracy=ref, accuracy_drop=drop,
                                  size_bytes=os.path.getsize(path), max_accuracy_drop=budget,
                                  feasible=drop <= budget + 1e-12))
        except Exception as exc:  # noqa: BLE001
            out.append(PeerResult(label=label, artifact=path, error=f"{type(exc).__name__}: {exc}"))
    return out
