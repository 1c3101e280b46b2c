"""measure_energy: windows, medians, per-inference arithmetic and the EnergyReport it fills."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.backends import get_backend
from pipeline.config import EnergySpec
from pipeline.energy import EnergyMeasurementError, measure_energy, select_meter
from pipeline.energy.carbon import gco2e_per_1m_inferences
from pipeline.energy.estimate import CpuTimeEstimateMeter
from pipeline.energy.rapl import RaplMeter
from tests.pipeline.energy.test_rapl import set_energy, zone

FAST = EnergySpec(min_seconds=0.05, repeats=3)


class CountingPackage:
    """A RAPL package whose counter advances by a fixed amount per batch: exact expected values."""

    def __init__(self, root: Path, uj_per_batch: int):
        self.z = zone(root, "intel-rapl:0", "package-0", 0)
        self.uj = 0
        self.step = uj_per_batch
        self.batches = 0

    def run_batch(self):
        self.uj += self.step
        self.batches += 1
        set_energy(self.z, self.uj)


def test_per_inference_arithmetic_with_a_counter(tmp_path):
    pkg = CountingPackage(tmp_path, uj_per_batch=2_000)  # 2 mJ per batch of 8 -> 0.25 mJ per inference
    meter = RaplMeter(tmp_path)
    syncs = []
    r = measure_energy(meter, pkg.run_batch, batch_size=8, spec=FAST, sync=lambda: syncs.append(1))
    assert r.source == "rapl" and r.meter.startswith("rapl: RAPL package-0")
    assert r.joules_per_inference == pytest.approx(2e-3 / 8)
    assert r.joules_per_1k_inferences == pytest.approx(1000 * r.joules_per_inference)
    assert r.gco2e_per_1m_inferences == pytest.approx(gco2e_per_1m_inferences(r.joules_per_inference, 473.0))
    assert r.grid_intensity_g_per_kwh == 473.0
    assert r.repeats == 3 and r.window_s >= 0.1  # RAPL's own minimum window (0.1 s) beats min_seconds
    assert r.average_power_w > 0
    # Idle: measured (the counter did not move while sleeping -> 0 W), reported, not subtracted.
    assert r.idle_power_w == 0.0 and "not subtracted" in r.idle_handling
    assert len(syncs) >= pkg.batches  # a sync after every batch (plus one before each window)


def test_grid_intensity_comes_from_the_spec(tmp_path):
    pkg = CountingPackage(tmp_path, uj_per_batch=1_000)
    spec = EnergySpec(min_seconds=0.05, repeats=1, grid_intensity_g_per_kwh=100.0)
    r = measure_energy(RaplMeter(tmp_path), pkg.run_batch, 1, spec)
    assert r.grid_intensity_g_per_kwh == 100.0
    assert r.gco2e_per_1m_inferences == pytest.approx(1e-3 * 1e6 / 3.6e6 * 100.0)


def test_a_counter_that_does_not_move_is_an_error_not_a_zero(tmp_path):
    zone(tmp_path, "intel-rapl:0", "package-0", 42)
    with pytest.raises(EnergyMeasurementError, match="did not advance"):
        measure_energy(RaplMeter(tmp_path), lambda: None, 4, FAST)


def test_estimated_energy_of_real_work():
    meter = CpuTimeEstimateMeter(5.0)
    a = np.random.default_rng(0).standard_normal((160, 160)).astype(np.float32)
    spec = EnergySpec(min_seconds=0.1, repeats=3)
    r = measure_energy(meter, lambda: a @ a, batch_size=4, spec=spec)
    assert r.source == "estimated" and r.idle_power_w is None
    assert r.window_s >= 0.1 and r.repeats == 3
    # Average power is busy CPUs x 5 W: above zero, and no more than every CPU of the machine
    # (the lower bound stays loose: other processes may share the cores).
    import os

    assert 0 < r.average_power_w <= 5.0 * (os.cpu_count() or 1) * 1.05
    assert r.joules_per_inference > 0


def test_bad_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        measure_energy(CpuTimeEstimateMeter(), lambda: None, 0, FAST)


def test_end_to_end_on_ort_cpu(tmp_path):
    """The lead's path: select_meter for the backend, then a real ONNX Runtime session."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    backend = get_backend("ort-cpu")
    session = backend.open(path, threads=1)
    feeds = {"x": np.ones((32, 64), np.float32)}
    meter = select_meter(FAST, backend)
    r = measure_energy(meter, lambda: session.run(feeds), 32, FAST, sync=session.synchronize)
    assert r.source == meter.source and r.joules_per_inference > 0
    assert r.meter.startswith(meter.name)
