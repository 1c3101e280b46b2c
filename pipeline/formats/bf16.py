"""BF16: weights stored bfloat16, activations rounded to bfloat16 through Cast pairs.

ORT has no bf16 compute kernels on the CPU, and the CUDA EP receives the Cast-pair form, so
both emulate it (bf16 rounding, fp32 GEMM). TensorRT (and ORT's TensorRT EP) get the graph
rewritten to bf16 operands first (``exporters.tensorrt.promote_bf16_layers``): native there.
"""

from pipeline.formats.spec import Format, FormatFamily, Realisation

CAST_BF16 = "cast-bf16"  # weights stored bf16, inputs rounded via Cast pairs, fp32 compute

FAMILY = FormatFamily(
    format=Format.BF16,
    weight_bits=16,
    activation_bits=16,
    aliases=("bfloat16",),
    realisations=(
        Realisation(CAST_BF16, "bf16 weights, Cast round trips on the activations",
                    native_on=frozenset({"tensorrt", "ort-trt"})),
    ),
    qat_input_kind=lambda c: "bf16",
    qat_output_kind=lambda c, op: "bf16",
)
