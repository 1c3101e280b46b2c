"""Which (backend, format, realisation) runs natively, explicit in one table.

"Native" means the runtime executes the layer's arithmetic in that format
(integer or low-precision float kernels). "Emulated" means the artifact stores
the format but the runtime computes in a wider type (e.g. DequantizeLinear to
fp32 followed by an fp32 MatMul, or bf16 rounding through Cast pairs).

Realisations are what the quantizer actually wrote for a layer (see
``exporters.onnx_quant``): the same format can be native in one form and
emulated in another on the same backend (INT4 as MatMulNBits is a real kernel
on ORT CPU; INT4 as a blocked DequantizeLinear before a Conv is not).
"""

from __future__ import annotations

from pipeline.formats import Format
from pipeline.results import Execution

# Realisation names written by exporters.onnx_quant.
FP32 = "fp32"
CAST_BF16 = "cast-bf16"  # weights stored bf16, inputs rounded via Cast pairs, fp32 compute
QDQ_INT8 = "qdq-int8"  # static W8A8 QDQ, fused by ORT into QLinear* / integer kernels
DYNAMIC_INT8 = "dynamic-int8"  # DynamicQuantizeLinear + MatMulInteger / ConvInteger
QDQ_FP8 = "qdq-fp8"  # float8e4m3fn Q/DQ pairs
MATMULNBITS_INT4 = "matmulnbits-int4"  # com.microsoft MatMulNBits, weight-only
QDQ_INT4 = "qdq-int4"  # blocked DequantizeLinear(int4) on the weight, weight-only
GATHER_INT8 = "gather-int8"  # embedding table stored int8, dequantized on gather
GATHER_INT4 = "gather-int4"  # embedding table stored int4 (block-wise)
GATHER_FP8 = "gather-fp8"  # embedding table stored float8e4m3fn (GatherBlockQuantized)
# The TensorRT target's standard-ONNX forms (exporters.onnx_quant, target tensorrt). INT4
# MatMul/Gemm there is QDQ_INT4 (blocked DequantizeLinear feeding the MatMul), as for Conv.
DQ_GATHER_INT8 = "dq-gather-int8"  # int8 table per row, DequantizeLinear of the table, then Gather
DQ_GATHER_INT4 = "dq-gather-int4"  # int4 table in blocks along the embedding dim, DQ then Gather
DQ_GATHER_FP8 = "dq-gather-fp8"  # float8e4m3fn table, per-tensor scale, DQ then Gather

# This table is what each form *can* run as. On ORT CPU every candidate's layers are also
# observed in the session's optimized graph (pipeline.backends.ort_kernels.observe_kernels), and the
# observation wins: e.g. a static-int8 Gemm followed by a Relu, or MatMuls sharing one quantized
# input, stay float kernels on dequantized int8 (emulated) although the form could be native.
# ORT CPU (MLAS): integer kernels for INT8 (VNNI where the CPU has it) and for
# INT4 MatMulNBits; no bf16 or fp8 compute kernels (DESIGN facts, Nov 2026).
_ORT_CPU_NATIVE = {FP32, QDQ_INT8, DYNAMIC_INT8, MATMULNBITS_INT4, GATHER_INT8, GATHER_INT4, GATHER_FP8}

# ORT CUDA EP: int4 MatMulNBits CUDA kernel; INT8 QDQ runs as DQ + float GEMM
# (no QLinear CUDA kernels), FP8 QDQ likewise. BF16 written as Cast pairs is
# rounding followed by an fp32 cuBLAS GEMM (TF32 disabled by pipeline.backends.gpu):
# emulated. (The CUDA EP does have bf16 GEMMs; a graph that feeds them bf16
# directly is what exporters.tensorrt.promote_bf16_layers writes for TensorRT.)
_ORT_CUDA_NATIVE = {FP32, MATMULNBITS_INT4, GATHER_INT8, GATHER_INT4}

