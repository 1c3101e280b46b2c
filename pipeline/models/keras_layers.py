"""The Keras layer table: every quantizable Keras layer tied to one ONNX node and weight.

Quantizable: ``Dense``, ``EinsumDense``, ``Conv1D``, ``Conv2D``, ``DepthwiseConv2D``,
``SeparableConv2D`` (two rows, ``<name>/depthwise`` and ``<name>/pointwise``: two ONNX Convs)
and ``Embedding``. The mapping is by **weight content**: tf2onnx stores kernels
transposed/reshaped (Conv2D HWIO -> OIHW, Conv1D -> OI1K, EinsumDense reshaped for a MatMul),
so the fingerprint is the sorted multiset of values, which any layout change keeps. The TF
name scope (``functional_1/<layer>_1/MatMul``) breaks ties between layers with identical
values. Matched nodes and weights are renamed after the Keras layer (``<layer>`` and
``<layer>/kernel``) so artifacts read like the model.

Folding: tf2onnx folds a BatchNormalization that follows a Conv2D into it (the ONNX weight,
``.../<conv>_1/convolution/merged_input``, is ``W * gamma / sqrt(var + eps)``), so its values
change. Layers left unmatched by content are then tied to the remaining nodes by structure:
the kernel in ONNX layout rescaled per output channel (:func:`pipeline.layers.scaled_axis`),
and the weight or node named in the layer's TF scope. The row records the folded layer.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.layers import (
    Layer,
    LayerTable,
    UnquantizedModule,
    choose_candidate,
    folded_reason,
    scaled_axis,
    unquantized_reason,
)

# ONNX op -> which inputs may hold the layer's weight.
QUANT_OPS = {"MatMul": (1, 0), "Gemm": (1,), "Conv": (1,), "Einsum": (1, 0), "Gather": (0,)}


@dataclass
class _KerasLayer:
    name: str  # table name: the Keras layer name (qualified only if names repeat in nested models)
    layer_name: str  # the Keras layer name, for TF name-scope tie-breaks
    kind: str
    module_type: str
    weight: np.ndarray  # float32 kernel in Keras layout
    weight_attr: str  # "kernel", "embeddings", or a SeparableConv's "depthwise_kernel"/"pointwise_kernel"
    macs: int | None = None  # per sample, where the output shape is static
    layer: Any = None  # the keras.layers.Layer itself


def _macs(layer, kind: str, weight: np.ndarray) -> int | None:
    """Multiply-accumulates per sample: kernel size x output positions (Dense/Conv), from the
    layer's symbolic output shape; None where it is unknown (dynamic dims, subclassed models)."""
    if kind == "embedding":
        return None
    try:
        shape = tuple(layer.output.shape)[1:]
    except Exception:  # noqa: BLE001 - layers outside a functional graph have no symbolic output
        shape = None
    if kind == "linear" and type(layer).__name__ == "Dense":
        positions = shape[:-1] if shape is not None else ()
    elif kind == "conv" and shape is not None:
        positions = shape[:-1]  # channels-last spatial dims
    else:
        return int(weight.size) if kind == "linear" else None
    if any(d is None for d in positions):
        return int(weight.size) if kind == "linear" else None
    return int(weight.size * int(np.prod(positions, dtype=np.int64)))


def _quant_parts(layer, keras) -> list[tuple[str, str, str]] | None:
    """``(row suffix, kind, weight attribute)`` per quantizable weight of ``layer``, or None.

    One row per ONNX node: a SeparableConv2D is a depthwise and a pointwise Conv in ONNX, so it
    gives two rows (``/depthwise``, ``/pointwise``). A grouped Conv2D (``groups > 1``) is listed
    but tf2onnx 1.17 cannot convert it (the export then fails with tf2onnx's message).
    """
    L = keras.layers
    if isinstance(layer, (L.Dense, L.EinsumDense)):
        return [("", "linear", "kernel")]
    if isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):
        return [("/depthwise", "conv", "depthwise_kernel"), ("/pointwise", "conv", "pointwise_kernel")]
    if isinstance(layer, (L.Conv1D, L.Conv2D, L.DepthwiseConv1D, L.DepthwiseConv2D)):
        return [("", "conv", "kernel")]
    if isinstance(layer, L.Embedding):
        return [("", "embedding", "embeddings")]
    return None


def _quant_kind(layer, keras) -> tuple[str, str] | None:
    """Whether ``layer`` holds quantizable weights (its first part's kind and attribute)."""
    parts = _quant_parts(layer, keras)
    return (parts[0][1], parts[0][2]) if parts else None


def onnx_layouts(kl: "_KerasLayer") -> list[np.ndarray]:
    """The layer's kernel in the layouts tf2onnx writes (a Conv's OIHW, a Dense's KN or NK)."""
    w, t = kl.weight, kl.module_type
    if kl.kind == "conv" and w.ndim in (3, 4):
        if t.startswith("Depthwise") or kl.weight_attr == "depthwise_kernel":
            spatial, cin, mult = w.shape[:-2], w.shape[-2], w.shape[-1]
            moved = np.moveaxis(w.reshape(*spatial, cin * mult), -1, 0)  # (C*M, *spatial)
            return [moved[:, None], moved[:, None, None]] if w.ndim == 3 else [moved[:, None]]
        oi = np.moveaxis(np.moveaxis(w, -1, 0), -1, 1)  # (O, I, *spatial)
        return [oi, oi[:, :, None]] if w.ndim == 3 else [oi]
    if w.ndim == 2:
        return [w, w.T]
    return [w]


