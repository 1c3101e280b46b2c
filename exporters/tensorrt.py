"""TensorRT engines from the quantizer's QDQ ONNX, with each layer in the precision its plan gave it.

TensorRT 11 builds strongly typed networks only (TensorRT 10 does when asked,
which this module always does): every tensor has the type the ONNX graph gives
it and no builder flag adds precisions behind the graph's back. Per-layer
precision is therefore carried by the graph itself:

- INT8 / FP8 layers: explicit quantization. QuantizeLinear/DequantizeLinear
  pairs around a GEMM/Conv become real INT8 kernels and, on sm >= 89 (Ada,
  Hopper), FP8 kernels. TensorRT requires symmetric quantization (zero points
  0) and signed types (INT8, FP8, INT4).
- INT4 layers: blocked DequantizeLinear(int4 weight) feeding the GEMM, which
  TensorRT fuses into a weight-only kernel (int4 weights, fp compute). TensorRT
  blocks 2-D tensors only, along the last or second-to-last axis
  (IDequantizeLayer reference), so a Conv weight is quantized as a 2-D
  [O, I*kh*kw] matrix and Reshaped after the DequantizeLinear; shape-only ops
  between a DequantizeLinear and its GEMM/Conv do not change what
  :func:`layer_precisions` reports. Whether TensorRT fuses that Conv form into an
  int4 weight-only kernel rather than folding it to an fp32 constant is shown by
  the engine inspector report written next to each engine.
- Biases: TensorRT's Q/DQ take int8, fp8, int4 (and fp4), never int32, so
  quantized (int32) biases are refused; the quantizer keeps them fp32 for the
  ``tensorrt`` target.
- BF16 layers: the quantizer writes them as Cast round-trips around an fp32
  GEMM (the only form ONNX Runtime CPU runs). In a strongly typed network that
  would stay fp32 compute, so :func:`promote_bf16_layers` rewrites each such
  layer to take bf16 operands and return fp32 through one Cast: a bf16 GEMM
  with fp32 accumulation, which is what the plan asked for.
- FP32 layers: fp32, with TF32 disabled by default (``allow_tf32``).

What TensorRT cannot parse (DynamicQuantizeLinear + MatMulInteger, QLinear*
ops, com.microsoft ops such as MatMulNBits, asymmetric or unsigned Q/DQ) is
listed by :func:`tensorrt_problems` and refused before a build, with the fix.
The quantizer's ``tensorrt`` target (``exporters.onnx_quant``, chosen by
``measure.backend: tensorrt``) writes none of these: this check guards
artifacts made for another target or by other tools.

This module is the ONNX half (graph analysis and the bf16 promotion, pure ONNX, run
anywhere); the engine build and the timed session, which need TensorRT and a CUDA
torch, live with the backend in :mod:`pipeline.backends.tensorrt.engine`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

COMPUTE_OPS = ("MatMul", "Gemm", "Conv")
# ONNX ops TensorRT's parser does not implement, with the plan setting that avoids them.
UNPARSEABLE_OPS = {
    "DynamicQuantizeLinear": "int8 with dynamic activations; use int8_activations: static for TensorRT",
    "MatMulInteger": "int8 with dynamic activations; use int8_activations: static for TensorRT",
    "ConvInteger": "int8 with dynamic activations; use int8_activations: static for TensorRT",
    "QLinearMatMul": "QOperator int8; export QDQ (static) for TensorRT",
    "QLinearConv": "QOperator int8; export QDQ (static) for TensorRT",
}
TRT_QUANT_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4}
_QTYPE_NAMES = {
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.FLOAT8E4M3FN: "fp8",
    TensorProto.FLOAT8E5M2: "fp8e5m2",
    TensorProto.INT4: "int4",
    TensorProto.UINT4: "uint4",
    TensorProto.INT32: "int32",
}


# --------------------------------------------------------------------------------------
# Graph analysis (pure ONNX)
# --------------------------------------------------------------------------------------
def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor we can type without running the model."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - custom-domain ops; fall back to declared types
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is not None and tt.elem_type:
            types[vi.name] = tt.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Cast":
            types[node.output[0]] = int(_attr(node, "to"))
        elif node.op_type == "Constant":
            value = _attr(node, "value")
            if isinstance(value, TensorProto):
                types[node.output[0]] = value.data_type
        elif node.op_type == "QuantizeLinear":
            if len(node.input) > 2 and node.input[2] and node.input[2] in types:
                types[node.output[0]] = types[node.input[2]]
            elif _attr(node, "output_dtype"):
                types[node.output[0]] = int(_attr(node, "output_dtype"))
            else:
                types.setdefault(node.output[0], TensorProto.UINT8)  # ONNX default without a zero point
        elif node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[1] in types:
            types[node.output[0]] = types[node.input[1]]
    return types


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


# Ops that only move or relabel elements: a DequantizeLinear behind them still decides the
# operand's precision (the quantizer's int4 Conv form is DQ(int4, 2-D) -> Reshape -> Conv).
SHAPE_ONLY_OPS = ("Reshape", "Transpose", "Flatten", "Identity", "Squeeze", "Unsqueeze")


def _dq_behind(name: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    p = producers.get(name)
    while p is not None and p.op_type in SHAPE_ONLY_OPS and p.input:
        p = producers.get(p.input[0])
    return p if p is not None and p.op_type == "DequantizeLinear" else None


def _operand_kind(name: str, producers: dict[str, onnx.NodeProto], types: dict[str, int]) -> str:
    dq = _dq_behind(name, producers)
    if dq is not None:
        return _QTYPE_NAMES.get(types.get(dq.input[0], 0), "quantized")
    p = producers.get(name)
    et = types.get(name)
    if et == TensorProto.BFLOAT16:
        return "bf16"
    if et == TensorProto.FLOAT16:
        return "fp16"
    if p is not None and p.op_type == "Cast" and types.get(p.input[0]) == TensorProto.BFLOAT16:
        return "bf16-rounded"
    return "fp32"


def _classify(a: str, w: str) -> str:
    if a == w and a in ("int8", "fp8", "bf16", "fp16", "fp32"):
        return a
    if w in ("int4", "uint4", "int8", "uint8") and a in ("fp32", "fp16", "bf16", "bf16-rounded"):
        return f"{w}-weight-only"
    if {a, w} <= {"bf16", "bf16-rounded"}:
        return "bf16-emulated (Cast round-trips, fp32 compute)"
    return f"mixed ({a} x {w})"


def layer_precisions(model: onnx.ModelProto) -> dict[str, str]:
    """What each GEMM-like node computes in, read from the graph (node name -> precision).

    ``int8``/``fp8``: both operands dequantized from that type (explicit
    quantization); ``int4-weight-only``: int4 weights, float activations;
    ``bf16``: both operands bf16; ``bf16-emulated``: Cast round-trips before an
    fp32 GEMM; ``fp32``. Nodes without a name are keyed ``<op>#<index>``.
    """
    g = model.graph
    types = _elem_types(model)
    producers = _producers(g)
    out: dict[str, str] = {}
    for i, node in enumerate(g.node):
        key = node.name or f"{node.op_type}#{i}"
        if node.op_type in COMPUTE_OPS and node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            out[key] = _classify(_operand_kind(node.input[0], producers, types),
                                 _operand_kind(node.input[1], producers, types))
        elif node.op_type == "MatMulNBits":
            out[key] = f"int{_attr(node, 'bits', 4)}-weight-only (com.microsoft.MatMulNBits)"
        elif node.op_type in ("MatMulInteger", "ConvInteger"):
            out[key] = "int8 (dynamic activations)"
        elif node.op_type in ("QLinearMatMul", "QLinearConv"):
            out[key] = "int8 (QOperator)"
    return out


def _zero_point_values(name: str, inits: dict[str, TensorProto], producers) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    p = producers.get(name)
    if p is not None and p.op_type == "Constant":
        value = _attr(p, "value")
        if isinstance(value, TensorProto):
            return numpy_helper.to_array(value)
    return None


def _rank(name: str, graph: onnx.GraphProto) -> int | None:
    """Rank of an initializer or a typed value, None when the graph does not say."""
    for init in graph.initializer:
        if init.name == name:
            return len(init.dims)
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name == name and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            return len(vi.type.tensor_type.shape.dim)
    return None


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """Why TensorRT cannot build this graph as quantized, one line per node; empty when it can."""
    g = model.graph
    types = _elem_types(model)
    producers = _producers(g)
    inits = {i.name: i for i in g.initializer}
    problems: list[str] = []
    for i, node in enumerate(g.node):
        label = f"node {node.name or f'#{i}'} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            hint = (
                "int4 layers for TensorRT must be written as blocked DequantizeLinear (QDQ int4), not MatMulNBits "
                "(exporters.onnx_quant does so for target tensorrt, i.e. measure.backend: tensorrt)"
                if node.op_type == "MatMulNBits"
                else "TensorRT's ONNX parser implements standard ONNX ops only"
            )
            problems.append(f"{label}: custom-domain op {node.domain}.{node.op_type}; {hint}")
            continue
        if node.op_type in UNPARSEABLE_OPS:
            problems.append(f"{label}: not supported by TensorRT's ONNX parser ({UNPARSEABLE_OPS[node.op_type]})")
            continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qtensor = node.output[0] if node.op_type == "QuantizeLinear" else node.input[0]
            qtype = types.get(qtensor)
            if qtype == TensorProto.INT32:
                # TensorRT's Q/DQ types are int8, fp8, int4 and fp4 (Quantize/Dequantize operator
                # reference); ORT's QDQ quantizer writes Conv/Gemm biases as int32 + DequantizeLinear.
                problems.append(
                    f"{label}: int32 DequantizeLinear (a quantized bias); TensorRT's Q/DQ take int8, fp8 and "
                    "int4 only: keep biases fp32 (exporters.onnx_quant does so for target tensorrt, or ORT "
                    "extra_options QuantizeBias=False)"
                )
            elif qtype is not None and qtype not in TRT_QUANT_TYPES:
                problems.append(
                    f"{label}: quantized type {_QTYPE_NAMES.get(qtype, qtype)} is not one TensorRT takes "
                    "(int8, fp8 e4m3, int4); quantize with signed types (QInt8/QInt4, not QUInt8)"
                )
            rank = _rank(qtensor, g)
            if int(_attr(node, "block_size", 0) or 0) > 0 and rank is not None and rank != 2:
                # IDequantizeLayer: "scale and zeroPt should have identical dimensions, and a rank
                # that is lower or equal to 2 ... For block quantization, the shape of scale tensor
                # must match the shape of the input, except for one dimension (the last or second
                # to last dimension) in which blocking occurs."
                problems.append(
                    f"{label}: blocked quantization of a rank-{rank} tensor; TensorRT blocks 2-D tensors only "
                    "(quantize the weight as a 2-D matrix and Reshape after the DequantizeLinear)"
                )
            if len(node.input) > 2 and node.input[2]:
                zp = _zero_point_values(node.input[2], inits, producers)
                if zp is not None and np.any(zp.astype(np.float64) != 0):
                    problems.append(
                        f"{label}: non-zero zero point; TensorRT needs symmetric quantization "
                        "(ORT: extra_options ActivationSymmetric/WeightSymmetric = True)"
                    )
    return problems


# --------------------------------------------------------------------------------------
# BF16 promotion
# --------------------------------------------------------------------------------------
def _bf16_source(name: str, producers: dict[str, onnx.NodeProto], types: dict[str, int]) -> str | None:
    """The bf16 tensor behind ``name``: itself if bf16, or the input of a Cast(to=float) of a bf16 tensor."""
    if types.get(name) == TensorProto.BFLOAT16:
        return name
    p = producers.get(name)
    if (p is not None and p.op_type == "Cast" and int(_attr(p, "to", 0)) == TensorProto.FLOAT
            and types.get(p.input[0]) == TensorProto.BFLOAT16):
        return p.input[0]
    return None


BF16_CONV_OPSET = 22  # Conv accepts bfloat16 from ONNX opset 22 (MatMul/Gemm since 13)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def promote_bf16_layers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Rewrite Cast-pair BF16 layers to bf16 compute; returns (new model, promoted node names).

    A MatMul/Gemm/Conv whose two operands are both bf16 values cast up to fp32
    (``Cast(x, bf16) -> Cast(fp32)`` for activations, a bf16 initializer ->
    ``Cast(fp32)`` for weights) is given the bf16 values directly; its bias, if
    any, is cast to bf16; its output is cast back to fp32 under the original
    name, so the rest of the graph is unchanged. The operands' rounding is
    identical; what changes is that the GEMM itself now runs in bf16 (with the
    fp32 accumulation TensorRT's bf16 kernels use). Casts left without consumers
    are removed. Layers of any other form are left alone. Idempotent.

    Conv takes bf16 only from ONNX opset 22, which changed nothing but type
    lists; a model below it that has a Conv to promote is moved to opset 22.
    """
    m = copy.deepcopy(model)
    g = m.graph
    types = _elem_types(m)
    producers = _producers(g)
    graph_outputs = {o.name for o in g.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for inp in n.input:
            consumers.setdefault(inp, []).append(n)
    drop: set[tuple[str, str]] = set()  # (input, output) of Casts made redundant
    new_nodes: list[onnx.NodeProto] = []
    promoted: list[str] = []
    for i, node in enumerate(g.node):
        if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            new_nodes.append(node)
            continue
        sources = [_bf16_source(node.input[k], producers, types) for k in (0, 1)]
        # Promote only fp32 GEMMs fed by bf16 values cast up; a GEMM already on bf16 stays as it is.
        if any(s is None or s == node.input[k] for k, s in enumerate(sources)):
            new_nodes.append(node)
            continue
        name = node.name or f"{node.op_type.lower()}_{i}"
        node.name = name
        node.input[0], node.input[1] = sources[0], sources[1]
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            src = _bf16_source(bias, producers, types)
            if src is None:
                cast_out = f"{bias}__bf16_for_{name}"
                new_nodes.append(helper.make_node("Cast", [bias], [cast_out], to=TensorProto.BFLOAT16,
                                                  name=f"{name}__bias_to_bf16"))
                src = cast_out
            node.input[2] = src
        out = node.output[0]
        readers = consumers.get(out, [])
        if (out not in graph_outputs and len(readers) == 1 and readers[0].op_type == "Cast"
                and int(_attr(readers[0], "to", 0)) == TensorProto.BFLOAT16):
            # The quantizer's output round trip (Cast bf16 -> Cast fp32): the GEMM now writes the
            # bf16 tensor itself and the existing Cast back to fp32 stays; the Cast to bf16 goes.
            node.output[0] = readers[0].output[0]
            drop.add((out, readers[0].output[0]))
            new_nodes.append(node)
        else:
            node.output[0] = f"{out}__bf16"
            new_nodes.append(node)
            new_nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT,
                                              name=f"{name}__out_to_fp32"))
        promoted.append(name)
        if node.op_type == "Conv" and _default_opset(m) < BF16_CONV_OPSET:
            for o in m.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = BF16_CONV_OPSET
    if not promoted:
        return m, []
    new_nodes = [n for n in new_nodes if not (n.op_type == "Cast" and (n.input[0], n.output[0]) in drop)]
    # Drop Casts (and only Casts) that no longer feed anything.
    while True:
        used = {inp for n in new_nodes for inp in n.input} | graph_outputs
        keep = [n for n in new_nodes if n.op_type != "Cast" or any(o in used for o in n.output)]
        if len(keep) == len(new_nodes):
            break
        new_nodes = keep
    copies = []
    for n in new_nodes:  # detach from the repeated field before clearing it
        c = onnx.NodeProto()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)
    new_nodes = copies
    # value_info of tensors that no longer exist (outputs the rewrite bypassed) is dropped.
    live = {t for n in new_nodes for t in list(n.input) + list(n.output)}
    for vi in [vi for vi in g.value_info if vi.name not in live]:
        g.value_info.remove(vi)
    return m, promoted


@dataclass
class PreparedModel:
    path: Path  # what TensorRT reads (the input file when nothing was rewritten)
    source: Path
    bf16_promoted: list[str]
    precisions: dict[str, str]
    problems: list[str]


def prepare_for_tensorrt(onnx_path: str | Path, suffix: str = ".trt.onnx") -> PreparedModel:
    """BF16 promotion (written next to the input when it changes anything) plus the analysis."""
    src = Path(onnx_path)
    model = onnx.load(str(src))
    promoted_model, promoted = promote_bf16_layers(model)
    path = src
    if promoted:
        path = src.with_name(src.name.removesuffix(".onnx") + suffix)
        onnx.save(promoted_model, str(path))
    return PreparedModel(path=path, source=src, bf16_promoted=promoted,
                         precisions=layer_precisions(promoted_model), problems=tensorrt_problems(promoted_model))
