"""Backend and session interfaces."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from pipeline.formats import Format, QuantTarget
from pipeline.results import Execution


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says what to install or why."""


class Session(ABC):
    """A loaded artifact ready to run batches."""

    input_names: list[str]
    output_names: list[str]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run one batch; outputs in ``output_names`` order, as host numpy arrays."""

    def synchronize(self) -> None:
        """Block until queued device work is done (no-op on CPU)."""


class Backend(ABC):
    name: str  # e.g. "ort-cpu"
    needs_gpu: bool = False
    install_hint: str = ""  # e.g. "pip install -e '.[gpu]'"
    # The graph forms the quantizer writes for this backend (pipeline.formats.QuantTarget).
    quant_target: QuantTarget = QuantTarget.ORT

    @abstractmethod
    def available(self) -> tuple[bool, str]:
        """(True, "") or (False, reason including the install command)."""

    @abstractmethod
    def device(self) -> str:
        """Human-readable device, e.g. 'AMD EPYC 9R14 (2 threads)'."""

    @abstractmethod
    def execution(self, fmt: Format) -> Execution:
        """Whether ``fmt`` runs natively on this backend here, or is emulated."""

    @abstractmethod
    def open(self, onnx_path: str | Path, threads: int = 0) -> Session:
        """Load an artifact for timing and accuracy runs."""

    def runtime_version(self) -> str:
        return ""

    def require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available here: {why}")
