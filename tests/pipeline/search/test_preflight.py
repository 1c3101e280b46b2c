"""The checks the driver runs before Ray: batch memory, storage files and drivers, the worker-death test."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError


def test_batch_memory_is_refused_with_the_field_and_a_size_that_fits(mlp_config):
    from pipeline.search.preflight import batch_bytes, check_batch_memory

    rows = {"x": np.zeros((10, 64), dtype=np.float32)}
    assert batch_bytes(rows, 100) == 100 * 64 * 4
    cfg = mlp_config.model_copy(update={"measure": mlp_config.measure.model_copy(update={"batch_size": 10**8})})
    with pytest.raises(ConfigError, match=r"measure\.batch_size: 100000000 rows need about .* GiB .* use at most"):
        check_batch_memory(cfg, rows, parallel=2, available=8 * 2**30)
    check_batch_memory(mlp_config, rows, parallel=2, available=8 * 2**30)  # 64 rows fit


def test_storage_files_are_checked_before_optuna_opens_them(tmp_path):
    import optuna

    from pipeline.search.storage import check_optuna_storage

    fresh = f"sqlite:///{tmp_path / 'new.db'}"
    assert check_optuna_storage(fresh) == fresh  # not there yet: Optuna creates it
    optuna.create_study(study_name="s", storage=fresh)
    assert check_optuna_storage(fresh) == fresh
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty.db is empty"):
        check_optuna_storage(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConfigError, match="needs the Python driver"):
        check_optuna_storage("mysql://u:pw@localhost/x")


def test_only_worker_deaths_are_retried():
    from pipeline.search.retries import is_system_failure

    assert is_system_failure("the Ray task failed: WorkerCrashedError: The worker died unexpectedly")
    assert is_system_failure("the Ray task failed: OutOfMemoryError: Task was killed due to the node running low")
    assert not is_system_failure("the Ray task failed: TaskCancelledError: cancelled")
    assert not is_system_failure("quantization failed: ValueError: bad block size")


def test_spool_counts_and_clears(tmp_path):
    from pipeline.search.spool import Spool

    sp = Spool(tmp_path, probe_every_s=0.0)
    assert sp.pending() == 0 and not sp.probe_due()
    sp.open_circuit()
    sp.add("finish_trial", "Connection refused")
    sp.add("update_front")
    assert sp.down and sp.pending() == 2 and sp.probe_due()
    sp.clear()
    assert not sp.down and sp.pending() == 0 and not sp.path.exists()


def test_the_trials_start_from_the_same_optimized_graph_as_every_evaluator(encoder_config, tmp_path):
    """The reference the search ships to its workers is the export after export.optimize, the file an Evaluator
    (the sensitivity table, `evaluate`, the FP32 accuracy) builds candidates from (it used to ship the raw
    export, so a trial and `evaluate` of one plan quantized different graphs)."""
    import onnx

    from pipeline.evaluation import Evaluator
    from pipeline.search.preflight import export_reference, trial_reference

    cfg = encoder_config.model_copy(deep=True, update={"workdir": str(tmp_path / "w")})
    cfg.base_dir = encoder_config.base_dir
    cfg.export.optimize = "basic"
    raw = export_reference(cfg, cfg.work_path)
    shipped = trial_reference(cfg, raw)
    ev = Evaluator(cfg)
    assert shipped.onnx_path == ev.reference.onnx_path != raw.onnx_path
    assert shipped.layer_table == ev.reference.layer_table
    # ORT's saved graph imports every domain it knows; the ones no node uses are dropped
    used = {n.domain for n in onnx.load(shipped.onnx_path).graph.node} | {""}
    assert {o.domain for o in onnx.load(shipped.onnx_path).opset_import} <= used | {"ai.onnx"}
