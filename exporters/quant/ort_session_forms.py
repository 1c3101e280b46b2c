"""The written graph in the forms ONNX Runtime's session runs as written, for the ``ort`` target.

The passes in :mod:`exporters.quant.ort_passes` write what ORT's quantizers write; a default ORT
session then rewrites some of it at load time, or fails to fuse some of it into integer kernels.
This module writes those shapes the way ORT would run them, with the same numbers bit for bit, so
the per-layer report is what runs (``pipeline.backends.ort_kernels.observe_kernels`` checks it).

Two more session-time rewrites meet the QDQ graph, and both are pre-empted in the written graph
(ORT target only, numerically neutral, :func:`pre_empt_session_rewrites`):

* ``MatMulAddFusion`` turns ``MatMul`` + ``Add`` (1-D bias ``[N]``) into a Gemm - for an input
  of rank 3 or more with static shapes, as ``Reshape -> Gemm -> Reshape``. That Gemm is then
  one WeightBiasQuantization may re-round, and its ``gemm_input_reshape`` is one the DQ
  propagation below runs through. Gemm's bias must be ``[N]`` when the input needs the
  reshape, so such a bias is written ``[1, N]`` (same broadcast, same sums):
  :func:`block_nd_matmul_add_fusion`. (A 2-D MatMul + Add is fused whatever the bias shape;
  the Keras exporter writes those as Gemm in the first place,
  ``pipeline.models.keras_adapter.fold_dense_bias``.)
* ``QDQPropagationTransformer`` copies a scalar int8 activation ``DequantizeLinear`` forward
  through Reshape/Transpose/Squeeze/Unsqueeze/Slice/MaxPool as a new ``Q -> DQ`` pair, and
  in onnxruntime 1.32 the new Q carries ``output_dtype=INT8``; ``QDQS8ToU8Transformer``
  (level EXTENDED+, x86) then makes its zero point uint8 without touching ``output_dtype``,
  and the session refuses to load ("QuantizeLinear output_dtype INT8 does not match
  y_zero_point type UINT8"; seen on a Keras Conv1D - Conv between Unsqueeze and Squeeze -
  and on fixed-shape 3-D int8 MatMuls through MatMulAddFusion's Reshape). The propagation
  skips an edge that already ends in a QuantizeLinear, so those pairs are written here,
  without ``output_dtype``: :func:`propagate_int8_dq_forward`. A tensor on the int8 grid
  re-quantizes to itself, so the values are the same bit for bit.

Two more shapes of the QDQ graph kept ORT's x86 CPU from fusing an int8-static layer into its integer
kernel, so the layer ran in float on dequantized int8 (what ``pipeline.backends.ort_kernels.observe_kernels``
reported); both are rewritten in the written graph (ORT target only, numerically neutral, read from
the 1.32 sources in ``onnxruntime/core/optimizer/qdq_transformer``):

* A Relu (or constant Clip) right after an int8 MatMul/Gemm: ``GetQDQSelection`` looks past the
  layer at it and drops the whole group unless the Q after it makes it redundant, which with
  symmetric int8 (zero point 0, not the type minimum) it never does - so no QGemm /
  MatMulIntegerToFloat, and GemmActivationFusion then built a float FusedGemm. Written as
  ``Max(x, 0)`` (``Min(Max(x, lo), hi)``), the same function: :func:`relu_after_int8_layer_as_max`.
* Several int8 layers reading one activation ``Q -> DQ`` (query/key/value): ORT copies the DQ per
  layer, the Q then has several output edges, ``QDQS8ToU8Transformer`` (which wants a single
  ``Q -> DQ`` edge) leaves it int8, and the MatMul/Conv selectors refuse int8 activations on x86
  (``QDQIsInt8Allowed()``). Each layer gets its own pair of the same tensor with the same scale
  and zero point: :func:`split_shared_int8_quantizers`. That cannot help an int8 *Conv* whose
  quantized output feeds several readers (its output Q must stay its only one for QLinearConv, so
  the same S8->U8 rule leaves it, and its readers, in float): every ResNet block's residual.

Shared and branching pairs are solved at the root by ``quantize_model(..., uint8_activations=True)``
(ORT target, for the ORT CPU backend): every symmetric int8 activation pair is written as ORT's
S8->U8 conversion would make it, uint8 with zero point 128 and the same scale (:func:`int8_activations_as_uint8`; the same
values bit for bit, so QAT needs no change). The x86 selectors take uint8 activations with int8
weights (``ConvNodeGroupSelector`` wants input and output Q of one type and refuses only *int8*
input there; ``GemmNodeGroupSelector`` / ``MatMulNodeGroupSelector`` likewise, in
``qdq_selectors.cc``), however many readers the pair has, so the split is then left out. Relu/Clip
handling is unchanged: ``ReluQuantFusion`` drops a Relu only when the Q's zero point is the type's
minimum (``MinUpper(scale, zp) >= 0``), and 128 is not uint8's minimum any more than 0 is int8's,
so :func:`relu_after_int8_layer_as_max` is still needed. Weights stay signed int8 per channel
(symmetric), biases int32. Not the default, because the ``ort`` target also feeds ORT's TensorRT
execution provider, and TensorRT takes signed Q/DQ with zero point 0 only.

Checked on every plan shape in ``tests/exporters/test_ort_session_rewrites.py``: the default
session's optimized graph equals the one with WeightBiasQuantization disabled, and every
artifact loads with the options the ORT CPU backend measures with.
"""

