"""What ONNX Runtime actually runs for each layer, read from the session's optimized graph.

The quantizer writes a QDQ form per layer; ORT's graph optimizer decides which kernel that form
becomes (an integer QGemm, or a float Gemm on dequantized inputs). :func:`observe_kernels` opens the
artifact with the options the ORT CPU backend measures with (:func:`pipeline.backends.ort_cpu.session_options`),
dumps the optimized graph and traces every layer to the node that computes it, so native/emulated
in every report is what ran, not what the form could run as.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.backends.base import ObservedKernel
from pipeline.formats import Format

if TYPE_CHECKING:
    import onnx

    from pipeline.layers import LayerTable


# --- what ORT actually runs ------------------------------------------------------------------
#
# The static table (pipeline.backends.native) says what a realisation *should* become; ORT's
# graph optimizer decides what it does become. Example (ORT 1.32, x86 CPU): an int8 Conv whose
# quantized output has several readers keeps an int8 (not uint8) Q/DQ pair - ORT converts only
# single-reader pairs - and runs as a float Conv on dequantized int8. (The quantizer already
# rewrites the cases it can, e.g. Relu after an int8 Gemm and shared-input projections:
# exporters.quant.ort_session_forms.pre_empt_session_rewrites.)
# ``observe_kernels`` reads the optimized graph ORT writes (``optimized_model_filepath``, same
# session options as the measured session) and reports per layer the node that computes it.

INTEGER_KERNELS = frozenset({
    # MLAS integer / low-bit kernels: the layer's arithmetic runs in its stored format
    "QGemm", "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "ConvInteger", "MatMulNBits", "GatherBlockQuantized",
    "QAttention", "QEmbedLayerNormalization", "DynamicQuantizeLSTM", "MatMulBnb4",
})
"""Kernels that count as native for a quantized layer (plus any ``QLinear*`` op). MatMulNBits is
weight-only (int4 weights unpacked inside the kernel, fp32 activations at accuracy level 0):
native in this project's sense, as the static table has it."""

_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten",
                         "ReorderInput", "ReorderOutput"})
# Ops that only prepare a constant (a weight, scale, bias) for the layer's kernel.
_PREP_OPS = _LAYOUT_OPS | {"DequantizeLinear", "QuantizeLinear", "Cast", "Constant"}
# The layer's own node in the quantized artifact, by realisation (exporters.onnx_quant).
_LAYER_OPS = frozenset({"MatMul", "Gemm", "Conv", "Gather", "MatMulInteger", "ConvInteger", "MatMulNBits",
                        "GatherBlockQuantized", "QLinearMatMul", "QLinearConv"})
# How ORT's quantizers rename a node they replace: quantize_dynamic (MatMulInteger/ConvInteger,
# ``name + "_quant"``), MatMulNBitsQuantizer (``name + "_Q4"``/``"_Q8"``); the other forms keep it.
_QUANTIZER_SUFFIXES = ("", "_quant", "_Q4", "_Q8")
_NARROW_FLOATS = {"bfloat16", "float16", "float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"}
_FORMAT_DTYPE = {Format.BF16: "bfloat16", Format.FP8: "float8e4m3fn"}


def optimized_graph(artifact: str | Path, providers: Iterable = ("CPUExecutionProvider",)) -> "onnx.ModelProto":
    """The graph ORT runs for ``artifact``: built with :func:`pipeline.backends.ort_cpu.session_options` (the measured
    session's optimization level and pinned config) and dumped through ``optimized_model_filepath``.
    Initializers go to an external file that is never read back (only names and types are needed),
    so this costs one session build plus writing the weights once."""
    import onnx
    import onnxruntime as ort

    from pipeline.backends.ort.session import session_options

    with tempfile.TemporaryDirectory(prefix="ort_optimized_") as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = session_options(1)  # threads do not change the graph transformers
        opts.optimized_model_filepath = str(out)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "64")
        ort.InferenceSession(str(artifact), sess_options=opts, providers=list(providers))
        return onnx.load(str(out), load_external_data=False)