# TensorRT (native builder): strongly typed networks (the only kind in TensorRT
# 11) run each layer in the types the graph gives it. Explicit quantization of
# QDQ graphs gives real INT8 kernels and, on sm >= 89 (Ada, Hopper), FP8
# kernels; INT4 weight-only blocked DQ is fused into the GEMM prologue (int4
# weights read by the kernel, fp compute, like MatMulNBits on ORT CPU).
# Cast-pair BF16 layers are native because exporters.tensorrt rewrites them to
# bf16 compute (promote_bf16_layers) before the build; bf16 needs sm >= 80.
# TensorRT cannot parse DynamicQuantizeLinear/MatMulInteger or com.microsoft
# ops (MatMulNBits, GatherBlockQuantized): those plans are refused before the
# build (see UNSUPPORTED).
_TENSORRT_NATIVE = {FP32, CAST_BF16, QDQ_INT8, QDQ_INT4}

# ORT TensorRT EP: the same TensorRT for the nodes it takes (the graph is given
# the same bf16 promotion); nodes TensorRT cannot parse fall back to the CUDA
# EP, which has real MatMulNBits and GatherBlockQuantized kernels.
_ORT_TRT_NATIVE = _TENSORRT_NATIVE | {MATMULNBITS_INT4, GATHER_INT8, GATHER_INT4}

# DequantizeLinear-then-Gather tables (the TensorRT target's embeddings) are emulated
# everywhere: the table is stored quantized, but every runtime dequantizes it (TensorRT
# may even fold the DQ into an fp32 constant at build time) and gathers floats.

# TFLite: INT8 full-integer kernels; everything else runs in float.
_TFLITE_NATIVE = {FP32, QDQ_INT8, DYNAMIC_INT8}  # dynamic-range kernels compute in int8

NATIVE_REALISATIONS: dict[str, set[str]] = {
    "ort-cpu": _ORT_CPU_NATIVE,
    "ort-cuda": _ORT_CUDA_NATIVE,
    "ort-trt": _ORT_TRT_NATIVE,
    "tensorrt": _TENSORRT_NATIVE,
    "tflite": _TFLITE_NATIVE,
}

# Realisations a backend cannot run at all (building/loading fails with a clear error).
UNSUPPORTED: dict[str, set[str]] = {
    "tensorrt": {DYNAMIC_INT8, MATMULNBITS_INT4, GATHER_INT8, GATHER_INT4, GATHER_FP8},
}

# Every realisation the quantizer writes and the format it realises (for tables and docs).
REALISATIONS: dict[str, Format] = {
    FP32: Format.FP32,
    CAST_BF16: Format.BF16,
    QDQ_FP8: Format.FP8,
    QDQ_INT8: Format.INT8,
    DYNAMIC_INT8: Format.INT8,
    GATHER_INT8: Format.INT8,
    MATMULNBITS_INT4: Format.INT4,
    QDQ_INT4: Format.INT4,
    GATHER_INT4: Format.INT4,
    GATHER_FP8: Format.FP8,
    DQ_GATHER_INT8: Format.INT8,
    DQ_GATHER_INT4: Format.INT4,
    DQ_GATHER_FP8: Format.FP8,
}


def execution(backend: str, fmt: Format, realisation: str, fp8_capable_gpu: bool = False) -> Execution:
    """Native or emulated for one layer on one backend."""
    if fmt is Format.FP32:
        return "native"
    if realisation == QDQ_FP8 and backend in ("tensorrt", "ort-trt") and fp8_capable_gpu:
        return "native"
    return "native" if realisation in NATIVE_REALISATIONS.get(backend, set()) else "emulated"


def describe(backend: str, realisation: str, fp8_capable_gpu: bool = False) -> str:
    """'native', 'emulated' or 'unsupported' for one cell of the table."""
    if realisation in UNSUPPORTED.get(backend, set()):
        return "unsupported"
    if backend == "tensorrt" and realisation == QDQ_FP8 and not fp8_capable_gpu:
        return "unsupported"  # TensorRT has no FP8 kernels before sm 8.9: the build fails
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
