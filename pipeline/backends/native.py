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

# ORT CPU (MLAS): integer kernels for INT8 (VNNI where the CPU has it) and for
# INT4 MatMulNBits; no bf16 or fp8 compute kernels (DESIGN facts, Nov 2026).
_ORT_CPU_NATIVE = {FP32, QDQ_INT8, DYNAMIC_INT8, MATMULNBITS_INT4, GATHER_INT8, GATHER_INT4}

# ORT CUDA EP: fp32/bf16 cuBLAS, int4 MatMulNBits CUDA kernel; INT8 QDQ runs as
# DQ + float GEMM (no QLinear CUDA kernels), FP8 QDQ likewise.
_ORT_CUDA_NATIVE = {FP32, CAST_BF16, MATMULNBITS_INT4, GATHER_INT8, GATHER_INT4}

# TensorRT (native builder or the ORT TensorRT EP): explicit quantization of QDQ
# graphs gives real INT8 and (Hopper/Ada, sm >= 89) FP8 kernels; bf16 native;
# INT4 weight-only via blocked DQ on TensorRT >= 10.
_TENSORRT_NATIVE = {FP32, CAST_BF16, QDQ_INT8, QDQ_INT4, GATHER_INT8}

# TFLite: INT8 full-integer kernels; everything else runs in float.
_TFLITE_NATIVE = {FP32, QDQ_INT8}

NATIVE_REALISATIONS: dict[str, set[str]] = {
    "ort-cpu": _ORT_CPU_NATIVE,
    "ort-cuda": _ORT_CUDA_NATIVE,
    "ort-trt": _TENSORRT_NATIVE,
    "tensorrt": _TENSORRT_NATIVE,
    "tflite": _TFLITE_NATIVE,
}


def execution(backend: str, fmt: Format, realisation: str, fp8_capable_gpu: bool = False) -> Execution:
    """Native or emulated for one layer on one backend."""
    if fmt is Format.FP32:
        return "native"
    if realisation == QDQ_FP8 and backend in ("tensorrt", "ort-trt") and fp8_capable_gpu:
        return "native"
    return "native" if realisation in NATIVE_REALISATIONS.get(backend, set()) else "emulated"
