"""ONNX Runtime on the CPU: the backend that always exists."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.backends.base import Backend, ObservedKernel, Session
from pipeline.backends.ort_kernels import observe_kernels
from pipeline.backends.native import execution
from pipeline.formats import Format
from pipeline.results import Execution

if TYPE_CHECKING:
    import onnx

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


WEIGHT_ONLY_ACCURACY_LEVEL = ("session.qdq_matmulnbits_accuracy_level", "0")
"""ORT fuses DequantizeLinear(int4) + MatMul (the quantizer's ``tensorrt`` target form) into
MatMulNBits with this accuracy level, 4 by default: int8 activations on the CPU, which is not the
weight-only fp32-activation layer the graph (and the report) describe. 0 keeps it weight-only. The
``ort`` target writes MatMulNBits itself without the attribute (also 0), so nothing else changes."""


def session_options(threads: int = 0):
    """ORT session options for running an artifact as its report describes it (see :class:`OrtSession`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry(*WEIGHT_ONLY_ACCURACY_LEVEL)
    return opts


class OrtSession(Session):
    """A session with ORT's default graph optimizations (ORT_ENABLE_ALL), none disabled: what a
    user who deploys the artifact gets. The quantizer writes its graphs so that ORT's session-time
    rewrites that would change the numbers (WeightBiasQuantization) find nothing to change
    (``exporters.quant.ort_passes``, ``exporters.quant.ort_session_forms``; checked in tests/exporters/test_ort_session_rewrites.py), so
    no transformer needs to be switched off here. One session setting is pinned:
    :data:`WEIGHT_ONLY_ACCURACY_LEVEL`."""

    def __init__(self, onnx_path: str | Path, providers: list, threads: int = 0):
        import onnxruntime as ort

        opts = session_options(threads)
        self._sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.providers = self._sess.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(self.output_names, feeds)


class OrtCpuBackend(Backend):
    name = "ort-cpu"
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

    def execution(self, fmt: Format, realisation: str = "") -> Execution:
        return execution(self.name, fmt, realisation)

    def open(self, onnx_path: str | Path, threads: int = 0) -> Session:
        return OrtSession(onnx_path, ["CPUExecutionProvider"], threads)

    def observed_kernels(self, artifact: str | Path, layer_table: "LayerTable",
                         formats: Mapping[str, Format] | None = None) -> dict[str, ObservedKernel]:
        """Read from ORT's optimized graph (:func:`observe_kernels`): one extra session build."""
        return observe_kernels(artifact, layer_table, formats)

    def runtime_version(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"
