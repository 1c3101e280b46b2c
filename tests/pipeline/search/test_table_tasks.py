"""The sensitivity table's candidates as Ray tasks (pipeline.search.table_tasks): the same cells as on the driver."""

from __future__ import annotations

import time

import pytest

from pipeline.formats import Format
from pipeline.search.ray_exec import Resources
from pipeline.search.table_tasks import RayUnits
from pipeline.sensitivity.measure import UnitJob, evaluator_class, plan_knobs, serial_units, subset_config
from tests.pipeline.search.conftest import local_ray


@pytest.fixture(scope="module")
def ray_here():
    with local_ray(2):
        yield


@pytest.mark.slow
def test_ray_tasks_measure_what_the_driver_measures_and_start_nothing_after_the_deadline(ray_here, make_config,
                                                                                          tmp_path):
    cfg = make_config("digits_mlp.yaml")
    sub = subset_config(cfg, 200)
    ev = evaluator_class()(sub)
    names = ev.reference.layer_table.names
    knobs = plan_knobs(cfg)
    jobs = [UnitJob(0, names[0], [names[0]], Format.INT8), UnitJob(1, "g", names[1:3], Format.INT4),
            UnitJob(2, names[-1], [names[-1]], Format.INT4), UnitJob(3, "nope", ["nope"], Format.INT8)]
    units = RayUnits(sub, ev.reference, Resources(cpus=1.0, gpus=0.0, capacity=2, where="test"), parallel=2)
    got = {job.index: cells for job, cells in units(jobs, knobs, None)}
    here = {job.index: cells for job, cells in serial_units(ev, tmp_path)(jobs, knobs, None)}
    assert set(got) == set(here) == {0, 1, 2, 3}
    for i in range(3):
        assert [(c.layer, c.format, c.group) for c in got[i]] == [(c.layer, c.format, c.group) for c in here[i]]
        assert [c.drop for c in got[i]] == pytest.approx([c.drop for c in here[i]], abs=1e-9)
        assert all(c.error is None and c.accuracy is not None for c in got[i])
    assert len(got[1]) == 2 and {c.group for c in got[1]} == {"g"} and got[1][0].group_drop is not None
    assert got[3][0].error and got[3][0].drop is None  # a candidate that cannot be built is a finding, not a crash
    assert list(units(jobs, knobs, time.monotonic() - 1)) == []  # past the deadline: nothing starts