def _sublayers(layer) -> list:
    """Direct sublayers: a model's ``layers``, and also the layers a custom layer owns
    (e.g. MultiHeadAttention's query/key/value EinsumDense), which ``layers`` does not list."""
    flatten = getattr(layer, "_flatten_layers", None)  # Keras 3 Layer API (tracked sublayers)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "layers", []) or [])


def _walk(layer, seen: set[int]):
    for sub in _sublayers(layer):
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        yield sub
        yield from _walk(sub, seen)


def enumerate_layers(model, keras) -> list[_KerasLayer]:
    """Quantizable weights of a Keras model (nested models included), in layer order."""
    found = []
    for layer in _walk(model, set()):
        parts = _quant_parts(layer, keras)
        if parts is None or not layer.built:  # never built = never called: no weight to map
            continue
        for suffix, kind, attr in parts:
            found.append((layer, suffix, kind, attr, getattr(layer, attr)))
    counts: dict[str, int] = {}
    for layer, suffix, *_ in found:
        counts[layer.name + suffix] = counts.get(layer.name + suffix, 0) + 1
    out = []
    for layer, suffix, kind, attr, var in found:
        name = layer.name
        if counts[name + suffix] > 1:  # same name in two nested models: qualify by the variable path
            name = var.path.rsplit("/", 1)[0]
        w = np.asarray(var.numpy(), dtype=np.float32)
        out.append(_KerasLayer(name + suffix, layer.name, kind, type(layer).__name__, w,
                               attr, _macs(layer, kind, w), layer))
    return out


def enumerate_unquantized(model, keras, table: LayerTable | None = None) -> list[UnquantizedModule]:
    """Layers whose variables no quantizable layer covers (each stays fp32), in layer order.

    A layer with no quantizable layer inside (an LSTM and its LSTMCell, a LayerNormalization) is
    one entry with all its variables, named as the user named it; a container (a nested model, an
    attention block) contributes only the variables it holds itself. A normalisation the exporter
    folded into a layer of ``table`` says so.
    """
    out: list[UnquantizedModule] = []
    folded = {l.folded: l.name for l in table.layers if l.folded} if table else {}

    def has_quantizable(layer) -> bool:
        return any(_quant_kind(sub, keras) is not None for sub in _walk(layer, set()))

    def visit(layer, seen: set[int]) -> None:
        for sub in _sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            if _quant_kind(sub, keras) is not None or not sub.built:
                continue
            leaf = not has_quantizable(sub)
            inner = set() if leaf else {id(v) for s2 in _sublayers(sub) for v in s2.weights}
            own = [v for v in sub.weights if id(v) not in inner]
            if own:
                kind = type(sub).__name__
                out.append(UnquantizedModule(name=sub.name, module_type=kind,
                                             params=int(sum(int(np.prod(v.shape)) for v in own)),
                                             reason=folded_reason(folded[sub.name]) if sub.name in folded
                                             else unquantized_reason(kind)))
            if not leaf:
                visit(sub, seen)

    visit(model, set())
    return out


def _fingerprint(a: np.ndarray) -> str:
    """Layout-independent fingerprint: size plus the sorted values (transpose/reshape keep both)."""
    flat = np.sort(np.asarray(a, dtype=np.float32).reshape(-1))
    return hashlib.sha1(flat.tobytes()).hexdigest()


def _in_scope(node_name: str, layer_name: str) -> bool:
    return re.search(r"(^|/)" + re.escape(layer_name) + r"(_\d+)?/", node_name) is not None


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new
    for coll in (graph.initializer, graph.input, graph.output, graph.value_info):
        for item in coll:
            if item.name == old:
                item.name = new


def _match_rewritten(graph: onnx.GraphProto, inits: dict, keras_layers: list[_KerasLayer], taken: dict[int, int],
                     assigned: set[str]) -> list[tuple[int, onnx.NodeProto, int]]:
    """Tie layers whose weight tf2onnx rewrote (a BatchNormalization folded into a Conv) to the
    nodes left over, by structure: the kernel in an ONNX layout rescaled per output channel, with
    the layer's TF scope in the weight's or the node's name as evidence (see the module docstring).
    Marks the chosen layers in ``taken``."""
    free = [i for i in range(len(keras_layers)) if i not in taken]
    found = []
    for node in graph.node:
        if not free:
            break
        if node.name in assigned:
            continue
        for pos in QUANT_OPS.get(node.op_type, ()):
            if pos >= len(node.input) or node.input[pos] not in inits:
                continue
            w = numpy_helper.to_array(inits[node.input[pos]])
            if w.dtype.kind != "f" or w.ndim < 2:
                continue
            scaled, named = [], []
            for i in free:
                kl = keras_layers[i]
                forms = [f for f in onnx_layouts(kl) if f.shape == w.shape]
                if not forms:
                    continue
                if any(scaled_axis(w, f) is not None for f in forms):
                    scaled.append(i)
                if _in_scope(node.input[pos], kl.layer_name) or _in_scope(node.name, kl.layer_name):
                    named.append(i)
            both = [i for i in scaled if i in named]
            pick = both if len(both) == 1 else scaled if len(scaled) == 1 else []
            if not pick:
                continue
            free.remove(pick[0])
            taken[pick[0]] = taken.get(pick[0], 0) + 1
            found.append((pick[0], node, pos))
            break
    return found