from __future__ import annotations

import numpy as np
import onnx

from exporters.quant.graph import NameScope, insert_after, insert_before, node, remove_unused_initializers
from exporters.quant.graph import is_scalar_init
from exporters.quant.ort_passes import DQ_PROPAGATES_THROUGH, _copy_value_info


# --------------------------------------------------------------------------- other session rewrites
def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor with a recorded shape (value_info, graph inputs and outputs)."""
    out = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = len(t.shape.dim)
    return out


def block_nd_matmul_add_fusion(model: onnx.ModelProto, ranks: dict[str, int]) -> int:
    """Write the ``[N]`` bias of a MatMul + Add whose output has rank >= 3 as ``[1, N]``.

    ORT's MatMulAddFusion only fuses such a pair (through Reshapes) when the bias is ``[N]``;
    ``[1, N]`` broadcasts to the same sums for any output of rank >= 2, so the layer stays
    the MatMul + Add that was written (see the module doc). ``ranks``: tensor -> rank, from
    shape inference on the graph before the passes (MatMul outputs keep their names).
    Returns how many biases were rewritten.
    """
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    names = NameScope(model)
    count = 0
    for mm in [n for n in model.graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")]:
        y = mm.output[0]
        users = readers.get(y, [])
        if y in outputs or len(users) != 1 or users[0].op_type != "Add" or ranks.get(y, 0) < 3:
            continue
        add = users[0]
        if len(add.input) != 2 or list(add.input).count(y) != 1:
            continue
        k = 1 if add.input[0] == y else 0
        b = inits.get(add.input[k])
        if b is None or len(b.dims) != 1:
            continue
        arr = onnx.numpy_helper.to_array(b)
        tensor = onnx.numpy_helper.from_array(arr.reshape(1, -1), names.fresh(f"{add.input[k]}_row"))
        model.graph.initializer.append(tensor)
        add.input[k] = tensor.name
        count += 1
    if count:
        remove_unused_initializers(model)
    return count


def _int8_scalar_qparams(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Q/DQ with constant scalar scale and an int8 scalar zero point (what QDQS8ToU8 converts)."""
    if len(n.input) < 3 or not is_scalar_init(inits.get(n.input[1])) or not is_scalar_init(inits.get(n.input[2])):
        return False
    return inits[n.input[2]].data_type == onnx.TensorProto.INT8


