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


@pytest.fixture(scope="session")
def fragile_search_table(fragile_config):
    """The table a seeded search of ``fragile_config`` reads: its searched layers x its native formats."""
    from pipeline.sensitivity import build_sensitivity
    from pipeline.sensitivity.seeding import reference_for, table_scope

    scope = table_scope(fragile_config, reference_for(fragile_config).layer_table)
    return build_sensitivity(fragile_config, eval_limit=EVAL_LIMIT, formats=scope.formats, layers=scope.layers,
                             use_cache=False)
