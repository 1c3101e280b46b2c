"""Small ONNX graph surgery used around ONNX Runtime's quantizers.

ORT's quantizers work per node but touch tensors globally: the QDQ quantizer rewires *every*
consumer of a quantized activation or weight to the DequantizeLinear output, and
MatMulNBits/MatMulInteger only exist for MatMul. A per-layer mixed plan therefore needs a few
rewrites first, all here, all numerically neutral:

* :func:`make_weight_private` - a weight initializer shared by several nodes is copied, so
  quantizing one layer cannot change another.
* :func:`isolate_inputs` - an Identity gives a group of layers their own copy of a shared
  activation tensor, so fp32 (or differently quantized) consumers keep the float tensor.
* :func:`gemm_to_matmul` - Gemm -> MatMul (+ Add) so MatMulNBits / MatMulInteger apply.

Nodes are always addressed by name: protobuf message references go stale when a repeated
field is rebuilt, so no function here keeps one across a mutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

TARGET_OPSET = 21
"""Opset of every artifact: int4 tensors and blocked DequantizeLinear need 21 (IR >= 10)."""


def ensure_opset(model: onnx.ModelProto, opset: int = TARGET_OPSET) -> onnx.ModelProto:
    """Convert the default-domain opset up to ``opset`` (never down); IR version >= 10."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None:
        raise ValueError("reference ONNX has no default-domain opset import; re-export the model")
    if current < opset:
        try:
            model = onnx.version_converter.convert_version(model, opset)
        except Exception as exc:  # the converter raises bare RuntimeErrors
            raise ValueError(
                f"could not convert the reference ONNX from opset {current} to {opset} ({exc}); "
                f"export the model with opset_version={opset}"
            ) from None
    if model.ir_version < 10:
        model.ir_version = 10
    return model


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if n.name == name:
            return n
    raise KeyError(f"no node named {name!r} in the graph")


def node_index(model: onnx.ModelProto, name: str) -> int:
    for i, n in enumerate(model.graph.node):
        if n.name == name:
            return i
    raise KeyError(f"no node named {name!r} in the graph")


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def consumers(model: onnx.ModelProto, tensor: str) -> list[str]:
    """Names of the nodes reading ``tensor`` (a node reading it twice is listed once)."""
    return [n.name for n in model.graph.node if tensor in n.input]


def is_graph_output(model: onnx.ModelProto, tensor: str) -> bool:
    return any(o.name == tensor for o in model.graph.output)


class NameScope:
    """Fresh tensor/node names that cannot collide with anything already in the graph."""

    def __init__(self, model: onnx.ModelProto):
        self.used: set[str] = {t.name for t in model.graph.initializer}
        self.used |= {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
        for n in model.graph.node:
            self.used.add(n.name)
            self.used.update(n.input)
            self.used.update(n.output)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name = f"{base}_{i}"
            i += 1
        self.used.add(name)
        return name


def add_initializer(model: onnx.ModelProto, array: np.ndarray, name: str) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def remove_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)


def insert_before(model: onnx.ModelProto, anchor: str, new_nodes: Sequence[onnx.NodeProto]) -> None:
    """Insert nodes just before node ``anchor`` so the node list stays topologically sorted."""
    idx = node_index(model, anchor)
    for k, n in enumerate(new_nodes):
        model.graph.node.insert(idx + k, n)


def insert_after(model: onnx.ModelProto, anchor: str, new_nodes: Sequence[onnx.NodeProto]) -> None:
    idx = node_index(model, anchor)
    for k, n in enumerate(new_nodes):
        model.graph.node.insert(idx + 1 + k, n)


def make_weight_private(model: onnx.ModelProto, node_name: str, index: int, names: NameScope) -> str:
    """Give a node its own copy of the initializer at input ``index`` if anything else reads it.

    Every ORT quantizer replaces an initializer for all its consumers, and tied weights (an
    embedding shared with an output projection) may get two formats. Returns the name the
    node now reads.
    """
    n = node(model, node_name)
    name = n.input[index]
    inits = initializers(model)
    if name not in inits:
        raise ValueError(f"node {node_name!r} input {index} ({name!r}) is not an initializer")
    readers = sum(1 for m in model.graph.node for i in m.input if i == name)
    shared = readers > 1 or is_graph_output(model, name) or any(i.name == name for i in model.graph.input)
    if not shared:
        return name
    copy = onnx.TensorProto()
    copy.CopyFrom(inits[name])
    copy.name = names.fresh(f"{name}__{node_name}")
    model.graph.initializer.append(copy)
    node(model, node_name).input[index] = copy.name
    return copy.name


