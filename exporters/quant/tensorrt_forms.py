"""The TensorRT target's graph forms: standard-ONNX, signed, symmetric QDQ only.

TensorRT's ONNX parser implements standard ONNX ops, so the ``ort`` target's
com.microsoft nodes (MatMulNBits, GatherBlockQuantized) cannot be built. For
``target: tensorrt`` (:class:`pipeline.formats.QuantTarget`) the quantizer writes:

* :func:`int4_qdq_matmul_pass` - INT4 MatMul (and Gemm, rewritten as MatMul + Add first)
  as a blocked ``DequantizeLinear(int4, axis=0, block_size=B)`` feeding the MatMul: TensorRT's
  documented weight-only INT4 form (symmetric, zero point 0, blocks along K). Written by ORT's
  own ``MatMulNBitsQuantizer`` in QDQ format, whose MLAS block rule is the same as the
  MatMulNBits path (checked against :func:`exporters.numerics.int4_block_quantize` in the tests),
  so a plan's INT4 numbers do not depend on the target.
* :func:`dq_gather` - an INT8/INT4/FP8 embedding table stored quantized and restored by a
  ``DequantizeLinear`` of the whole table before the ``Gather``, with the same numbers as the
  ``ort`` target's GatherBlockQuantized forms (int8 per row, int4 blocks along the embedding
  dim with ORT's half-to-even rule, fp8 per tensor). This is weight storage only: every
  runtime dequantizes the table and gathers floats (``emulated`` in
  :mod:`pipeline.backends.native`); TensorRT may fold the DequantizeLinear into an fp32
  constant when it builds the engine, which the engine size then shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters import numerics
from exporters.quant.graph import NameScope, add_initializer, initializers, insert_before
from exporters.quant.handwritten import embedding_table
from pipeline.formats import Format


def int4_qdq_matmul_pass(model: onnx.ModelProto, nodes: Sequence[str], block_size: int) -> onnx.ModelProto:
    """MatMul -> DequantizeLinear(int4 weight, blocked along K) + MatMul, for exactly ``nodes``.

    ORT names the rewritten MatMul ``<name>_matmul_Q4``; it gets its layer's node name back so
    reports, TensorRT's per-layer precisions and the plan all keep naming the same node.
    """
    from exporters.quant.ort_passes import int4_nbits_pass

    out = int4_nbits_pass(model, nodes, block_size, qdq=True)
    by_name = {n.name: n for n in out.graph.node}
    for name in nodes:
        renamed = by_name.get(f"{name}_matmul_Q4")
        if renamed is None or name in by_name:
            raise RuntimeError(f"int4 QDQ pass: MatMul {name!r} was not rewritten (is its weight a 2-D initializer?)")
        renamed.name = name
    return out


def dq_gather(model: onnx.ModelProto, node_name: str, fmt: Format, block_size: int, names: NameScope) -> None:
    """Store an embedding table as ``fmt`` and restore it with one DequantizeLinear before the Gather."""
    n, table = embedding_table(model, node_name)
    src = n.input[0]
    if fmt is Format.INT8:
        scale = numerics.int8_weight_scale(table, axis=0).astype(np.float32)
        q = numerics.int8_quantize(table, scale, axis=0)
        data = add_initializer(model, q.astype(np.int8), names.fresh(f"{src}_int8"))
        attrs = {"axis": 0}
    elif fmt is Format.INT4:
        q, scale = numerics.int4_block_quantize(table, block_size, rounding="half_even")
        data = names.fresh(f"{src}_int4")
        model.graph.initializer.append(
            helper.make_tensor(data, TensorProto.INT4, q.shape, numerics.pack_int4(q), raw=True))
        attrs = {"axis": 1, "block_size": block_size}
    elif fmt is Format.FP8:
        scale = np.float32(numerics.fp8_weight_scale(table))
        q = numerics.fp8_quantize(table, scale)
        data = names.fresh(f"{src}_fp8")
        model.graph.initializer.append(
            helper.make_tensor(data, TensorProto.FLOAT8E4M3FN, q.shape, q.view(np.uint8).tobytes(), raw=True))
        attrs = {}
    else:
        raise ValueError(f"dq_gather: {fmt} is not a quantized format (int8, int4, fp8)")
    sc = add_initializer(model, np.asarray(scale, dtype=np.float32), names.fresh(f"{src}_scale"))
    restored = names.fresh(f"{src}_dq")
    dq = helper.make_node("DequantizeLinear", [data, sc], [restored], name=names.fresh(f"{node_name}_table_dq"), **attrs)
    n.input[0] = restored
    insert_before(model, node_name, [dq])


def fold_int32_dequantize(model: onnx.ModelProto) -> list[str]:
    """Replace each ``DequantizeLinear`` of a constant int32 tensor (ORT's quantized biases) by the
    fp32 constant it computes; returns the folded tensors' names.

    TensorRT's Q/DQ layers take int8, fp8 and int4 only; it keeps biases in float and fuses them
    itself. The values are exactly what the DequantizeLinear produced (``(q - zp) * scale`` in
    float32, as ONNX Runtime computes it), so the layer's numbers do not change.
    """
    inits = initializers(model)
    folded: list[str] = []
    for n in list(model.graph.node):
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q_t = inits[n.input[0]]
        if q_t.data_type != TensorProto.INT32 or any(i and i not in inits for i in n.input[1:]):
            continue
        q = onnx.numpy_helper.to_array(q_t).astype(np.int64)
        scale = onnx.numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        zp = onnx.numpy_helper.to_array(inits[n.input[2]]).astype(np.int64) if len(n.input) > 2 and n.input[2] else 0
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and q.ndim > 0 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis % q.ndim] = -1
            scale = scale.reshape(shape)
            zp = np.asarray(zp).reshape(shape) if np.ndim(zp) else zp
        value = ((q - zp).astype(np.float32) * scale).astype(np.float32)
        model.graph.node.remove(n)
        add_initializer(model, value, n.output[0])
        folded.append(n.output[0])
    return folded
