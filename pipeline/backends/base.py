"""Backend and session interfaces."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from pipeline.formats import Format, QuantTarget
from pipeline.results import Execution

if TYPE_CHECKING:
    from pipeline.layers import LayerTable


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


class ObservedKernel(NamedTuple):
    """What the runtime actually runs for one layer, read from the runtime itself."""

    kernel: str  # e.g. "QGemm", "FusedGemm(fp32 on dequantized int8)"
    execution: Execution


class Backend(ABC):
    name: str  # e.g. "ort-cpu"
    # Place in ``auto``'s preference, lower first (pipeline.backends.registry.auto_order); None: never auto.
    auto_rank: int | None = None
    needs_gpu: bool = False
    install_hint: str = ""  # e.g. "pip install -e '.[gpu]'"
    # The graph forms the quantizer writes for this backend (pipeline.formats.QuantTarget).
    quant_target: QuantTarget = QuantTarget.ORT
    # Static int8 activations stored uint8 with zero point 128 (the same values): x86 ORT kernels take
    # uint8 activations, and ORT converts int8 pairs only when they have one reader. Not for ORT's
    # TensorRT EP (TensorRT takes signed, zero-point-0 Q/DQ only). See exporters.quant.ort_session_forms.
    uint8_activations: bool = False

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

    def observed_kernels(self, artifact: str | Path, layer_table: "LayerTable",
                         formats: Mapping[str, Format] | None = None) -> dict[str, ObservedKernel] | None:
        """Per layer, the kernel this backend really runs for ``artifact`` and whether that is native.

        ``layer_table`` is the table the artifact was quantized from (its ``onnx_node`` names);
        ``formats`` the planned format per layer (an FP32 layer is native whatever feeds it).
        None (the default) means this backend cannot observe its kernels, and the static table
        (``pipeline.backends.native``, :meth:`execution`) is all a report has. A layer missing from
        the returned dict was not found in the runtime's graph: the static table applies to it.

        ort-cpu implements it (ORT's optimized graph, :func:`pipeline.backends.ort_kernels.observe_kernels`).
        ort-cuda / ort-trt / tensorrt / tflite do not: ORT's optimized-model dump works per
        execution provider, but the CUDA EP's fusions and its node placement (what falls back to the
        CPU) were never checked on a GPU here, and TensorRT/TFLite have no such dump, so they keep
        the static table rather than guess.
        """
        return None

    def require(self) -> None:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name!r} is not available here: {why}")
