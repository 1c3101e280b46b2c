"""Meter selection: auto picks NVML for GPU backends when it works, else RAPL when readable,
else the estimate; an explicit choice that cannot work is an error naming the fix."""

import pytest

from pipeline.backends.ort.cpu import OrtCpuBackend
from pipeline.backends.ort.cuda import OrtCudaBackend
from pipeline.backends.tensorrt.plugin import TensorRTBackend
from pipeline.config import EnergySpec
from pipeline.energy import MeterUnavailable, nvml_status, rapl_status, select_meter
from tests.pipeline.energy.test_rapl import zone

NVML_OK, NVML_WHY = nvml_status()


def test_auto_on_cpu_backend_without_rapl_estimates_and_says_why(tmp_path):
    meter = select_meter(EnergySpec(), OrtCpuBackend(), powercap_root=tmp_path / "none")
    assert meter.source == "estimated"
    assert "RAPL is not readable" in meter.description
    assert "host CPU only" not in meter.description  # a CPU backend's energy is the CPU's


def test_auto_on_cpu_backend_prefers_readable_rapl(tmp_path):
    zone(tmp_path, "intel-rapl:0", "package-0", 123)
    meter = select_meter(EnergySpec(), OrtCpuBackend(), powercap_root=tmp_path)
    assert meter.source == "rapl"


def test_auto_never_uses_nvml_for_a_cpu_backend(tmp_path):
    meter = select_meter(EnergySpec(), OrtCpuBackend(), powercap_root=tmp_path / "none")
    assert meter.source != "nvml"


@pytest.mark.parametrize("backend", [OrtCudaBackend(), TensorRTBackend()], ids=lambda b: b.name)
def test_auto_on_gpu_backend(backend, tmp_path):
    meter = select_meter(EnergySpec(), backend, powercap_root=tmp_path / "none")
    if NVML_OK:
        assert meter.source == "nvml"
    else:
        # Falls back, and the description says the GPU is not in the number, and why.
        assert meter.source == "estimated"
        assert meter.description.startswith("host CPU only; GPU energy not included (NVML unavailable:")
        assert NVML_WHY.split(":")[0] in meter.description


def test_explicit_nvml_that_cannot_work_raises_with_the_fix():
    if NVML_OK:
        pytest.skip(f"NVML works here ({NVML_WHY})")
    with pytest.raises(MeterUnavailable, match="meter is 'nvml'") as err:
        select_meter(EnergySpec(meter="nvml"), OrtCudaBackend())
    msg = str(err.value)
    assert "pip install" in msg or "NVML could not start" in msg or "energy counter" in msg
    assert "meter: auto" in msg


def test_explicit_rapl_that_cannot_work_raises(tmp_path):
    with pytest.raises(MeterUnavailable, match="meter is 'rapl'.*does not exist"):
        select_meter(EnergySpec(meter="rapl"), OrtCpuBackend(), powercap_root=tmp_path / "none")


def test_explicit_rapl_for_a_gpu_backend_is_labelled_host_only(tmp_path):
    zone(tmp_path, "intel-rapl:0", "package-0", 1)
    meter = select_meter(EnergySpec(meter="rapl"), OrtCudaBackend(), powercap_root=tmp_path)
    assert meter.source == "rapl" and meter.description.startswith("host CPU only")


def test_explicit_estimate_uses_the_configured_watts():
    meter = select_meter(EnergySpec(meter="estimated", watts_per_cpu=7.0), OrtCpuBackend())
    assert meter.source == "estimated" and meter.watts_per_busy_cpu == 7.0


def test_this_machine():
    """On this machine: whatever is here, the meter is named and its source is one of the three."""
    meter = select_meter(EnergySpec(), OrtCpuBackend())
    assert meter.source in ("rapl", "estimated")
    assert (meter.source == "rapl") == rapl_status()[0]
