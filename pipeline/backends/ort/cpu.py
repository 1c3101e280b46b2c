"""ONNX Runtime on the CPU: the backend that always exists."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.backends.base import Backend, ObservedKernel, Session
from pipeline.backends.ort.kernels import observe_kernels
from pipeline.backends.ort.session import OrtSession
from pipeline.formats import Format

if TYPE_CHECKING:
    from pipeline.layers import LayerTable


@lru_cache(maxsize=1)
def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class OrtCpuBackend(Backend):
    name = "ort-cpu"
    auto_rank = 3  # always available: the last resort of auto
    needs_gpu = False
    uint8_activations = True  # residual branches and shared inputs keep their integer kernels on x86

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed: pip install -e ."
        return True, ""

    def device(self) -> str:
        return f"{cpu_model_name()} ({os.cpu_count()} cores)"


    def open(self, onnx_path: str | Path, threads: int = 0) -> Session:
        return OrtSession(onnx_path, ["CPUExecutionProvider"], threads)

    def observed_kernels(self, artifact: str | Path, layer_table: "LayerTable",
                         formats: Mapping[str, Format] | None = None) -> dict[str, ObservedKernel]:
        """Read from ORT's optimized graph (:func:`observe_kernels`): one extra session build."""
        return observe_kernels(artifact, layer_table, formats)

    def peer_artifacts(self, raw_onnx: str | Path, out_dir: Path) -> dict[str, str]:
        from pipeline.backends.ort.peers import quantize_dynamic_artifact

        return quantize_dynamic_artifact(raw_onnx, out_dir)

    def runtime_version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"


BACKENDS = (OrtCpuBackend,)