def propagate_int8_dq_forward(model: onnx.ModelProto) -> int:
    """Write the ``Q -> DQ`` pairs ORT's QDQPropagation would insert after an int8 activation DQ.

    For a scalar int8 ``DequantizeLinear`` read by exactly one node that the propagation moves
    through (:data:`DQ_PROPAGATES_THROUGH`, first input), that node's output gets
    ``QuantizeLinear -> DequantizeLinear`` with the same scale and zero point, read by every
    consumer that is not a QuantizeLinear already (the edges ORT would pair); repeated down
    the chain. No ``output_dtype`` on the new Q: ORT's own copy carries one that its S8->U8
    conversion leaves stale (see the module doc). Returns how many pairs were written.
    """
    count = 0
    names = NameScope(model)
    for _ in range(len(model.graph.node) + 1):  # one pair per round; chains end
        inits = {t.name: t for t in model.graph.initializer}
        outputs = {o.name for o in model.graph.output}
        nodes = list(model.graph.node)
        edges: dict[str, list[int]] = {}
        for j, n in enumerate(nodes):
            for i in n.input:
                if i:
                    edges.setdefault(i, []).append(j)  # one entry per input slot: ORT counts edges
        todo = None
        for d in nodes:
            if d.op_type != "DequantizeLinear" or d.input[0] in inits or not _int8_scalar_qparams(d, inits):
                continue
            out = d.output[0]
            users = edges.get(out, [])
            if out in outputs or len(users) != 1:
                continue
            pi = users[0]
            p = nodes[pi]
            if p.op_type not in DQ_PROPAGATES_THROUGH or p.domain not in ("", "ai.onnx") or p.input[0] != out:
                continue
            if not p.output or p.output[0] in outputs:
                continue
            targets = sorted({j for j in edges.get(p.output[0], []) if nodes[j].op_type != "QuantizeLinear"})
            if targets:
                todo = (d, pi, targets)
                break
        if todo is None:
            break
        d, pi, targets = todo
        t = nodes[pi].output[0]
        q_out, dq_out = names.fresh(f"{t}_int8_q"), names.fresh(f"{t}_int8_dq")
        q = onnx.helper.make_node("QuantizeLinear", [t, d.input[1], d.input[2]], [q_out], name=names.fresh(f"{t}_QuantizeLinear"))
        dq = onnx.helper.make_node("DequantizeLinear", [q_out, d.input[1], d.input[2]], [dq_out], name=names.fresh(f"{t}_DequantizeLinear"))
        for j in targets:
            u = model.graph.node[j]
            for k, i in enumerate(u.input):
                if i == t:
                    u.input[k] = dq_out
        model.graph.node.insert(pi + 1, q)
        model.graph.node.insert(pi + 2, dq)
        _copy_value_info(model, t, dq_out)
        count += 1
    return count


# --------------------------------------------------------------------------- integer-kernel fusions
INT8_LAYER_OPS = ("MatMul", "Gemm", "Conv")
"""Ops ORT fuses with their int8 DequantizeLinear inputs into an integer kernel (MatMulIntegerToFloat /
QLinearMatMul, QGemm, QLinearConv)."""


def _has_output_dtype(n: onnx.NodeProto) -> bool:
    return any(a.name == "output_dtype" for a in n.attribute)


def _is_int8_qdq_layer(n: onnx.NodeProto, producer: dict, inits: dict) -> bool:
    """A MatMul/Gemm/Conv every input of which is a DequantizeLinear of int8 data (activation,
    weight) or int32 data (bias): an int8-static layer as the int8 pass writes it."""
    if n.op_type not in INT8_LAYER_OPS or n.domain not in ("", "ai.onnx"):
        return False
    for t in (i for i in n.input if i):
        d = producer.get(t)
        if d is None or d.op_type != "DequantizeLinear":
            return False
        typed = d.input[0] if d.input[0] in inits else (d.input[2] if len(d.input) > 2 else "")
        if typed not in inits or inits[typed].data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.INT32):
            return False
    return True