def build_layer_table(onnx_model: onnx.ModelProto, keras_layers: list[_KerasLayer],
                      norm_layers: tuple[str, ...] | list[str] = ()) -> LayerTable:
    """Map each Keras layer to exactly one ONNX node + initializer; rename both after the layer.

    ``norm_layers`` (the model's normalisation layer names) name what a folded layer absorbed.

    A layer called several times (shared weights) becomes ``name``, ``name#2``, ...,
    each with its own copy of the weight, so each call can get its own format.
    """
    graph = onnx_model.graph
    inits = {i.name: i for i in graph.initializer}
    by_print: dict[str, list[int]] = {}
    for idx, kl in enumerate(keras_layers):
        by_print.setdefault(_fingerprint(kl.weight), []).append(idx)

    init_prints: dict[str, str] = {}
    assignments: list[tuple[int, onnx.NodeProto, int]] = []
    taken: dict[int, int] = {}
    for node in graph.node:
        for pos in QUANT_OPS.get(node.op_type, ()):
            if pos >= len(node.input) or node.input[pos] not in inits:
                continue
            w = node.input[pos]
            arr = numpy_helper.to_array(inits[w])
            if arr.dtype.kind != "f" or arr.ndim < 2:
                continue
            if w not in init_prints:
                init_prints[w] = _fingerprint(arr)
            cands = by_print.get(init_prints[w], [])
            if not cands:
                continue
            chosen = choose_candidate(cands, lambda c: _in_scope(node.name, keras_layers[c].layer_name), taken)
            assignments.append((chosen, node, pos))
            break

    folded: dict[str, str] = {}  # node name -> normalisation layer folded into it
    if len(taken) < len(keras_layers):
        order = {n.name: k for k, n in enumerate(graph.node)}
        for chosen, node, pos in _match_rewritten(graph, inits, keras_layers, taken, {n.name for _, n, _ in assignments}):
            assignments.append((chosen, node, pos))
            note = next((nl for nl in norm_layers for i in node.input if i != node.input[pos] and _in_scope(i, nl)), None)
            if note:
                folded[node.name] = note
        assignments.sort(key=lambda a: order[a[1].name])

    unmatched = [kl.name for i, kl in enumerate(keras_layers) if i not in taken]
    if unmatched:
        raise RuntimeError(
            f"layer table: {len(unmatched)} Keras layer(s) map to no ONNX node holding their weight: "
            f"{unmatched[:10]}. They may be unused in call(), or the exporter rewrote their weights "
            "(e.g. folded a BatchNormalization into a Conv). Remove unused layers or fold before export."
        )

    # Copy shared initializers so each quantizable node owns its weight, then rename.
    consumers: dict[str, int] = {}
    for node in graph.node:
        for n in node.input:
            consumers[n] = consumers.get(n, 0) + 1
    existing_nodes = {n.name for n in graph.node}
    existing_tensors = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    uses: dict[int, int] = {}
    layers: list[Layer] = []
    for idx, node, pos in assignments:
        kl = keras_layers[idx]
        uses[idx] = uses.get(idx, 0) + 1
        name = kl.name if uses[idx] == 1 else f"{kl.name}#{uses[idx]}"
        old_w = node.input[pos]
        new_w = f"{name}/{kl.weight_attr}"
        if new_w in existing_tensors and new_w != old_w:
            new_w = f"{new_w}__{uses[idx]}"
        if consumers.get(old_w, 0) > 1:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[old_w])
            copy.name = new_w
            graph.initializer.append(copy)
            node.input[pos] = new_w
            consumers[old_w] -= 1
        else:
            _rename_tensor(graph, old_w, new_w)
        existing_tensors.add(new_w)
        note = folded.get(node.name)
        if name not in existing_nodes:
            existing_nodes.discard(node.name)
            node.name = name
            existing_nodes.add(name)
        init = next(i for i in graph.initializer if i.name == new_w)
        shape = tuple(int(d) for d in init.dims)
        macs = kl.macs
        layers.append(Layer(name=name, kind=kl.kind, module_type=kl.module_type, onnx_node=node.name,
                            onnx_op=node.op_type, weight=new_w, weight_shape=shape,
                            params=int(np.prod(shape)), macs=macs, folded=note))
    node_names = [l.onnx_node for l in layers]
    if len(set(node_names)) != len(node_names):
        raise RuntimeError("layer table: one ONNX node claimed by several layers; please report this model")
    return LayerTable(layers=layers)