class _Graph:
    """Producer/consumer/type lookups over one ONNX graph (main graph only)."""

    def __init__(self, model: "onnx.ModelProto"):
        from onnx import TensorProto

        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in dict.fromkeys(x for x in n.input if x):
                self.consumers.setdefault(i, []).append(n)
        self.types: dict[str, str] = {}
        for v in list(g.value_info) + list(g.input) + list(g.output):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.types[v.name] = TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()
        for t in g.initializer:
            self.types[t.name] = TensorProto.DataType.Name(t.data_type).lower()
        for n in self.nodes:  # a Cast's output type is its "to", whatever value_info says
            if n.op_type == "Cast":
                to = next((a.i for a in n.attribute if a.name == "to"), 0)
                if to and n.output:
                    self.types[n.output[0]] = TensorProto.DataType.Name(to).lower()

    def is_constant(self, tensor: str, seen: set | None = None) -> bool:
        if tensor in self.inits:
            return True
        n = self.producer.get(tensor)
        if n is None or n.op_type not in _PREP_OPS:
            return False
        seen = set() if seen is None else seen
        if n.name in seen:
            return False
        seen.add(n.name)
        return all(self.is_constant(i, seen) for i in n.input if i)

    def constant_lineage(self, node) -> set[str]:
        """Constant tensors feeding ``node`` through preparation ops (its weight, scales, bias), with
        the intermediate outputs: ORT's constant folding keeps an output's name for the folded value."""
        out: set[str] = set()
        stack = [i for i in node.input if i and self.is_constant(i)]
        while stack:
            t = stack.pop()
            if t in out:
                continue
            out.add(t)
            p = self.producer.get(t)
            if p is not None:
                stack.extend(i for i in p.input if i)
        return out

    def source(self, tensor: str):
        """The node that produced ``tensor``, looking through layout-only ops."""
        seen = 0
        n = self.producer.get(tensor)
        while n is not None and n.op_type in _LAYOUT_OPS and n.input and seen < 32:
            seen += 1
            n = self.producer.get(n.input[0])
        return n

    def dtype(self, tensor: str) -> str:
        return self.types.get(tensor, "?")

    def dequantized_dtype(self, dq) -> str:
        """What a DequantizeLinear reads: its input's type, else its zero point's (the same type by
        the operator's definition); activation Q outputs often have no value_info."""
        t = self.dtype(dq.input[0])
        if t == "?" and len(dq.input) > 2 and dq.input[2]:
            t = self.dtype(dq.input[2])
        if t == "?" and (qp := self.producer.get(dq.input[0])) is not None and qp.op_type == "QuantizeLinear":
            if len(qp.input) > 2 and qp.input[2]:
                t = self.dtype(qp.input[2])
            else:
                from onnx import TensorProto

                to = next((a.i for a in qp.attribute if a.name == "output_dtype"), 0)
                t = TensorProto.DataType.Name(to).lower() if to else "uint8"  # QuantizeLinear's default
        return t


def _kernel_name(n) -> str:
    return f"{n.op_type}[NCHWc]" if n.domain == "com.microsoft.nchwc" else n.op_type


_SHORT = {"float": "fp32", "float16": "fp16", "bfloat16": "bf16", "float8e4m3fn": "fp8-e4m3fn",
          "float8e5m2": "fp8-e5m2"}


def _is_integer_kernel(n) -> bool:
    return n.op_type in INTEGER_KERNELS or n.op_type.startswith("QLinear")


def _layer_node(q: _Graph, layer) -> object | None:
    """The layer's node in the quantized artifact: its table name (or the name ORT's quantizer gave
    its replacement), checked to read a constant derived from the layer's weight."""
    by_name = {n.name: n for n in q.nodes if n.name}
    found = []
    for suffix in _QUANTIZER_SUFFIXES:
        n = by_name.get(layer.onnx_node + suffix)
        if n is None or n.op_type not in _LAYER_OPS:
            continue
        # every realisation's weight name starts with the reference weight's (``w_quantized``,
        # ``w_kn_Q4``, ``w_bf16``, a private copy ``w__node``)
        if any(t.startswith(layer.weight) for t in q.constant_lineage(n) if t in q.inits):
            found.append(n)
    return found[0] if len(found) == 1 else None


def _match(o: _Graph, qnode, lineage: set[str]):
    """The optimized graph's node computing ``qnode``: the non-preparation node reading the most of
    the layer's constants (directly or through folded/kept preparation ops), ties broken by name
    (ORT keeps it, or writes ``fused <name>``, possibly with a ``_token_N`` suffix). Falls back to the
    name alone when no constant survived (e.g. an fp32 Conv without bias, whose weight the NCHWc
    transformer re-lays into a new initializer)."""
    hits: dict[str, int] = {}
    nodes: dict[str, object] = {}
    for start in lineage:
        frontier, seen = [start], set()
        while frontier:
            t = frontier.pop()
            if t in seen:
                continue
            seen.add(t)
            for c in o.consumers.get(t, []):
                if c.op_type in _PREP_OPS:
                    if c.input and c.input[0] == t:  # follow the data input, not shared shapes/scales
                        frontier.extend(x for x in c.output if x)
                    continue
                key = c.name or id(c)
                nodes[key] = c
                hits[key] = hits.get(key, 0) + 1  # one per lineage tensor that reaches it
    base = qnode.name

    def named(n) -> bool:
        nm = n.name
        return nm == base or nm == f"fused {base}" or nm.startswith((f"{base}_token_", f"fused {base}_token_"))

    if hits:
        best = max(hits.values())
        top = [nodes[k] for k, v in hits.items() if v == best]
        if len(top) == 1:
            return top[0]
        by_name = [n for n in top if named(n)]
        if len(by_name) == 1:
            return by_name[0]
        return top[0] if len({(n.op_type, n.domain) for n in top}) == 1 else None
    by_name = [n for n in o.nodes if n.op_type not in _PREP_OPS and named(n)]
    return by_name[0] if len(by_name) == 1 else None