def split_shared_int8_quantizers(model: onnx.ModelProto) -> int:
    """Give every int8 layer reading a shared activation ``Q -> DQ`` its own pair.

    quantize_static writes one ``QuantizeLinear -> DequantizeLinear`` per tensor, read by every
    int8 layer that takes the tensor (MiniLM's query/key/value). At session time ORT copies the
    DQ per consumer (``EnsureUniqueDQForNodeUnit``), so the Q then has one output edge per layer;
    ``QDQS8ToU8Transformer`` (x86) only converts a Q whose single edge goes to a DQ
    (``CheckOutputEdges(graph, q, 1)`` in ``qdq_s8_to_u8.cc``), and the MatMul / Conv selectors
    refuse int8 activations on x86 (``QDQIsInt8Allowed()`` is false off ARM), so those layers ran as
    float MatMuls on dequantized int8. Here each such layer but one reads its own ``Q -> DQ`` of
    the same tensor with the same scale and zero point (bit for bit the same values). The copies
    get their own zero-point initializers: ORT's CommonSubexpressionElimination would merge Qs with
    identical inputs back into one, and its ConstantSharing only shares float/int32/int64 scalars,
    so the int8 zero points keep them apart.

    Skipped: a Q of a Conv's output (the int8 Conv's own output quantizer; QLinearConv needs it to
    be the Conv's only Q - such a branching Conv output is left as it is), per-axis (shield) pairs,
    fp8 pairs, and pairs whose DQ is a graph output. Returns how many pairs were written.
    """
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in dict.fromkeys(x for x in n.input if x):
            readers.setdefault(i, []).append(n)
    names = NameScope(model)
    todo: list[tuple[str, str, list[str]]] = []  # (q name, dq name, layer nodes to move)
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits or _has_output_dtype(q):
            continue
        if not _int8_scalar_qparams(q, inits) or q.output[0] in outputs:
            continue
        p = producer.get(q.input[0])
        if p is not None and p.op_type in ("Conv", "ConvTranspose"):
            continue
        q_users = readers.get(q.output[0], [])
        if len(q_users) != 1 or q_users[0].op_type != "DequantizeLinear":
            continue
        dq = q_users[0]
        if dq.output[0] in outputs or list(dq.input[1:3]) != list(q.input[1:3]):
            continue
        users = readers.get(dq.output[0], [])
        layers = [u for u in users if _is_int8_qdq_layer(u, producer, inits)]
        if len(users) < 2 or not layers:
            continue
        moved = layers[1:] if len(layers) == len(users) else layers  # the others keep the original pair
        todo.append((q.name, dq.name, [u.name for u in moved]))
    count = 0
    for q_name, dq_name, layers in todo:
        q, dq = node(model, q_name), node(model, dq_name)
        x, scale, zp, shared = q.input[0], q.input[1], q.input[2], dq.output[0]
        for layer in layers:
            s_name, z_name = names.fresh(f"{scale}_{layer}"), names.fresh(f"{zp}_{layer}")
            for src, dst in ((scale, s_name), (zp, z_name)):
                t = onnx.TensorProto()
                t.CopyFrom(inits[src])
                t.name = dst
                model.graph.initializer.append(t)
            q_out, dq_out = names.fresh(f"{x}_int8_split_q_{layer}"), names.fresh(f"{x}_int8_split_dq_{layer}")
            new_q = onnx.helper.make_node("QuantizeLinear", [x, s_name, z_name], [q_out], name=names.fresh(f"{q_name}_{layer}"))
            new_dq = onnx.helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out],
                                           name=names.fresh(f"{dq_name}_{layer}"))
            insert_before(model, layer, [new_q, new_dq])
            n = node(model, layer)
            for k, i in enumerate(n.input):
                if i == shared:
                    n.input[k] = dq_out
            _copy_value_info(model, shared, dq_out)
            count += 1
    return count


