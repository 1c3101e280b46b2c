"""Which formats a backend only emulates, per layer: the trials the search should not spend.

An emulated layer stores the format but computes in fp32 (bf16 through Cast pairs, fp8 Q/DQ,
int4 DequantizeLinear before a Conv on ORT CPU): slower than FP32, with no kernel that would
make it worth measuring on that backend. The verdict comes from the backend object itself
(``backend.execution(format, realisation)``, the table in :mod:`pipeline.backends.native`);
what is written for each (format, op) follows the quantizer's table in :mod:`exporters.onnx_quant`
(checked against the quantizer's recorded realisations in tests/pipeline/sensitivity).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.backends import native
from pipeline.formats import Format, Int8Activations, QuantTarget
from pipeline.layers import LayerTable


def realisations(fmt: Format, op: str, target: QuantTarget,
                 int8_activations: Sequence[Int8Activations] = (Int8Activations.STATIC,)) -> list[str]:
    """The forms the quantizer may write for ``fmt`` on an ``op`` layer (several for int8: one
    per activation mode the search may pick)."""
    trt = QuantTarget(target) is QuantTarget.TENSORRT
    if fmt is Format.FP32:
        return [native.FP32]
    if op == "Gather":
        if fmt is Format.BF16:
            return [native.CAST_BF16]
        prefix = "dq-gather-" if trt else "gather-"
        return [prefix + fmt.value]
    if fmt is Format.BF16:
        return [native.CAST_BF16]
    if fmt is Format.FP8:
        return [native.QDQ_FP8]
    if fmt is Format.INT8:
        return [native.DYNAMIC_INT8 if Int8Activations(a) is Int8Activations.DYNAMIC else native.QDQ_INT8
                for a in int8_activations]
    if op == "Conv" or trt:
        return [native.QDQ_INT4]
    return [native.MATMULNBITS_INT4]


def emulated_formats(backend, table: LayerTable, formats: Sequence[Format],
                     int8_activations: Sequence[Int8Activations] = (Int8Activations.STATIC,)) -> dict[str, set[Format]]:
    """Per layer, the formats among ``formats`` that ``backend`` only emulates for it (a format is
    kept when any of its forms runs natively, e.g. int8 with dynamic activations)."""
    target = getattr(backend, "quant_target", QuantTarget.ORT)
    out: dict[str, set[Format]] = {}
    for layer in table:
        out[layer.name] = {
            Format(f) for f in formats
            if Format(f) is not Format.FP32
            and all(backend.execution(Format(f), r) == "emulated"
                    for r in realisations(Format(f), layer.onnx_op, target, int8_activations))
        }
    return out
