"""Which (backend, format, realisation) runs natively: a view of the format registry.

"Native" means the runtime executes the layer's arithmetic in that format (integer or
low-precision float kernels). "Emulated" means the artifact stores the format but the runtime
computes in a wider type (e.g. DequantizeLinear to fp32 followed by an fp32 MatMul, or bf16
rounding through Cast pairs). The facts are declared once per realisation by the format families
(``pipeline/formats/<family>.py``: ``native_on``, ``unsupported_on``); the rule that reads them is
:func:`pipeline.formats.registry.is_native`. This module keeps the table's old names and renders it.

On ORT CPU every candidate's layers are also observed in the session's optimized graph
(:func:`pipeline.backends.ort.kernels.observe_kernels`), and the observation wins: e.g. a
static-int8 Gemm followed by a Relu stays a float kernel on dequantized int8 (emulated)
although the form could be native.
"""

from __future__ import annotations

from pipeline.formats import Format
from pipeline.formats.names import *  # noqa: F401,F403 - the realisation names, for old imports
from pipeline.formats.registry import is_native, is_unsupported, realisations
from pipeline.results import Execution

TABLE_BACKENDS: tuple[str, ...] = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "tflite")

REALISATIONS: dict[str, Format] = {name: fmt for name, (fmt, _) in realisations().items()}
"""Every realisation the quantizer writes and the format it realises (for tables and docs)."""

NATIVE_REALISATIONS: dict[str, set[str]] = {
    b: {name for name, fmt in REALISATIONS.items() if is_native(b, fmt, name)} for b in TABLE_BACKENDS
}
UNSUPPORTED: dict[str, set[str]] = {
    b: s for b in TABLE_BACKENDS if (s := {name for name in REALISATIONS if is_unsupported(b, name, True)})
}


def execution(backend: str, fmt: Format, realisation: str, fp8_capable_gpu: bool = False,
              extra: frozenset[str] = frozenset()) -> Execution:
    """Native or emulated for one layer on one backend."""
    return "native" if is_native(backend, fmt, realisation, fp8_capable_gpu, extra) else "emulated"


def describe(backend: str, realisation: str, fp8_capable_gpu: bool = False) -> str:
    """'native', 'emulated' or 'unsupported' for one cell of the table."""
    if is_unsupported(backend, realisation, fp8_capable_gpu):
        return "unsupported"
    return execution(backend, REALISATIONS[realisation], realisation, fp8_capable_gpu)


def native_table_markdown(backends: tuple[str, ...] = ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt")) -> str:
    """The table as Markdown (README, reports). FP8 cells on TensorRT show both GPU cases."""
    header = "| format | realisation | " + " | ".join(backends) + " |"
    lines = [header, "|" + "---|" * (len(backends) + 2)]
    for realisation, fmt in REALISATIONS.items():
        cells = []
        for b in backends:
            cell = describe(b, realisation, False)
            with_fp8 = describe(b, realisation, True)
            if with_fp8 != cell:
                cell = f"{with_fp8} on sm>=89 (Ada/Hopper), else {cell}"
            cells.append(cell)
        lines.append(f"| {fmt.value} | {realisation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