def relu_after_int8_layer_as_max(model: onnx.ModelProto) -> int:
    """Write a Relu (or Clip) that directly follows an int8 QDQ MatMul/Gemm as ``Max(x, 0)`` (``Min(Max(x, lo), hi)``).

    ORT's QDQ selectors look one node past the layer (``NodeGroupSelector::GetQDQSelection`` in
    ``qdq_selectors.cc``): when the layer's only consumer is a Relu/Clip with one output edge that
    is not a graph output, they require that Relu/Clip to be followed by a single Q that makes it
    redundant (``IsClipMadeRedundantByQ`` in ``qdq_util.cc``: a Relu only when the Q's zero point is
    the type's minimum, i.e. asymmetric; a Clip only when its range covers the Q's whole range) and
    otherwise reject the whole group. With symmetric int8 activations (zero point 0) an int8
    Gemm/MatMul followed by a Relu was therefore never fused into QGemm / MatMulIntegerToFloat, and
    GemmActivationFusion then made it a float FusedGemm on dequantized int8. ``Max(x, 0)`` is the
    same function bit for bit (Relu is ``max(x, 0)``; a Clip with constant bounds is
    ``min(max(x, lo), hi)``), and no selector looks at it, so the layer fuses with an fp32 output and
    the Max runs after it.

    "int8 QDQ MatMul/Gemm": every input is a DequantizeLinear of an int8 tensor (activation, weight)
    or an int32 one (bias), as the int8-static pass writes them. A Clip is rewritten only when its
    bounds are scalar initializers (or absent). Returns how many Relu/Clip nodes were rewritten.
    """
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    edges: dict[str, int] = {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                edges[i] = edges.get(i, 0) + 1
        for i in dict.fromkeys(x for x in n.input if x):
            readers.setdefault(i, []).append(n)

    def constant_bounds(c: onnx.NodeProto) -> bool:
        bounds = [b for b in c.input[1:3] if b]
        return bool(bounds) and all(b in inits and is_scalar_init(inits[b]) for b in bounds)

    acts = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or not _is_int8_qdq_layer(n, producer, inits):
            continue
        y = n.output[0]
        users = readers.get(y, [])
        if y in outputs or edges.get(y, 0) != 1 or users[0].op_type not in ("Relu", "Clip"):
            continue
        a = users[0]
        if a.domain not in ("", "ai.onnx") or a.output[0] in outputs or edges.get(a.output[0], 0) != 1:
            continue  # ORT only looks past a Relu/Clip with exactly one output edge
        if a.op_type == "Clip" and not constant_bounds(a):
            continue
        acts.append(a.name)
    if not acts:
        return 0
    names = NameScope(model)
    zero = None
    for name in acts:
        a = node(model, name)
        if a.op_type == "Relu":
            if zero is None:
                zero = names.fresh("relu_as_max_zero")
                model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((), dtype=np.float32), zero))
            a.op_type = "Max"
            a.input.append(zero)
            continue
        x, lo, hi = a.input[0], (a.input[1] if len(a.input) > 1 else ""), (a.input[2] if len(a.input) > 2 else "")
        y = a.output[0]
        del a.input[:]
        if lo and hi:
            mid = names.fresh(f"{y}_max")
            a.op_type = "Max"
            a.input.extend([x, lo])
            a.output[0] = mid
            insert_after(model, name, [onnx.helper.make_node("Min", [mid, hi], [y], name=names.fresh(f"{name}_min"))])
        else:
            a.op_type = "Max" if lo else "Min"
            a.input.extend([x, lo or hi])
    return len(acts)


UINT8_ACTIVATION_ZERO_POINT = 128
"""Zero point of the ORT target's stored int8-static activations: ``q_u8 = q_s8 + 128``."""


