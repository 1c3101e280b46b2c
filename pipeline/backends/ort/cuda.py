"""ONNX Runtime on NVIDIA GPUs: the CUDA execution provider (``ort-cuda``) and the TensorRT
execution provider (``ort-trt``), which hands what TensorRT cannot take to the CUDA EP.

Every session checks which provider ORT really started and refuses to measure a CPU
fallback under a GPU name (see :mod:`pipeline.backends.gpu` for the probes).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.backends.base import BackendUnavailable, Session
from pipeline.backends.gpu import GpuBackend, _ort_provider_status, _prepare_ort_process
from pipeline.backends.ort.session import OrtSession


class OrtGpuSession(Session):
    """An ORT session that is known to run on the requested GPU provider."""

    def __init__(self, onnx_path: str | Path, providers: list, threads: int, expect: str, backend: str):
        inner = OrtSession(onnx_path, providers, threads)
        if not inner.providers or inner.providers[0] != expect:
            raise BackendUnavailable(
                f"backend {backend!r}: onnxruntime did not start {expect} for {onnx_path} "
                f"(got {inner.providers}); refusing to measure a CPU run as {backend}"
            )
        self._inner = inner
        self.input_names = inner.input_names
        self.output_names = inner.output_names
        self.providers = inner.providers
        self.onnx_path = str(onnx_path)

    def run(self, feeds):
        # Host arrays in, host arrays out: ORT copies and synchronises inside run().
        return self._inner.run(feeds)


class OrtCudaBackend(GpuBackend):
    """ONNX Runtime with the CUDA execution provider (onnxruntime-gpu)."""

    name = "ort-cuda"
    auto_rank = 2
    provider = "CUDAExecutionProvider"

    def available(self) -> tuple[bool, str]:
        return _ort_provider_status(self.provider)

    def provider_options(self) -> dict[str, str]:
        # use_tf32 (CUDA EP option, onnxruntime/core/providers/cuda/cuda_execution_provider_info.cc):
        # "0" keeps fp32 MatMul/Conv in IEEE fp32 on Ampere and newer.
        return {"device_id": str(self.device_id), "use_tf32": "0"}

    def open(self, onnx_path: str | Path, threads: int = 0) -> Session:
        self.require()
        _prepare_ort_process(self.provider)
        providers = [(self.provider, self.provider_options()), "CPUExecutionProvider"]
        return OrtGpuSession(onnx_path, providers, threads, self.provider, self.name)

    def runtime_version(self) -> str:
        import onnxruntime

        return f"onnxruntime-gpu {onnxruntime.__version__} (CUDA EP)"


class OrtTrtBackend(GpuBackend):
    """ONNX Runtime with the TensorRT execution provider (CUDA EP for what TensorRT does not take).

    The graph gets the same preparation as the native TensorRT build (Cast-pair
    BF16 layers promoted to bf16 compute); engines are cached next to the model.
    """

    name = "ort-trt"
    auto_rank = 1
    provider = "TensorrtExecutionProvider"
    builder_optimization_level = 3

    def available(self) -> tuple[bool, str]:
        ok, why = _ort_provider_status("CUDAExecutionProvider")
        if not ok:
            return False, why
        return _ort_provider_status(self.provider)

    def provider_options(self, cache: Path) -> dict[str, str]:
        """TensorRT EP options (names from ORT's tensorrt_execution_provider_info.cc; booleans are
        parsed as "0"/"1"/"True"/"False"). fp16 and int8 stay off on purpose: the EP creates the
        network strongly typed only when neither is set (``network_flags |= fp16_enable_ ||
        int8_enable_ ? 0 : 1U << kSTRONGLY_TYPED``), and strong typing is what makes TensorRT
        honour the graph's QDQ and bf16 layers as written (TensorRT 11 has no weak typing at all).
        They are written out so that ORT_TENSORRT_*_ENABLE environment variables cannot turn them on.
        """
        return {
            "device_id": str(self.device_id),
            "trt_fp16_enable": "False",
            "trt_int8_enable": "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache),
            "trt_builder_optimization_level": str(self.builder_optimization_level),
        }

    def open(self, onnx_path: str | Path, threads: int = 0) -> Session:
        from exporters.tensorrt import prepare_for_tensorrt  # the ONNX half of the TensorRT build

        self.require()
        _prepare_ort_process(self.provider)
        prepared = prepare_for_tensorrt(onnx_path, suffix=".ort-trt.onnx")
        cache = Path(onnx_path).parent / "trt-ep-cache"
        cache.mkdir(parents=True, exist_ok=True)
        providers = [(self.provider, self.provider_options(cache)),
                     ("CUDAExecutionProvider", {"device_id": str(self.device_id), "use_tf32": "0"}),
                     "CPUExecutionProvider"]
        session = OrtGpuSession(prepared.path, providers, threads, self.provider, self.name)
        session.prepared = prepared  # type: ignore[attr-defined]
        return session

    def runtime_version(self) -> str:
        import onnxruntime

        return f"onnxruntime-gpu {onnxruntime.__version__} (TensorRT EP)"
BACKENDS = (OrtCudaBackend, OrtTrtBackend)
