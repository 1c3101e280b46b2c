"""INT4: weight-only, symmetric blocks along the reduction axis (the ``int4_block_size`` knob);
activations stay fp32. MatMulNBits on ORT, blocked DequantizeLinear(int4) for TensorRT."""

from pipeline.formats.spec import Format, FormatFamily, Realisation

BLOCK_SIZES: tuple[int, ...] = (32, 64, 128)

MATMULNBITS_INT4 = "matmulnbits-int4"  # com.microsoft MatMulNBits, weight-only
QDQ_INT4 = "qdq-int4"  # blocked DequantizeLinear(int4) on the weight, weight-only
GATHER_INT4 = "gather-int4"  # embedding table stored int4 (block-wise)
DQ_GATHER_INT4 = "dq-gather-int4"  # int4 table in blocks along the embedding dim, DQ then Gather

FAMILY = FormatFamily(
    format=Format.INT4,
    weight_bits=4,
    activation_bits=None,
    realisations=(
        Realisation(MATMULNBITS_INT4, "MatMulNBits (weight-only)",
                    native_on=frozenset({"ort-cpu", "ort-cuda", "ort-trt"}), unsupported_on=frozenset({"tensorrt"})),
        Realisation(QDQ_INT4, "blocked DequantizeLinear(int4) feeding the layer",
                    native_on=frozenset({"tensorrt", "ort-trt"})),
        Realisation(GATHER_INT4, "int4 embedding table, GatherBlockQuantized",
                    native_on=frozenset({"ort-cpu", "ort-cuda", "ort-trt"}), unsupported_on=frozenset({"tensorrt"})),
        Realisation(DQ_GATHER_INT4, "int4 embedding table, DequantizeLinear then Gather"),
    ),
    knobs=("int4_block_size",),
    tag=lambda c: f"int4(b{c.int4_block_size})",
)
