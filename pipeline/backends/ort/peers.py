"""The one-liner users of ONNX Runtime run today, built so the search can be judged against it.

Why: a per-layer search is only worth running if its front beats what a user gets from one call,
and for ONNX Runtime that call is ``onnxruntime.quantization.quantize_dynamic(model, out)``: INT8
weights, activations quantized per batch at run time, on every MatMul/Gemm/Conv/Gather ORT's
registry knows. It is built here with ORT's own defaults (no per-channel, QInt8 weights), from
the FP32 reference graph the trials start from (the export after standard-op graph passes, the
pre-processing ORT's docs recommend before quantizing), and scored and
timed exactly like a search candidate (:mod:`pipeline.search.peers`), so the report can say by how
much the front beats it: speed and size re-measured interleaved with the front, accuracy through
the runtime on the same eval set.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

QUANTIZE_DYNAMIC = "ORT quantize_dynamic (one-liner)"


def quantize_dynamic_artifact(raw_onnx: str | Path, out_dir: Path) -> dict[str, str]:
    """``{label: path}`` of ``quantize_dynamic(raw_onnx, out)`` with ORT's defaults (cached in ``out_dir``)."""
    from onnxruntime.quantization import quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "ort_quantize_dynamic.onnx"
    if not out.is_file():
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # ORT's quantizer logs "please consider pre-processing" on the root logger
        try:
            tmp = out.with_suffix(".partial.onnx")
            big = Path(raw_onnx).stat().st_size > 1_500_000_000  # protobuf caps a file at 2 GB
            quantize_dynamic(str(raw_onnx), str(tmp), use_external_data_format=big)
            tmp.replace(out)
        finally:
            root.setLevel(level)
    return {QUANTIZE_DYNAMIC: str(out)}
