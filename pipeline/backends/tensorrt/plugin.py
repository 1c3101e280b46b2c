"""The native TensorRT backend: engines built from the quantizer's standard-ONNX QDQ graph
(:mod:`pipeline.backends.tensorrt.engine`), timed with CUDA events."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pipeline.backends.base import Session
from pipeline.backends.gpu import GPU_EXTRA, GpuBackend, gpu_status
from pipeline.backends.native import describe
from pipeline.formats import Int8Activations, QuantTarget


@lru_cache(maxsize=1)
def _tensorrt_status() -> tuple[bool, str]:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False, f"the TensorRT Python package is not installed: {GPU_EXTRA}"
    ok, why = gpu_status(0)
    if not ok:
        return False, why
    if importlib.util.find_spec("torch") is None:
        return False, "torch is not installed: pip install torch==2.13.0 (CUDA build)"
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return False, f"torch failed to import: {exc}"
    if torch.version.cuda is None:  # a CPU build; checked without initialising CUDA in this process
        return False, (
            f"torch {torch.__version__} is a CPU build; the tensorrt backend uses torch CUDA "
            "tensors, streams and events: install the CUDA build of torch==2.13.0"
        )
    try:
        import tensorrt  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - missing libnvinfer etc.
        return False, f"tensorrt failed to import: {type(exc).__name__}: {exc}"
    return True, ""


class TensorRTBackend(GpuBackend):
    """TensorRT engines built from the QDQ ONNX (exporters.tensorrt), timed with CUDA events.

    The engine is built on the first ``run`` (input shapes are known then) and
    serialised next to the ONNX file; ``session.engine_path`` names it.
    """

    name = "tensorrt"
    auto_rank = 0  # best first where it runs
    quant_target = QuantTarget.TENSORRT  # standard-ONNX QDQ forms only (see pipeline.formats)
    max_batch = 256  # optimisation profile: batch dimension 1..max(first batch, max_batch)
    builder_optimization_level = 3
    allow_tf32 = False

    @classmethod
    def check_config(cls, config) -> None:
        if Int8Activations.DYNAMIC in config.search.int8_activations and "int8_activations" in config.search.model_fields_set:
            # Left at its default the list is narrowed to [static] for TensorRT by the search space
            # (search_spaces/space.py); written out by the user, it asks for something impossible.
            raise ValueError("search.int8_activations: TensorRT builds int8 with static (calibrated) activations "
                             "only - its ONNX parser has no DynamicQuantizeLinear; set [static] "
                             "(or measure on ort-cpu, which runs both)")

    def available(self) -> tuple[bool, str]:
        return _tensorrt_status()

    def supports(self, realisation: str) -> bool:
        """False for what TensorRT cannot build here (see pipeline.backends.native.describe)."""
        return describe(self.name, realisation, self.fp8_capable()) != "unsupported"

    def open(self, onnx_path: str | Path, threads: int = 0) -> Session:
        from pipeline.backends.tensorrt.engine import TrtSession

        self.require()
        return TrtSession(
            onnx_path,
            device=self.device_id,
            max_batch=self.max_batch,
            allow_tf32=self.allow_tf32,
            builder_optimization_level=self.builder_optimization_level,
        )

    def runtime_version(self) -> str:
        import tensorrt

        return f"tensorrt {tensorrt.__version__}"


BACKENDS = (TensorRTBackend,)
