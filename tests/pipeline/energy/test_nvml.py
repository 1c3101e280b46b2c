"""NVML meter: the failure paths run for real here (pynvml is installed, the NVIDIA driver is not);
the energy counter itself only on GPU machines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.energy import MeterUnavailable, NvmlMeter, nvml_status

ROOT = Path(__file__).resolve().parents[3]


def _nvml_works() -> bool:
    return nvml_status(0)[0]


def test_without_a_driver_the_meter_says_why_and_leaves_nvml_balanced():
    if _nvml_works():
        pytest.skip("NVML works here")
    import pynvml

    before = pynvml._nvmlLib_refcount
    with pytest.raises(MeterUnavailable, match="NVML could not start .*no NVIDIA driver"):
        NvmlMeter(0)
    assert pynvml._nvmlLib_refcount == before
    ok, why = nvml_status(0)
    assert not ok and "NVML could not start" in why


def test_without_nvidia_ml_py_the_error_has_the_install_command():
    code = (
        "import json, sys; sys.modules['pynvml'] = None\n"  # makes `import pynvml` raise ImportError
        "from pipeline.energy.nvml import nvml_status\n"
        "print(json.dumps(nvml_status(0)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    ok, why = json.loads(out.stdout.strip().splitlines()[-1])
    assert not ok and "pip install nvidia-ml-py" in why and "pip install -e '.[gpu]'" in why


@pytest.mark.gpu
def test_energy_counter_reads_millijoules_that_grow():
    if not _nvml_works():
        pytest.skip(f"NVML unavailable: {nvml_status(0)[1]}")
    import time

    meter = NvmlMeter(0)
    try:
        e0 = meter.read_joules()
        time.sleep(1.5)  # the counter updates every 20-100 ms
        e1 = meter.read_joules()
        assert e1 > e0  # an idle GPU still draws tens of watts
        assert 1.0 < (e1 - e0) / 1.5 < 2000.0  # plausible board power in W: mJ were converted to J
        assert 0 < meter.power_w() < 2000.0
    finally:
        meter.close()
