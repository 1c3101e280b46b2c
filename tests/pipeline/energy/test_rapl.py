"""RAPL through powercap. No machine here exposes it, so the tests lay out the sysfs files
the kernel would (same names and formats) in a temporary folder and point the meter at it."""

from pathlib import Path

import pytest

from pipeline.energy.base import MeterUnavailable
from pipeline.energy.rapl import RaplMeter, find_package_domains, rapl_status


def zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 262143328850) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def set_energy(z: Path, uj: int) -> None:
    (z / "energy_uj").write_text(f"{uj}\n")


def test_sums_packages_and_ignores_subzones_and_psys(tmp_path):
    p0 = zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    p1 = zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    core = zone(tmp_path, "intel-rapl:0:0", "core", 700_000)
    psys = zone(tmp_path, "intel-rapl:2", "psys", 9_000_000)
    meter = RaplMeter(tmp_path)
    assert [d.name for d in meter.domains] == ["package-0", "package-1"]
    e0 = meter.read_joules()
    set_energy(p0, 3_000_000)  # +2 J
    set_energy(p1, 5_500_000)  # +0.5 J
    set_energy(core, 1_700_000)  # inside package-0 already: must not be added
    set_energy(psys, 99_000_000)  # platform, not CPU package
    assert meter.read_joules() - e0 == pytest.approx(2.5)
    assert meter.source == "rapl" and "package-0, package-1" in meter.description


def test_counter_wraparound(tmp_path):
    z = zone(tmp_path, "intel-rapl:0", "package-0", 999_000, max_uj=1_000_000)
    meter = RaplMeter(tmp_path)
    e0 = meter.read_joules()
    set_energy(z, 4_000)  # wrapped: 1_000 to the top, then 4_000 more
    assert meter.read_joules() - e0 == pytest.approx(0.005)
    set_energy(z, 10_000)
    assert meter.read_joules() - e0 == pytest.approx(0.011)


def test_unavailable_reasons(tmp_path):
    ok, why = rapl_status(tmp_path / "missing")
    assert not ok and "does not exist" in why
    (tmp_path / "empty").mkdir()
    ok, why = rapl_status(tmp_path / "empty")
    assert not ok and "no RAPL zones" in why
    zone(tmp_path / "dram-only", "intel-rapl:0", "psys", 1)
    domains, why = find_package_domains(tmp_path / "dram-only")
    assert domains == [] and "no package-level RAPL zone" in why
    with pytest.raises(MeterUnavailable, match="RAPL is not readable"):
        RaplMeter(tmp_path / "missing")


def test_this_machine_reports_a_reason_when_rapl_is_absent():
    ok, why = rapl_status()
    assert ok or why  # either readable, or a sentence saying why not
