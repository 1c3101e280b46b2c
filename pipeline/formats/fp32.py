"""FP32: the reference format, unchanged weights and activations; native everywhere."""

from pipeline.formats.spec import Format, FormatFamily, Realisation

FP32 = "fp32"

FAMILY = FormatFamily(
    format=Format.FP32,
    weight_bits=32,
    activation_bits=32,
    aliases=("float32", "float"),
    realisations=(
        Realisation(FP32, "unchanged", native_on=frozenset({"ort-cpu", "ort-cuda", "ort-trt", "tensorrt", "tflite"})),
    ),
)
