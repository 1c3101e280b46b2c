"""Sensitivity tables measured once per test session (each cell is a real ORT candidate)."""

from __future__ import annotations

import pytest

FRAGILE_FACTORY = "tests.pipeline.sensitivity.fragile:fragile_mlp"
EVAL_LIMIT = 200


@pytest.fixture(scope="session")
def fragile_config(shared_workdir):
    from tests.conftest import _config

    return _config("digits_mlp.yaml", shared_workdir / "fragile", **{"model.factory": FRAGILE_FACTORY,
                                                                      "name": "digits-mlp-fragile"})


@pytest.fixture(scope="session")
def fragile_table(fragile_config):
    from pipeline.sensitivity import build_sensitivity

    return build_sensitivity(fragile_config, eval_limit=EVAL_LIMIT, use_cache=False)