def _classify(o: _Graph, q: _Graph, n, fmt: Format | None) -> ObservedKernel:
    """Native for integer kernels (and FP32 layers); a float kernel for a quantized layer is
    emulated, labelled with what feeds it: DequantizeLinear outputs, bf16-rounding Casts, or
    constants ORT folded from a DequantizeLinear/Cast at load time."""
    name = _kernel_name(n)
    if _is_integer_kernel(n):
        return ObservedKernel(name, "native")
    dequantized, rounded, folded = set(), set(), set()
    for t in (x for x in n.input if x):
        src = o.source(t)
        if src is not None and src.op_type == "DequantizeLinear":
            dequantized.add(o.dequantized_dtype(src))
        elif src is not None and src.op_type == "Cast" and o.dtype(src.input[0]) in _NARROW_FLOATS:
            rounded.add(o.dtype(src.input[0]))
        elif t in o.inits and (qp := q.producer.get(t)) is not None and qp.op_type in ("DequantizeLinear", "Cast"):
            folded.add(q.dequantized_dtype(qp) if qp.op_type == "DequantizeLinear" else q.dtype(qp.input[0]))
    compute = o.dtype(n.input[0]) if n.input else "?"
    if fmt is Format.FP32 or (fmt is None and not (dequantized or rounded or folded)):
        return ObservedKernel(name, "native")  # planned fp32 (or unknown and fed plain floats)
    if n.op_type == "Gather":
        # A plain Gather only moves rows (a bf16 table's rows, widened to fp32 by the Cast after it):
        # no arithmetic in the format, emulated as the static table has it.
        return ObservedKernel(f"{name}({_SHORT.get(compute, compute)} table)", "emulated")
    if compute == _FORMAT_DTYPE.get(fmt):  # a float kernel computing in the format itself (none on ORT CPU)
        return ObservedKernel(f"{name}({_SHORT.get(compute, compute)})", "native")

    def types(s: set[str]) -> str:
        shown = sorted(s - {"int32"}) or sorted(s)  # an int32 bias beside int8 weights says nothing new
        return "/".join(_SHORT.get(t, t) for t in shown)

    how = []
    if dequantized:
        how.append(f"dequantized {types(dequantized)}")
    if rounded:
        how.append(f"{types(rounded)}-rounded inputs")
    if folded:
        how.append(f"{types(folded)} weights widened at load")
    fp = _SHORT.get(compute, "fp32")  # value_info may lack it: ORT CPU's float kernels are fp32
    return ObservedKernel(f"{name}({fp} on {', '.join(how)})" if how else f"{name}({fp})", "emulated")


def observe_kernels(artifact: str | Path, layer_table: "LayerTable", formats: Mapping[str, Format] | None = None,
                    providers: Iterable = ("CPUExecutionProvider",),
                    optimized: "onnx.ModelProto | None" = None) -> dict[str, ObservedKernel]:
    """Per layer of ``layer_table``, the kernel ORT runs for it in ``artifact`` and native/emulated.

    The layer's node is found in the artifact by name (:func:`_layer_node`), then in ORT's
    optimized graph by the constants it reads (:func:`_match`): fusions rename and replace nodes
    (QGemm, QLinearConv, DynamicQuantizeMatMul, FusedGemm, NCHWc Conv, ...) but the quantized
    weight initializers keep their names, and folded constants take their producer's output name.
    Each call of a shared layer is its own table row and its own node, so each gets its own kernel.
    Layers that cannot be located unambiguously are left out (the caller keeps the static table).
    ``optimized`` skips the session build (tests, or a caller that already has the graph).
    """
    import onnx

    q = _Graph(onnx.load(str(artifact), load_external_data=False))
    o = _Graph(optimized if optimized is not None else optimized_graph(artifact, providers))
    located = {l.name: _layer_node(q, l) for l in layer_table}
    lineages = {name: q.constant_lineage(n) for name, n in located.items() if n is not None}
    counts: dict[str, int] = {}
    for lin in lineages.values():
        for t in lin:
            counts[t] = counts.get(t, 0) + 1
    out: dict[str, ObservedKernel] = {}
    for name, qnode in located.items():
        if qnode is None:
            continue
        own = {t for t in lineages[name] if counts[t] == 1}  # a weight two calls share identifies neither
        n = _match(o, qnode, own)
        if n is not None:
            out[name] = _classify(o, q, n, (formats or {}).get(name))
    return out
