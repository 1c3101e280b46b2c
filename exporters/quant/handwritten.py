"""The forms ONNX Runtime's quantization tools cannot write, written by hand.

Each function rewrites one layer node in place and uses :mod:`exporters.numerics` for every
number it stores, so these paths match the reference numerics by construction (the tests
still check the stored tensors and the run-time output).

* :func:`bf16_layer` / :func:`bf16_gather` - ORT has no bf16 quantizer, and its CPU provider
  has no bf16 MatMul/Gemm/Conv kernels; bf16 is stored as bf16 initializers and emulated
  exactly with Cast pairs (float32 -> bfloat16 -> float32 rounds to nearest even; checked
  that ORT's optimizer keeps the pairs).
* :func:`int4_conv` - MatMulNBits only takes MatMul, and ORT's QDQ blocked quantization only
  takes rank-2 weights; a Conv weight is flattened to [O, I*kh*kw], stored int4 with the
  MatMulNBits block rule, and restored by a blocked DequantizeLinear (opset 21) + Reshape.
* :func:`int8_gather` / :func:`fp8_gather` - MatMulNBitsQuantizer only quantizes Gather to
  4 bits; ORT's GatherBlockQuantized contrib op also takes uint8 (bits=8) and float8 tables,
  so int8 and fp8 embeddings use it directly (dequantizing only the gathered rows).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporters import numerics
from exporters.quant.graph import NameScope, add_initializer, initializers, insert_after, insert_before, node

MS_DOMAIN = "com.microsoft"


def ensure_ms_opset(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(initializers(model)[name]).astype(np.float32)


def _bf16_initializer(model: onnx.ModelProto, array: np.ndarray, name: str) -> str:
    bits = numerics.to_bf16(array).view(np.uint16)
    model.graph.initializer.append(helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, bits.tobytes(), raw=True))
    return name


def _round_trip(src: str, dst: str, names: NameScope) -> list[onnx.NodeProto]:
    """src -> Cast(bf16) -> Cast(fp32) -> dst."""
    mid = names.fresh(f"{src}_bf16")
    return [
        helper.make_node("Cast", [src], [mid], name=names.fresh(f"{mid}_cast"), to=TensorProto.BFLOAT16),
        helper.make_node("Cast", [mid], [dst], name=names.fresh(f"{dst}_cast"), to=TensorProto.FLOAT),
    ]


def bf16_layer(model: onnx.ModelProto, node_name: str, weight_index: int, names: NameScope) -> None:
    """Emulate a bf16 MatMul/Gemm/Conv: bf16 weights and bias, bf16-rounded input and output.

    Weights/bias become bfloat16 initializers + Cast to float (ORT folds that Cast at load
    time; the file keeps half the bytes). The activation input gets its own Cast round trip,
    and so does the output: what TensorRT or torch.autocast compute with bf16 tensors and an
    fp32 accumulator.
    """
    n = node(model, node_name)
    params = [weight_index] + ([2] if n.op_type in ("Gemm", "Conv") and len(n.input) > 2 and n.input[2] else [])
    before: list[onnx.NodeProto] = []
    for idx in params:
        src = n.input[idx]
        w = _weight(model, src)
        b_name = _bf16_initializer(model, w, names.fresh(f"{src}_bf16"))
        f_name = names.fresh(f"{src}_bf16_f32")
        before.append(helper.make_node("Cast", [b_name], [f_name], name=names.fresh(f"{f_name}_cast"), to=TensorProto.FLOAT))
        n.input[idx] = f_name
    act_index = 0 if n.op_type in ("Gemm", "Conv") else 1 - weight_index
    x = n.input[act_index]
    x_r = names.fresh(f"{x}_bf16r")
    before += _round_trip(x, x_r, names)
    n.input[act_index] = x_r
    out = n.output[0]
    acc = names.fresh(f"{out}_fp32acc")
    n.output[0] = acc
    insert_before(model, node_name, before)
    insert_after(model, node_name, _round_trip(acc, out, names))


def bf16_gather(model: onnx.ModelProto, node_name: str, names: NameScope) -> None:
    """bf16 embedding: the table is stored bf16, gathered as bf16, then Cast to float."""
    n = node(model, node_name)
    table = n.input[0]
    n.input[0] = _bf16_initializer(model, _weight(model, table), names.fresh(f"{table}_bf16"))
    out = n.output[0]
    gathered = names.fresh(f"{out}_bf16")
    n.output[0] = gathered
    insert_after(model, node_name, [helper.make_node("Cast", [gathered], [out], name=names.fresh(f"{out}_cast"), to=TensorProto.FLOAT)])


def int4_conv(model: onnx.ModelProto, node_name: str, block_size: int, names: NameScope) -> None:
    """int4 weight-only Conv: blocked DequantizeLinear(int4, axis=1) + Reshape feeding the Conv.

    Blocks run along the flattened reduction axis I*kh*kw of each output channel (the
    im2col K axis, like MatMulNBits' K), with :func:`numerics.int4_block_quantize`'s MLAS
    rule so Linear and Conv layers share one int4 rule.
    """
    n = node(model, node_name)
    w_name = n.input[1]
    w = _weight(model, w_name)
    o = w.shape[0]
    q, scales = numerics.int4_block_quantize(w.reshape(o, -1), block_size, rounding="half_up")
    q_name = names.fresh(f"{w_name}_int4")
    model.graph.initializer.append(helper.make_tensor(q_name, TensorProto.INT4, q.shape, numerics.pack_int4(q), raw=True))
    s_name = add_initializer(model, scales.astype(np.float32), names.fresh(f"{w_name}_int4_scale"))
    shape_name = add_initializer(model, np.array(w.shape, dtype=np.int64), names.fresh(f"{w_name}_shape"))
    flat = names.fresh(f"{w_name}_dq")
    restored = names.fresh(f"{w_name}_dq_reshaped")
    dq = helper.make_node("DequantizeLinear", [q_name, s_name], [flat], name=names.fresh(f"{node_name}_weight_dq"), axis=1, block_size=block_size)
    reshape = helper.make_node("Reshape", [flat, shape_name], [restored], name=names.fresh(f"{node_name}_weight_reshape"))
    n.input[1] = restored
    insert_before(model, node_name, [dq, reshape])


def embedding_table(model: onnx.ModelProto, node_name: str) -> tuple[onnx.NodeProto, np.ndarray]:
    """The Gather node and its fp32 table, refused unless the table is 2-D and gathered on axis 0."""
    n = node(model, node_name)
    table = _weight(model, n.input[0])
    axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), 0)
    if table.ndim != 2 or axis != 0:
        raise NotImplementedError(
            f"Gather {node_name!r}: only 2-D embedding tables gathered on axis 0 can be quantized "
            f"(got table shape {table.shape}, axis {axis}); plan it as fp32"
        )
    return n, table


def _gather_block_quantized(n: onnx.NodeProto, data: str, scales: str, attrs: dict) -> onnx.NodeProto:
    return helper.make_node(
        "GatherBlockQuantized", [data, n.input[1], scales], [n.output[0]], name=n.name, domain=MS_DOMAIN,
        gather_axis=0, quantize_axis=1, **attrs,
    )


def _replace(model: onnx.ModelProto, node_name: str, new: onnx.NodeProto) -> None:
    idx = next(i for i, m in enumerate(model.graph.node) if m.name == node_name)
    del model.graph.node[idx]
    model.graph.node.insert(idx, new)
    ensure_ms_opset(model)


def int8_gather(model: onnx.ModelProto, node_name: str, names: NameScope) -> None:
    """int8 embedding: symmetric per-row int8 (the weight rule with a row as channel).

    Stored as uint8 ``q + 128`` for GatherBlockQuantized(bits=8), whose default uint8 zero
    point is 128; one block per row (block_size = the next power of two >= max(D, 16)).
    """
    n, table = embedding_table(model, node_name)
    scale = numerics.int8_weight_scale(table, axis=0)
    q = numerics.int8_quantize(table, scale, axis=0)
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    d = table.shape[1]
    block = max(16, 1 << (d - 1).bit_length())
    data = add_initializer(model, u, names.fresh(f"{n.input[0]}_uint8"))
    sc = add_initializer(model, scale.reshape(-1, 1).astype(np.float32), names.fresh(f"{n.input[0]}_scale"))
    _replace(model, node_name, _gather_block_quantized(n, data, sc, {"bits": 8, "block_size": block}))


def fp8_gather(model: onnx.ModelProto, node_name: str, names: NameScope) -> None:
    """fp8 embedding: E4M3FN table with ORT's per-tensor fp8 weight scale (std rule)."""
    n, table = embedding_table(model, node_name)
    scale = numerics.fp8_weight_scale(table)
    q = numerics.fp8_quantize(table, scale)
    data = names.fresh(f"{n.input[0]}_fp8")
    model.graph.initializer.append(helper.make_tensor(data, TensorProto.FLOAT8E4M3FN, q.shape, q.view(np.uint8).tobytes(), raw=True))
    sc = add_initializer(model, np.full((1, 1), scale, dtype=np.float32), names.fresh(f"{n.input[0]}_scale"))
    _replace(model, node_name, _gather_block_quantized(n, data, sc, {"block_size": 0}))
