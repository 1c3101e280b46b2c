"""INT8: per-channel symmetric weights; activations static (calibrated, QDQ) or dynamic
(scaled per batch: DynamicQuantizeLinear + MatMulInteger). The ``int8_activations`` knob."""

from pipeline.formats.spec import Format, FormatFamily, Int8Activations, Realisation

QDQ_INT8 = "qdq-int8"  # static W8A8 QDQ, fused by ORT into QLinear* / integer kernels
DYNAMIC_INT8 = "dynamic-int8"  # DynamicQuantizeLinear + MatMulInteger / ConvInteger
GATHER_INT8 = "gather-int8"  # embedding table stored int8, dequantized on gather
DQ_GATHER_INT8 = "dq-gather-int8"  # int8 table per row, DequantizeLinear of the table, then Gather


def _static(c) -> bool:
    return c.int8_activations is Int8Activations.STATIC


FAMILY = FormatFamily(
    format=Format.INT8,
    weight_bits=8,
    activation_bits=8,
    realisations=(
        Realisation(QDQ_INT8, "static W8A8 QDQ", native_on=frozenset({"ort-cpu", "tensorrt", "ort-trt", "tflite"})),
        Realisation(DYNAMIC_INT8, "DynamicQuantizeLinear + MatMulInteger/ConvInteger",
                    native_on=frozenset({"ort-cpu", "tflite"}), unsupported_on=frozenset({"tensorrt"})),
        Realisation(GATHER_INT8, "int8 embedding table, GatherBlockQuantized",
                    native_on=frozenset({"ort-cpu", "ort-cuda", "ort-trt"}), unsupported_on=frozenset({"tensorrt"})),
        Realisation(DQ_GATHER_INT8, "int8 embedding table, DequantizeLinear then Gather"),
    ),
    knobs=("int8_activations",),
    calibrated=_static,
    tag=lambda c: "int8" + ("" if _static(c) else "(dyn)"),
    qat_input_kind=lambda c: "int8_static" if _static(c) else "int8_dynamic",
    # A static int8 Conv's output is quantized too (QLinearConv writes int8).
    qat_output_kind=lambda c, op: "int8_static" if op == "Conv" and _static(c) else None,
    qat_calibrated_kinds=frozenset({"int8_static"}),
)
