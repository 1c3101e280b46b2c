"""The fp8 parts of the graph that ONNX Runtime's quantizer writes differently from what we deploy.

Split from :mod:`exporters.quant.ort_passes` (which runs ORT's passes): three rewrites of an fp8 QDQ graph,
each documented where it is defined - Q nodes carry their fp8 type in ``output_dtype`` (no zero-point input
that ORT's ReLU fusion would drop), activation scales are amax/448 from the MinMax ranges (not ORT's std
rule), and Gemm/Conv biases are int32 at ``s_x * s_w`` (what ORT's WeightBiasQuantization would round them to
anyway, written so that the graph we measure is the graph ORT runs).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx

from exporters import numerics
from exporters.quant.graph import NameScope, insert_before, is_scalar_init, node, node_index, remove_unused_initializers

log = logging.getLogger(__name__)


def _is_fp8_activation_q(n: onnx.NodeProto, inits: set[str]) -> bool:
    """A QuantizeLinear of a run-time tensor to float8e4m3fn (after :func:`fp8_q_without_zero_point`)."""
    if n.op_type != "QuantizeLinear" or n.input[0] in inits:
        return False
    return any(a.name == "output_dtype" and a.i == onnx.TensorProto.FLOAT8E4M3FN for a in n.attribute)


def fp8_activation_scales_from_minmax(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> int:
    """Set every fp8 activation Q (and the DQs reading it) to ``numerics.fp8_activation_scale``.

    ``ranges``: tensor name -> (rmin, rmax) from ORT's MinMax calibrator. Each rewritten Q
    gets its own scale initializer (a copy if ORT shared one with another node), so that no
    other Q/DQ changes. Returns how many Q nodes were rewritten; an fp8 activation Q whose
    input has no range is an error (the scale would silently stay ORT's std rule).
    """
    init_names = {t.name for t in model.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    taken = set(init_names) | {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    count = 0
    for q in [n for n in model.graph.node if _is_fp8_activation_q(n, init_names)]:
        x = q.input[0]
        if x not in ranges:
            raise RuntimeError(f"fp8 QuantizeLinear {q.name!r}: no MinMax range for its input {x!r}")
        scale = numerics.fp8_activation_scale(*ranges[x])
        dqs = [d for d in users.get(q.output[0], []) if d.op_type == "DequantizeLinear"]
        group = [q] + dqs
        old = q.input[1]
        if any(d.input[1] != old for d in dqs):
            raise RuntimeError(f"fp8 QuantizeLinear {q.name!r}: its DequantizeLinear nodes use another scale")
        if inits[old].dims:
            raise RuntimeError(f"fp8 QuantizeLinear {q.name!r}: expected a per-tensor scale, got shape {list(inits[old].dims)}")
        tensor = onnx.numpy_helper.from_array(np.asarray(scale, dtype=np.float32), old)
        if all(any(u is g for g in group) for u in users[old]):
            inits[old].CopyFrom(tensor)
        else:  # shared with nodes outside this Q/DQ group: give the group its own copy
            name, k = f"{x}_fp8_amax_scale", 0
            while name in taken:
                k += 1
                name = f"{x}_fp8_amax_scale_{k}"
            taken.add(name)
            tensor.name = name
            model.graph.initializer.append(tensor)
            inits[name] = model.graph.initializer[-1]
            for g in group:
                g.input[1] = name
                users[old] = [u for u in users[old] if u is not g]
                users.setdefault(name, []).append(g)
        count += 1
    return count


def fp8_q_without_zero_point(model: onnx.ModelProto) -> int:
    """Turn ``QuantizeLinear(x, s, zp_fp8)`` into ``QuantizeLinear(x, s, output_dtype=fp8)``.

    Same numbers (an fp8 zero point must be 0; opset 21 allows output_dtype instead), but
    it stops ORT's ReluQuantTransformer (level EXTENDED+, checked on 1.32) from deleting a
    Relu in front of the Q: that rule only exempts int8/uint8 zero points that do not clamp
    at zero, so for fp8 (which keeps negative values) it silently drops the Relu - a layer
    after a Relu then sees un-rectified inputs. Returns how many nodes were rewritten.
    """
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[2] not in inits:
            continue
        zp = inits[n.input[2]]
        if zp.data_type != onnx.TensorProto.FLOAT8E4M3FN:
            continue
        if np.asarray(onnx.numpy_helper.to_array(zp), dtype=np.float32).any():
            raise ValueError(f"fp8 QuantizeLinear {n.name!r} has a non-zero zero point")
        del n.input[2]
        n.attribute.append(onnx.helper.make_attribute("output_dtype", onnx.TensorProto.FLOAT8E4M3FN))
        count += 1
    used = {i for m in model.graph.node for i in m.input}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    return count


def _dq_scale(model: onnx.ModelProto, tensor: str, where: str) -> np.float32:
    """The per-tensor scale of the DequantizeLinear producing ``tensor``."""
    inits = {t.name: t for t in model.graph.initializer}
    dq = next((n for n in model.graph.node if tensor in n.output), None)
    if dq is None or dq.op_type != "DequantizeLinear" or not is_scalar_init(inits.get(dq.input[1])):
        raise RuntimeError(f"{where}: input {tensor!r} is not produced by a per-tensor DequantizeLinear")
    return np.float32(onnx.numpy_helper.to_array(inits[dq.input[1]]).reshape(()))


def fp8_int32_biases(model: onnx.ModelProto, nodes: Sequence[str]) -> int:
    """Write the bias of every fp8 Gemm/Conv in ``nodes`` as int32 at ``s_x * s_w`` + DequantizeLinear.

    ORT's fp8 QDQ leaves the bias fp32 (``bias_quantized -> Cast(float) -> bias``); the session's
    CastElimination then makes it a plain initializer, and WeightBiasQuantization rounds it to
    int32 at ``s_x * s_w`` wherever the layer's output leads to a QuantizeLinear - so what ran
    depended on the *next* layer. Here it is rounded once, for every fp8 Gemm/Conv, by
    :func:`exporters.numerics.int8_bias_quantize` (``s_x`` = the fp8 activation scale, ``s_w`` =
    the fp8 weight scale, both per tensor; rne in float64, saturating to int32), and written as
    ``DQ(int32, s_x * s_w)``: a bias that is not an initializer, which the transformer skips.
    Returns how many biases were rewritten.
    """
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    names = NameScope(model)
    todo = [(n.name, n.op_type, list(n.input)) for n in model.graph.node
            if n.name in set(nodes) and n.op_type in ("Gemm", "Conv") and len(n.input) > 2 and n.input[2]]
    for layer, op, inputs in todo:
        where = f"fp8 {op} {layer!r}"
        bias = inputs[2]
        if bias in inits:
            source = bias
        else:
            cast = producer.get(bias)
            if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits:
                raise RuntimeError(f"{where}: bias {bias!r} is neither an initializer nor a Cast of one")
            source = cast.input[0]
        b = onnx.numpy_helper.to_array(inits[source]).astype(np.float32)
        if b.ndim != 1:
            raise RuntimeError(f"{where}: expected a 1-D bias, got shape {list(b.shape)}")
        s_x = _dq_scale(model, inputs[0], where)
        s_w = _dq_scale(model, inputs[1], where)
        q, s = numerics.int8_bias_quantize(b, s_x, s_w)
        if np.any(np.abs(np.rint(b.astype(np.float64) / np.float64(s))) > np.iinfo(np.int32).max):
            log.warning("%s: bias saturates int32 at scale s_x*s_w = %g", where, float(s))
        q_name = names.fresh(f"{bias}_int32")
        s_name = names.fresh(f"{bias}_int32_scale")
        out = names.fresh(f"{bias}_int32_DequantizeLinear_Output")
        model.graph.initializer.append(onnx.numpy_helper.from_array(q.astype(np.int32), q_name))
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(s, dtype=np.float32).reshape(()), s_name))
        dq = onnx.helper.make_node("DequantizeLinear", [q_name, s_name], [out], name=names.fresh(f"{bias}_int32_DequantizeLinear"))
        insert_before(model, layer, [dq])
        node(model, layer).input[2] = out
    if todo:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n.name for n in model.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        for name in dead:  # ORT's float Casts of the old fp32 biases
            del model.graph.node[node_index(model, name)]
        remove_unused_initializers(model)
    return len(todo)
