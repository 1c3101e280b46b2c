"""FP8 (E4M3FN, per-tensor scales): weights and activations, activations calibrated.

Native only on GPUs with FP8 tensor cores (sm >= 8.9) through TensorRT; TensorRT cannot build
it below that. Everywhere else the QDQ pairs are dequantized to fp32 (emulated).
"""

from pipeline.formats.spec import Format, FormatFamily, Realisation

QDQ_FP8 = "qdq-fp8"  # float8e4m3fn Q/DQ pairs
GATHER_FP8 = "gather-fp8"  # embedding table stored float8e4m3fn (GatherBlockQuantized)
DQ_GATHER_FP8 = "dq-gather-fp8"  # float8e4m3fn table, per-tensor scale, DQ then Gather (tensorrt target)

FAMILY = FormatFamily(
    format=Format.FP8,
    weight_bits=8,
    activation_bits=8,
    aliases=("float8", "e4m3"),
    realisations=(
        Realisation(QDQ_FP8, "E4M3FN QDQ weights and activations",
                    native_on_fp8_gpus=frozenset({"tensorrt", "ort-trt"}),
                    unsupported_without_fp8=frozenset({"tensorrt"})),
        Realisation(GATHER_FP8, "E4M3FN embedding table, GatherBlockQuantized",
                    native_on=frozenset({"ort-cpu"}), unsupported_on=frozenset({"tensorrt"})),
        Realisation(DQ_GATHER_FP8, "E4M3FN embedding table, DequantizeLinear then Gather"),
    ),
    calibrated=lambda c: True,  # activation scale amax/448 from ORT's MinMax calibrator
    qat_input_kind=lambda c: "fp8",
    qat_calibrated_kinds=frozenset({"fp8"}),
)