def isolate_inputs(model: onnx.ModelProto, tensor: str, group: Sequence[str], index: int, tag: str, names: NameScope) -> None:
    """Route a group of layers through a private Identity copy of a shared input tensor.

    ``group`` are the names of the layer nodes (one quantization kind, ``tag``) reading
    ``tensor`` at input ``index``. When any other node or a graph output also reads the
    tensor, the group gets ``tensor -> Identity -> tensor__<tag>`` and only the group is
    rewired, so ORT's QDQ pass (which rewires *all* consumers of a tensor it quantizes) leaves
    the other readers in float. ORT drops the Identity when it loads the model.
    """
    others = [c for c in consumers(model, tensor) if c not in set(group)]
    if not others and not is_graph_output(model, tensor):
        return
    new = names.fresh(f"{tensor}__{tag}")
    ident = helper.make_node("Identity", [tensor], [new], name=names.fresh(f"{new}_isolate"))
    first = min(group, key=lambda g: node_index(model, g))
    insert_before(model, first, [ident])
    for g in group:
        n = node(model, g)
        if n.input[index] == tensor:
            n.input[index] = new


def attr(n: onnx.NodeProto, name: str, default):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def gemm_to_matmul(model: onnx.ModelProto, node_name: str, names: NameScope) -> None:
    """Rewrite ``Gemm(A, B, C)`` as ``MatMul(A, B') [+ Add(C')]`` in place.

    B' = alpha * (B^T if transB else B) is stored as a new [K, N] initializer; C' = beta * C.
    The MatMul keeps the Gemm's node name (so plans and nodes_to_quantize still find it) and
    the last new node keeps the Gemm's output tensor. transA=1 is refused (no exporter emits
    it for a Linear layer).
    """
    g = node(model, node_name)
    if g.op_type != "Gemm":
        raise ValueError(f"gemm_to_matmul got a {g.op_type} node ({node_name!r})")
    if attr(g, "transA", 0):
        raise NotImplementedError(f"Gemm {node_name!r} has transA=1; only transA=0 can become a MatMul")
    alpha = float(attr(g, "alpha", 1.0))
    beta = float(attr(g, "beta", 1.0))
    inits = initializers(model)
    w = numpy_helper.to_array(inits[g.input[1]]).astype(np.float32)
    if attr(g, "transB", 0):
        w = w.T
    if alpha != 1.0:
        w = w * np.float32(alpha)
    w_name = add_initializer(model, np.ascontiguousarray(w), names.fresh(f"{g.input[1]}_kn"))
    out = g.output[0]
    has_bias = len(g.input) > 2 and g.input[2] != ""
    mm_out = names.fresh(f"{out}_matmul") if has_bias else out
    new_nodes = [helper.make_node("MatMul", [g.input[0], w_name], [mm_out], name=node_name)]
    if has_bias:
        bias = g.input[2]
        if beta != 1.0:
            if bias not in inits:
                raise NotImplementedError(f"Gemm {node_name!r}: beta={beta} with a non-constant C")
            c = numpy_helper.to_array(inits[bias]).astype(np.float32) * np.float32(beta)
            bias = add_initializer(model, c, names.fresh(f"{bias}_beta"))
        new_nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=names.fresh(f"{node_name}_bias")))
    idx = node_index(model, node_name)
    del model.graph.node[idx]
    for k, n in enumerate(new_nodes):
        model.graph.node.insert(idx + k, n)
    remove_unused_initializers(model)


def is_scalar_init(t: onnx.TensorProto | None) -> bool:
    """ORT's ``optimizer_utils::IsScalar``: rank 0, or rank 1 of length 1."""
    return t is not None and (len(t.dims) == 0 or list(t.dims) == [1])