def int8_activations_as_uint8(model: onnx.ModelProto) -> int:
    """Store every symmetric int8 activation ``QuantizeLinear -> DequantizeLinear`` as uint8, zero point 128.

    Same scale, same values bit for bit: ``QuantizeLinear`` gives ``sat_u8(rne(x/s) + 128)`` =
    ``sat_s8(rne(x/s)) + 128`` (the saturation ranges [0, 255] and [-128, 127] map onto each other)
    and ``DequantizeLinear`` gives ``(q_u8 - 128) * s`` = ``q_s8 * s``. It is what ORT's x86
    ``QDQS8ToU8Transformer`` (``qdq_s8_to_u8.cc``) does at session time, but that transformer only
    converts a ``Q`` whose single output edge goes to a ``DQ`` (``CheckOutputEdges(graph, q, 1)``)
    and the x86 QDQ selectors refuse int8 activations (``QDQIsInt8Allowed()``), so an int8 Conv
    whose quantized output has several readers (a ResNet block's residual) stayed int8 and it and
    its readers ran in float on dequantized int8. Written uint8, no conversion is needed.

    Converted: a ``QuantizeLinear`` of a run-time tensor (not an initializer) with a scalar scale
    initializer, a scalar int8 zero point equal to 0 and no ``output_dtype``, whose output is not a
    graph output and is read only by ``DequantizeLinear`` nodes with the same scale and zero point;
    the Q and those DQs get a uint8 zero point 128 (one new initializer per old zero point, so
    pairs kept apart by their own zero points - :func:`split_shared_int8_quantizers` - stay apart).
    Weights (initializer inputs), per-axis pairs (the shields), fp8 and int32 DQs are untouched.
    Returns how many Q nodes were converted.
    """
    inits = {t.name: t for t in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in dict.fromkeys(x for x in n.input if x):
            readers.setdefault(i, []).append(n)
    names = NameScope(model)
    new_zp: dict[str, str] = {}
    converted: set[str] = set()
    count = 0
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or q.input[0] in inits:
            continue
        if _has_output_dtype(q) or not _int8_scalar_qparams(q, inits) or q.output[0] in outputs:
            continue
        if onnx.numpy_helper.to_array(inits[q.input[2]]).reshape(()) != 0:
            continue
        dqs = readers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.domain not in ("", "ai.onnx")
                          or d.input[0] != q.output[0] or list(d.input[1:3]) != list(q.input[1:3]) for d in dqs):
            continue
        old = q.input[2]
        if old not in new_zp:
            new_zp[old] = names.fresh(f"{old}_uint8")
            zp = np.full(list(inits[old].dims), UINT8_ACTIVATION_ZERO_POINT, dtype=np.uint8)  # same shape: () or [1]
            model.graph.initializer.append(onnx.numpy_helper.from_array(zp, new_zp[old]))
        for n in [q, *dqs]:
            n.input[2] = new_zp[old]
        converted.add(q.output[0])
        count += 1
    for v in model.graph.value_info:  # the quantized tensors' recorded type
        if v.name in converted and v.type.tensor_type.elem_type == onnx.TensorProto.INT8:
            v.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    if count:
        remove_unused_initializers(model)
    return count


def pre_empt_session_rewrites(model: onnx.ModelProto, ranks: dict[str, int],
                              uint8_activations: bool = False) -> dict[str, int]:
    """The rewrites of the module doc on the finished ORT artifact; returns what each changed.

    The shared quantizers are split before the DQ propagation is written, so that a pair the split
    writes is seen by it like any other. ``uint8_activations``: store the int8 activation pairs as
    uint8 (:func:`int8_activations_as_uint8`, last: the other rewrites read int8 pairs); the split
    is then left out - it only works around the S8->U8 conversion, which uint8 pairs do not need
    (several int8 layers reading one uint8 pair each get their integer kernel, checked in
    ``tests/pipeline/backends/test_ort_kernels.py``)."""
    changed = {"matmul_add_bias_rows": block_nd_matmul_add_fusion(model, ranks),
               "split_int8_quantizers": 0 if uint8_activations else split_shared_int8_quantizers(model),
               "int8_dq_pairs": propagate_int8_dq_forward(model),
               "relu_as_max": relu_after_int8_layer_as_max(model)}
    if uint8_activations:
        changed["uint8_activations"] = int8_activations_as_uint8(model)
    return changed
