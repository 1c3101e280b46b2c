"""Numeric formats a layer can be given, and what each costs in bits.

One enum is shared by plans, the quantizer, QAT and the measurement code so that
"int4" means exactly one thing everywhere.
"""

from __future__ import annotations

from enum import Enum


class Format(str, Enum):
    """Per-layer precision. Values are the spellings users write in YAML."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"  # E4M3 (float8e4m3fn), per-tensor scale
    INT8 = "int8"
    INT4 = "int4"

    @property
    def weight_bits(self) -> int:
        return WEIGHT_BITS[self]

    def __str__(self) -> str:  # so f-strings print "int8", not "Format.INT8"
        return self.value


WEIGHT_BITS: dict[Format, int] = {
    Format.FP32: 32,
    Format.BF16: 16,
    Format.FP8: 8,
    Format.INT8: 8,
    Format.INT4: 4,
}

ALL_FORMATS: tuple[Format, ...] = tuple(Format)


class Int8Activations(str, Enum):
    """How INT8 activations get their scale.

    static: calibrated once, per tensor, stored in the graph (QDQ).
    dynamic: computed at run time per batch (DynamicQuantizeLinear + MatMulInteger).
    On ORT CPU dynamic is much faster for transformer encoders (see DESIGN facts).
    """

    STATIC = "static"
    DYNAMIC = "dynamic"

    def __str__(self) -> str:
        return self.value


class Calibration(str, Enum):
    """Activation-range calibration for static quantization (ORT calibrators)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"

    def __str__(self) -> str:
        return self.value


INT4_BLOCK_SIZES: tuple[int, ...] = (32, 64, 128)


class QuantTarget(str, Enum):
    """Which runtime the quantizer writes its graph forms for (``exporters.onnx_quant``).

    The numbers stored per layer are the same for every target (one rule per format in
    :mod:`exporters.numerics`); what differs is the ONNX form that carries them:

    ort: the forms ONNX Runtime runs fastest - INT4 MatMul as com.microsoft MatMulNBits,
        quantized embeddings as GatherBlockQuantized, INT8 with dynamic activations
        (DynamicQuantizeLinear + MatMulInteger). Used by ort-cpu, ort-cuda and ort-trt (whose
        TensorRT EP hands the com.microsoft nodes to the CUDA EP, which has real kernels).
    tensorrt: standard-ONNX QDQ only, signed and symmetric, which TensorRT's ONNX parser builds:
        INT4 MatMul/Gemm as blocked DequantizeLinear(int4) feeding the MatMul (TensorRT's
        weight-only form), quantized embeddings as DequantizeLinear feeding the Gather. INT8
        with dynamic activations has no TensorRT form and is refused.
    """

    ORT = "ort"
    TENSORRT = "tensorrt"

    def __str__(self) -> str:
        return self.value


TARGET_INT8_ACTIVATIONS: dict[QuantTarget, tuple[Int8Activations, ...]] = {
    QuantTarget.ORT: (Int8Activations.STATIC, Int8Activations.DYNAMIC),
    QuantTarget.TENSORRT: (Int8Activations.STATIC,),
}
"""INT8 activation modes each target can write (TensorRT's parser has no DynamicQuantizeLinear)."""
