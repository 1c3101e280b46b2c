"""CPU package energy from RAPL through the Linux powercap interface.

Reads ``/sys/class/powercap/intel-rapl:N/energy_uj`` for every top-level zone
whose ``name`` is ``package-N`` (Intel, and AMD Zen since Linux 5.8, which
register under the same ``intel-rapl`` driver). Sub-zones (core, uncore, dram)
are inside the package figure and are not added again; ``psys`` (platform) is
not a CPU package and is skipped.

Counters wrap at ``max_energy_range_uj``; reads are differenced per domain and
a negative step is taken as one wrap. Since Linux 5.10 (CVE-2020-8694) the
files are readable by root only, and VMs/containers usually expose none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.energy.base import EnergyMeter, MeterUnavailable

DEFAULT_POWERCAP = Path("/sys/class/powercap")


@dataclass
class RaplDomain:
    path: Path
    name: str
    max_energy_range_uj: int

    def read_uj(self) -> int:
        return int((self.path / "energy_uj").read_text().strip())


def find_package_domains(root: str | Path = DEFAULT_POWERCAP) -> tuple[list[RaplDomain], str]:
    """Readable package domains under ``root`` and, when there are none, why."""
    root = Path(root)
    if not root.is_dir():
        return [], f"{root} does not exist (no powercap/RAPL interface here: VM, container, or non-Linux)"
    zones = sorted(p for p in root.glob("*-rapl:*") if p.name.count(":") == 1)
    if not zones:
        return [], f"no RAPL zones under {root} (CPU or kernel without RAPL, or not exposed to this VM)"
    found: list[RaplDomain] = []
    problems: list[str] = []
    for zone in zones:
        try:
            name = (zone / "name").read_text().strip()
        except OSError as exc:
            problems.append(f"{zone}/name: {exc.strerror or exc}")
            continue
        if not name.startswith("package"):
            continue
        energy = zone / "energy_uj"
        try:
            int(energy.read_text().strip())
        except PermissionError:
            problems.append(
                f"{energy} is not readable by this user (root-only since Linux 5.10, CVE-2020-8694): "
                f"run as root or `sudo chmod a+r {root}/*/energy_uj`"
            )
            continue
        except (OSError, ValueError) as exc:
            problems.append(f"{energy}: {exc}")
            continue
        try:
            max_range = int((zone / "max_energy_range_uj").read_text().strip())
        except (OSError, ValueError):
            max_range = 0
        found.append(RaplDomain(zone, name, max_range))
    if found:
        return found, ""
    return [], "; ".join(problems) or f"no package-level RAPL zone under {root}"


def rapl_status(root: str | Path = DEFAULT_POWERCAP) -> tuple[bool, str]:
    domains, why = find_package_domains(root)
    return bool(domains), why


class RaplMeter(EnergyMeter):
    """Sum of the package-N energy counters (all sockets)."""

    source = "rapl"
    min_window_s = 0.1  # counters update about every millisecond; 100 ms keeps quantisation < 1 %

    def __init__(self, root: str | Path = DEFAULT_POWERCAP):
        domains, why = find_package_domains(root)
        if not domains:
            raise MeterUnavailable(f"RAPL is not readable: {why}")
        self.domains = domains
        self._last = [d.read_uj() for d in domains]
        self._total_uj = 0
        names = ", ".join(d.name for d in domains)
        self.name = "rapl"
        self.description = f"RAPL {names} ({os.fspath(Path(root))}), CPU package energy"

    def read_joules(self) -> float:
        for i, d in enumerate(self.domains):
            raw = d.read_uj()
            step = raw - self._last[i]
            if step < 0:  # wrapped past max_energy_range_uj
                step += d.max_energy_range_uj
            self._last[i] = raw
            self._total_uj += max(step, 0)
        return self._total_uj / 1e6
