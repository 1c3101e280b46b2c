import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.energy.estimate import DEFAULT_WATTS_PER_BUSY_CPU, CpuTimeEstimateMeter


class Clock:
    """A CPU-seconds source the test advances by hand (the arithmetic, not the OS, is under test)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_energy_is_cpu_seconds_times_watts():
    clock = Clock()
    meter = CpuTimeEstimateMeter(12.5, cpu_seconds=clock)
    e0 = meter.read_joules()
    clock.t += 2.0  # two CPU-seconds: e.g. 1 s of wall time on 2 busy cores
    assert meter.read_joules() - e0 == pytest.approx(25.0)
    assert meter.source == "estimated"
    assert "12.5 W per busy CPU" in meter.description and "measure.energy.watts_per_cpu" in meter.description


def test_default_watts_are_documented():
    meter = CpuTimeEstimateMeter()
    assert meter.watts_per_busy_cpu == DEFAULT_WATTS_PER_BUSY_CPU == 3.5
    assert "Cloud Carbon Footprint" in meter.description
    assert "idle" in meter.idle_handling and "excluded" in meter.idle_handling
    assert meter.measure_idle_power(0.01) is None  # no idle baseline can be observed


def test_real_process_cpu_time_is_counted():
    meter = CpuTimeEstimateMeter(10.0)
    a = np.random.default_rng(0).standard_normal((200, 200))
    e0, c0 = meter.read_joules(), time.process_time()
    t0 = time.perf_counter()
    # Work until 0.1 CPU-seconds are used (the machine may be shared: wall time says little).
    while time.process_time() - c0 < 0.1 and time.perf_counter() - t0 < 10:
        a = np.tanh(a @ a.T / 200)
    joules, cpu = meter.read_joules() - e0, time.process_time() - c0
    assert cpu >= 0.1
    assert joules == pytest.approx(10.0 * cpu, rel=0.05)


def test_sleeping_costs_almost_nothing():
    # In a fresh process: here, BLAS worker threads left spinning by other tests would (rightly) count.
    code = (
        "import time; from pipeline.energy.estimate import CpuTimeEstimateMeter as M; m = M(10.0); "
        "e = m.read_joules(); time.sleep(0.3); print(m.read_joules() - e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3])
    assert 0 <= float(out.stdout) < 10.0 * 0.3 * 0.05  # under 5% of one busy CPU over the sleep


@pytest.mark.parametrize("bad", [0.0, -3.0])
def test_bad_watts_name_the_field(bad):
    with pytest.raises(ValueError, match="watts_per_cpu"):
        CpuTimeEstimateMeter(bad)
