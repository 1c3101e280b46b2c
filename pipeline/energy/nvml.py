"""NVIDIA GPU energy from NVML's total-energy counter (nvidia-ml-py, module ``pynvml``).

``nvmlDeviceGetTotalEnergyConsumption`` returns the board's energy in
millijoules since the driver was loaded (Volta and newer). The counter is
updated every 20-100 ms, so a window shorter than about a second is mostly
quantisation: :attr:`NvmlMeter.min_window_s` is 1 s and measure_energy never
goes below it.

The GPU is the one the backend runs on. NVML enumerates GPUs in PCI order while
CUDA, by default, orders them fastest-first and honours ``CUDA_VISIBLE_DEVICES``;
the mapping below resolves the CUDA device to an NVML handle by UUID when it can
(CUDA_VISIBLE_DEVICES given as UUIDs, or torch already initialised CUDA), else
by index (right when CUDA_DEVICE_ORDER=PCI_BUS_ID or all GPUs are identical).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pipeline.energy.base import EnergyMeter, MeterUnavailable

INSTALL_HINT = "pip install -e '.[gpu]'  (or just: pip install nvidia-ml-py)"


def _import_pynvml() -> Any:
    try:
        import pynvml  # provided by the nvidia-ml-py distribution
    except ImportError:
        raise MeterUnavailable(f"NVML bindings are not installed: {INSTALL_HINT}") from None
    if not hasattr(pynvml, "nvmlDeviceGetTotalEnergyConsumption"):
        raise MeterUnavailable(
            f"the installed `pynvml` module has no nvmlDeviceGetTotalEnergyConsumption; "
            f"install NVIDIA's bindings: {INSTALL_HINT}"
        )
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _handle_for_cuda_device(pynvml: Any, cuda_index: int) -> tuple[Any, str]:
    """NVML handle for CUDA device ``cuda_index`` and how it was matched."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    entries = [e.strip() for e in visible.split(",") if e.strip()] if visible else []
    if entries:
        if cuda_index >= len(entries):
            raise MeterUnavailable(
                f"CUDA device {cuda_index} is not among CUDA_VISIBLE_DEVICES={visible!r}"
            )
        entry = entries[cuda_index]
        if entry.startswith(("GPU-", "MIG-")):
            return pynvml.nvmlDeviceGetHandleByUUID(entry), f"by UUID {entry}"
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry)), f"NVML index {entry} (CUDA_VISIBLE_DEVICES)"
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_initialized():
                uuid = "GPU-" + str(torch.cuda.get_device_properties(cuda_index).uuid)
                return pynvml.nvmlDeviceGetHandleByUUID(uuid), f"by UUID {uuid} (from torch)"
        except Exception:  # noqa: BLE001 - fall back to the index mapping below
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index), f"NVML index {cuda_index} (assumed = CUDA index)"


class NvmlMeter(EnergyMeter):
    """Board energy of one NVIDIA GPU."""

    source = "nvml"
    min_window_s = 1.0

    def __init__(self, cuda_device: int = 0):
        pynvml = _import_pynvml()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise MeterUnavailable(
                f"NVML could not start ({exc}): no NVIDIA driver on this machine, or no GPU visible"
            ) from None
        self._pynvml = pynvml
        self._open = True
        try:
            handle, how = _handle_for_cuda_device(pynvml, cuda_device)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            gpu = _text(pynvml.nvmlDeviceGetName(handle))
        except MeterUnavailable:
            self.close()  # every nvmlInit needs its nvmlShutdown (NVML reference-counts them)
            raise
        except pynvml.NVMLError as exc:
            self.close()
            hint = ""
            if isinstance(exc, getattr(pynvml, "NVMLError_NotSupported", ())):
                hint = " (the total-energy counter needs a Volta or newer GPU)"
            raise MeterUnavailable(f"NVML cannot read GPU {cuda_device}'s energy counter: {exc}{hint}") from None
        self._handle = handle
        limit = ""
        try:
            limit = f", power limit {pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000:.0f} W"
        except pynvml.NVMLError:
            pass
        self.gpu_name = gpu
        self.name = f"nvml:{cuda_device}"
        self.description = f"NVML total-energy counter, {gpu} (CUDA device {cuda_device}, {how}{limit})"

    def read_joules(self) -> float:
        # nvmlDeviceGetTotalEnergyConsumption: "Retrieves total energy consumption for this GPU in
        # millijoules (mJ) since the driver was last reloaded" (unsigned long long: at 1 kW it
        # would take ~585 million years to wrap, so differences need no wrap handling; a driver
        # reload between two reads shows up as a non-positive window, which measure_energy refuses).
        return self._pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def power_w(self) -> float:
        """Instantaneous board power (for display only; energy comes from the counter)."""
        return self._pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            try:
                self._pynvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down twice or after driver loss is harmless
                pass

    def __del__(self) -> None:  # NVML init/shutdown are reference counted
        self.close()


def nvml_status(cuda_device: int = 0) -> tuple[bool, str]:
    """(True, description) when the NVML meter works for ``cuda_device``, else (False, why)."""
    try:
        meter = NvmlMeter(cuda_device)
    except MeterUnavailable as exc:
        return False, str(exc)
    desc = meter.description
    meter.close()
    return True, desc
