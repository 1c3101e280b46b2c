"""Shared fixtures: configs for the bundled examples with a per-test workdir.

Trained example weights are cached once per machine (PRECISION_SEARCH_CACHE),
so only the first test that needs a digits model pays the few seconds of training.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _config(preset: str, workdir: Path, **overrides):
    from pipeline.config import load_config

    base = {
        "workdir": str(workdir),
        "measure.runs": 5,
        "measure.warmup": 1,
        "measure.energy.min_seconds": 0.05,
        "measure.energy.repeats": 1,
        # The interleaved re-measurement after a search is tested in tests/pipeline/*/test_remeasure.py;
        # elsewhere the front is the in-search one (what those tests check) and searches stay fast.
        "measure.remeasure_rounds": 0,
        # Sensitivity seeding (default auto) is tested in tests/pipeline/sensitivity and
        # tests/pipeline/search/test_seeded_search.py; elsewhere trial counts stay what the tests set.
        "search.sensitivity.seed": False,
    }
    base.update(overrides)
    return load_config(ROOT / "search_spaces" / preset, overrides=base)


@pytest.fixture
def make_config(tmp_path):
    """make_config('digits_mlp.yaml', **{'search.trials': 3}) -> SearchConfig in a temp workdir."""
    return lambda preset, **kw: _config(preset, tmp_path / "work", **kw)


@pytest.fixture(scope="session")
def shared_workdir(tmp_path_factory) -> Path:
    """One workdir for tests that only read the FP32 reference (export once per session)."""
    return tmp_path_factory.mktemp("shared-work")


@pytest.fixture(scope="session")
def mlp_config(shared_workdir):
    return _config("digits_mlp.yaml", shared_workdir)


@pytest.fixture(scope="session")
def cnn_config(shared_workdir):
    return _config("digits_cnn.yaml", shared_workdir)


@pytest.fixture(scope="session")
def encoder_config(shared_workdir):
    return _config("tiny_encoder.yaml", shared_workdir)


# A search small enough for tests that need a finished, re-measured study (search and tracking re-measurement tests).
TINY_REMEASURE = {
    "search.formats": ["fp32", "int8", "int4"],
    "search.int8_activations": ["dynamic"],
    "search.calibrations": ["minmax"],
    "search.int4_block_sizes": [32],
    "search.max_accuracy_drop": 0.02,
    "measure.remeasure_rounds": 3,
}
