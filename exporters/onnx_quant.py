"""The one quantizer: apply a per-layer precision plan to an FP32 ONNX reference.

PTQ and QAT, PyTorch and Keras all end here, and every runtime reads what this writes, so
the numbers in the artifact are defined once (their rules: :mod:`exporters.numerics`).

What each (format, op) becomes - the ``realisation`` recorded per layer:

======  ===================================  =============================================
format  MatMul / Gemm / Conv                 Gather (embedding table)
======  ===================================  =============================================
fp32    unchanged (``fp32``)                 unchanged (``fp32``)
bf16    bf16 weights + Cast round trips      bf16 table, Gather, Cast (``cast-bf16``)
        (``cast-bf16``)
fp8     E4M3FN QDQ weights + activations     E4M3FN table, GatherBlockQuantized
        (``qdq-fp8``)                        (``gather-fp8``)
int8    static: QDQ int8 (``qdq-int8``);     int8 table per row, GatherBlockQuantized
        dynamic: DynamicQuantizeLinear +     (``gather-int8``; weight-only, the static/
        MatMulInteger/ConvInteger            dynamic knob does not apply)
        (``dynamic-int8``)
int4    MatMul, Gemm: MatMulNBits            int4 table, GatherBlockQuantized
        (``matmulnbits-int4``); Conv:        (``gather-int4``)
        blocked DQ(int4) (``qdq-int4``)
======  ===================================  =============================================

That table is the ``ort`` target (:class:`pipeline.formats.QuantTarget`). For
``target=tensorrt`` the same numbers are written in standard-ONNX QDQ forms TensorRT's
parser builds (:mod:`exporters.quant.tensorrt_forms`): int4 MatMul/Gemm as a blocked
DequantizeLinear(int4) feeding the MatMul (``qdq-int4``), quantized embeddings as a
DequantizeLinear of the table before the Gather (``dq-gather-int8/int4/fp8``), and int8 with
dynamic activations refused (:class:`UnsupportedPlan`).

A Gemm planned int4 or int8-dynamic is first rewritten as MatMul + Add (both forms exist
for MatMul only). The passes run in this order, each on the previous one's output:
prepare (opset 21, private weights/inputs, Gemm rewrites, ORT pre-processing) -> int8
static QDQ -> fp8 QDQ -> int8 dynamic -> int4 MatMulNBits (per block size) -> hand-written
forms (bf16, int4 Conv, int8/fp8/bf16 Gather) -> for the ``ort`` target with static QDQ layers,
the numerically neutral rewrites that leave ORT's session-time transformers nothing to change
or break, and let its QDQ fusions give every int8-static MatMul/Gemm its integer kernel (a shared
activation quantizer split per layer, a Relu/Clip after the layer written as Max/Min:
:func:`exporters.quant.ort_session_forms.pre_empt_session_rewrites`). With ``uint8_activations=True``
(``ort`` target, for ORT's CPU) the int8-static activations are stored uint8 with zero point 128,
the same values: ORT's x86 CPU then fuses every int8 Conv into QLinearConv, also one whose output
has several readers (a residual branch), which int8 storage left in float. Layers are disjoint,
and each ORT pass only touches its own nodes, so a layer's node is never seen by two passes.

The artifact is then loaded once with the session options the ORT CPU backend measures with
(all graph optimizations on), so a graph that only ORT's optimizers break fails here, naming
the cause, rather than at measurement.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from pydantic import BaseModel

from exporters.errors import UnsupportedPlan
from exporters.quant import handwritten, ort_passes, ort_session_forms, tensorrt_forms
from exporters.quant.names import private_names, repair_duplicate_definitions, restore_names
from exporters.quant.calibration import ENTROPY_NUM_BINS, ENTROPY_NUM_QUANTIZED_BINS, INT8_METHODS, check_feeds
from exporters.quant.graph import (
    NameScope,
    ensure_opset,
    gemm_to_matmul,
    initializers,
    isolate_inputs,
    make_weight_private,
    node,
    remove_unused_initializers,
)
from pipeline.formats import names as native
from pipeline.formats import TARGET_INT8_ACTIVATIONS, Calibration, Format, Int8Activations, QuantTarget
from pipeline.layers import Layer, LayerTable
from pipeline.plan import LayerChoice

log = logging.getLogger(__name__)

FP8_CALIBRATION = "minmax amax/448 (fp8 activations)"
"""What fp8 activation scales come from (``calibration_used``): ORT's MinMax calibrator, scale
``amax/448`` (``numerics.fp8_activation_scale``), whatever the int8 calibration is."""

SUPPORTED_OPS = ("MatMul", "Gemm", "Conv", "Gather")




class LayerQuantization(BaseModel):
    name: str
    format: Format
    realisation: str  # one of the realisation constants in pipeline/backends/native.py
    detail: str  # human text, e.g. "int8 W8A8 static per-channel, minmax"


class QuantizedModel(BaseModel):
    path: str
    layers: list[LayerQuantization]
    calibration_used: str  # e.g. "minmax" or "minmax amax/448 (fp8 activations)"


@dataclass
class _Planned:
    layer: Layer
    choice: LayerChoice
    weight_index: int
    target: QuantTarget = QuantTarget.ORT

    @property
    def node(self) -> str:
        return self.layer.onnx_node

    @property
    def op(self) -> str:
        return self.layer.onnx_op

    @property
    def kind(self) -> str:
        """Which pass handles the layer."""
        f, op = self.choice.format, self.op
        if f is Format.FP32:
            return "fp32"
        trt = self.target is QuantTarget.TENSORRT
        if op == "Gather":
            return f"dq-gather-{f.value}" if trt and f is not Format.BF16 else f"gather-{f.value}"
        if f is Format.BF16:
            return "bf16"
        if f is Format.FP8:
            return "fp8"
        if f is Format.INT8:
            return "int8-dynamic" if self.choice.int8_activations is Int8Activations.DYNAMIC else "int8-static"
        if op == "Conv":
            return "int4-conv"
        return "int4-qdq" if trt else "int4-nbits"


def quantize_model(
    reference_onnx: str | Path,
    layer_table: LayerTable,
    choices: dict[str, LayerChoice],
    calibration_feeds: Sequence[dict[str, np.ndarray]],
    calibration: Calibration,
    out_path: str | Path,
    workdir: str | Path | None = None,
    target: QuantTarget | str = QuantTarget.ORT,
    *,
    uint8_activations: bool = False,
) -> QuantizedModel:
    """Write ``out_path``: the reference model with every layer in its planned format.

    ``choices`` must hold exactly the layer table's names (``QuantPlan.resolve`` output).
    ``calibration_feeds`` are input batches (dicts of graph input -> array); they are only
    run when some layer is int8-static or fp8. ``calibration`` picks the int8 range
    calibrator; fp8 activation scales are always ``amax/448`` from ORT's MinMax calibrator
    (recorded in ``calibration_used``).
    Intermediate models (one per pass) go to ``workdir/onnx_quant_work`` (a temporary folder
    when ``workdir`` is None) and are deleted once the artifact is written; after a failure
    they are kept there for inspection (given a ``workdir``). The result is loaded once in ONNX Runtime on the CPU,
    with the ORT CPU backend's session options, before returning, so an artifact that comes back
    always loads the way it will be measured.
    ``target`` picks the graph forms (``ort`` or ``tensorrt``, see the module docstring); a plan
    the target cannot express raises :class:`UnsupportedPlan` before any work is done.
    ``uint8_activations`` (``ort`` target only): store int8-static activations as uint8 with zero
    point 128 - the same values, see :func:`exporters.quant.ort_session_forms.int8_activations_as_uint8` -
    for ORT's x86 CPU, which then fuses every int8-static Conv into QLinearConv, also one whose
    quantized output has several readers (a residual branch). Off by default because the ``ort``
    target also feeds ORT's TensorRT execution provider (``ort-trt``), and TensorRT takes signed
    int8 Q/DQ with zero point 0 only; the ``tensorrt`` target refuses it.
    """
    reference_onnx, out_path = Path(reference_onnx), Path(out_path)
    if not reference_onnx.is_file():
        raise FileNotFoundError(f"reference_onnx: no file at {reference_onnx}")
    calibration = Calibration(calibration)
    target = QuantTarget(target)
    if uint8_activations and target is not QuantTarget.ORT:
        raise ValueError(f"uint8_activations: target {target} takes signed int8 activations only (zero point 0); "
                         "leave uint8_activations False, or use target ort")
    base = Path(tempfile.mkdtemp(prefix="onnx_quant_")) if workdir is None else Path(workdir)
    work = base / "onnx_quant_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        result = _quantize(reference_onnx, layer_table, choices, calibration_feeds, calibration, out_path, work,
                           target, uint8_activations)
    except Exception:
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log.warning("onnx_quant failed; intermediate models kept in %s", work)
        raise
    shutil.rmtree(work if workdir is not None else base, ignore_errors=True)
    return result


def _plan(model: onnx.ModelProto, table: LayerTable, choices: dict[str, LayerChoice], source: Path,
          target: QuantTarget = QuantTarget.ORT) -> list[_Planned]:
    names = table.names
    missing = [n for n in names if n not in choices]
    unknown = [n for n in choices if n not in set(names)]
    if missing or unknown:
        raise ValueError(
            "choices must map every layer of the layer table and nothing else"
            + (f"; missing {missing[:10]}" if missing else "")
            + (f"; not in the table {unknown[:10]}" if unknown else "")
            + " (use QuantPlan.resolve(layer_table.names))"
        )
    inits = initializers(model)
    by_name = {n.name: n for n in model.graph.node if n.name}
    planned = []
    for layer in table:
        where = f"layer {layer.name!r}"
        n = by_name.get(layer.onnx_node)
        if n is None:
            raise ValueError(f"{where}: ONNX node {layer.onnx_node!r} is not in {source}; rebuild the layer table from this export")
        if n.op_type != layer.onnx_op:
            raise ValueError(f"{where}: node {layer.onnx_node!r} is a {n.op_type}, the layer table says {layer.onnx_op}")
        if n.op_type not in SUPPORTED_OPS:
            raise ValueError(f"{where}: op {n.op_type} cannot be quantized (supported: {', '.join(SUPPORTED_OPS)})")
        if layer.weight not in n.input or layer.weight not in inits:
            raise ValueError(
                f"{where}: weight {layer.weight!r} is not a constant initializer input of node {layer.onnx_node!r} "
                f"(inputs {list(n.input)})"
            )
        widx = list(n.input).index(layer.weight)
        expected = 0 if n.op_type == "Gather" else (None if n.op_type == "MatMul" else 1)
        if expected is not None and widx != expected:
            raise ValueError(f"{where}: weight {layer.weight!r} is input {widx} of the {n.op_type}, expected input {expected}")
        p = _Planned(layer, choices[layer.name], widx, target)
        if p.kind == "int8-dynamic" and Int8Activations.DYNAMIC not in TARGET_INT8_ACTIVATIONS[target]:
            raise UnsupportedPlan(
                f"{where}: int8 with dynamic activations has no {target} form (TensorRT's ONNX parser has no "
                "DynamicQuantizeLinear/MatMulInteger); plan int8_activations: static for this backend"
            )
        if p.kind in ("int4-nbits", "int4-qdq", "int8-dynamic") and n.op_type == "MatMul" and widx != 1:
            raise NotImplementedError(f"{where}: {p.kind} needs the weight as the MatMul's second input (x @ W)")
        if p.kind in ("int4-nbits", "int4-qdq") and n.op_type == "MatMul":
            shape = inits[layer.weight].dims
            limit = 2 if p.kind == "int4-qdq" else None  # ORT's QDQ writer keeps 2-D weights only
            if len(shape) < 2 or any(d != 1 for d in shape[:-2]) or (limit and len(shape) != limit):
                raise NotImplementedError(f"{where}: int4 on a MatMul needs a 2-D weight, got shape {list(shape)}")
        planned.append(p)
    return planned


def _quantize(
    reference: Path, table: LayerTable, choices: dict[str, LayerChoice], feeds: Sequence[dict[str, np.ndarray]],
    calibration: Calibration, out_path: Path, work: Path, target: QuantTarget = QuantTarget.ORT,
    uint8_activations: bool = False,
) -> QuantizedModel:
    model = ensure_opset(onnx.load(str(reference)))
    planned = _plan(model, table, choices, reference, target)
    by_kind: dict[str, list[_Planned]] = {}
    for p in planned:
        by_kind.setdefault(p.kind, []).append(p)
    static_kinds = [k for k in ("int8-static", "fp8") if k in by_kind]
    if static_kinds:
        check_feeds(model, feeds)
    # The user's input/output names never meet a name a pass writes (exporters.quant.names).
    repair_duplicate_definitions(model)
    io_names = private_names(model)
    private = {user: placeholder for placeholder, user in io_names.items()}
    feeds = [{private.get(k, k): v for k, v in f.items()} for f in feeds]

    # --- prepare: private weights, Gemm -> MatMul where needed, private activation inputs
    names = NameScope(model)
    rewritten: set[str] = set()
    for p in planned:
        if p.kind == "fp32":
            continue
        make_weight_private(model, p.node, p.weight_index, names)
        # Biases too: a module called twice shares its bias between nodes that may get
        # different formats (int32 bias of one call must not leak into the other).
        n = node(model, p.node)
        if p.op in ("Gemm", "Conv") and len(n.input) > 2 and n.input[2] in initializers(model):
            make_weight_private(model, p.node, 2, names)
        # Only forms that exist for MatMul alone need the rewrite; ort_passes.int8_dynamic_pass hides
        # the other Gemms from quantize_dynamic's Gemm -> MatMul + Add, so int8-static/fp8/bf16 Gemms
        # keep their bias inside the node (as QAT mirrors; MatMulAddFusion + WeightBiasQuantization
        # would otherwise re-round it).
        if p.op == "Gemm" and p.kind in ("int4-nbits", "int4-qdq", "int8-dynamic"):
            gemm_to_matmul(model, p.node, names)
            rewritten.add(p.layer.name)
            p.weight_index = 1
    op_of = {p.node: node(model, p.node).op_type for p in planned}  # after the Gemm rewrites
    for kind in static_kinds:
        groups: dict[tuple[str, int], list[str]] = {}
        for p in by_kind[kind]:
            n = node(model, p.node)
            act = 1 - p.weight_index if n.op_type == "MatMul" else 0
            groups.setdefault((n.input[act], act), []).append(p.node)
        for (tensor, idx), group in groups.items():
            isolate_inputs(model, tensor, group, idx, kind, names)
    current = work / "prepared.onnx"
    _save(model, current)
    current = _pre_process(current, work / "preprocessed.onnx")
    ranks = ort_session_forms.tensor_ranks(onnx.load(str(current), load_external_data=False))

    # --- ORT passes
    calib_parts = []
    if "int8-static" in by_kind:
        group = by_kind["int8-static"]
        nxt = work / "int8_static.onnx"
        ort_passes.int8_static_pass(current, nxt, [p.node for p in group], [op_of[p.node] for p in group],
                                    INT8_METHODS[calibration], feeds, shield=target is QuantTarget.ORT)
        current = nxt
        calib_parts.append(
            calibration.value
            + (f" ({ENTROPY_NUM_BINS} bins, {ENTROPY_NUM_QUANTIZED_BINS} quantized)" if calibration is Calibration.ENTROPY else "")
        )
    if "fp8" in by_kind:
        group = by_kind["fp8"]
        nxt = work / "fp8.onnx"
        ort_passes.fp8_static_pass(current, nxt, [p.node for p in group], [op_of[p.node] for p in group], feeds,
                                   shield=target is QuantTarget.ORT)
        current = nxt
        calib_parts.append(FP8_CALIBRATION)
    if "int8-dynamic" in by_kind:
        group = by_kind["int8-dynamic"]
        nxt = work / "int8_dynamic.onnx"
        ort_passes.int8_dynamic_pass(current, nxt, [p.node for p in group], [op_of[p.node] for p in group])
        current = nxt
    model = onnx.load(str(current))
    int4_ort = by_kind.get("int4-nbits", []) + by_kind.get("gather-int4", [])
    for block in sorted({p.choice.int4_block_size for p in int4_ort}):
        model = ort_passes.int4_nbits_pass(model, [p.node for p in int4_ort if p.choice.int4_block_size == block], block)
    int4_qdq = by_kind.get("int4-qdq", [])
    for block in sorted({p.choice.int4_block_size for p in int4_qdq}):
        model = tensorrt_forms.int4_qdq_matmul_pass(
            model, [p.node for p in int4_qdq if p.choice.int4_block_size == block], block)

    # --- hand-written forms
    names = NameScope(model)
    for p in planned:
        if p.kind == "bf16":
            handwritten.bf16_layer(model, p.node, p.weight_index, names)
        elif p.kind == "gather-bf16":
            handwritten.bf16_gather(model, p.node, names)
        elif p.kind == "int4-conv":
            handwritten.int4_conv(model, p.node, p.choice.int4_block_size, names)
        elif p.kind == "gather-int8":
            handwritten.int8_gather(model, p.node, names)
        elif p.kind == "gather-fp8":
            handwritten.fp8_gather(model, p.node, names)
        elif p.kind.startswith("dq-gather-"):
            tensorrt_forms.dq_gather(model, p.node, p.choice.format, p.choice.int4_block_size, names)
    if target is QuantTarget.TENSORRT:
        tensorrt_forms.fold_int32_dequantize(model)  # TensorRT's DQ takes no int32: biases as fp32
    elif static_kinds:  # ORT's session-time rewrites of a QDQ graph, pre-empted (ort_passes module doc)
        changed = ort_session_forms.pre_empt_session_rewrites(model, ranks, uint8_activations)
        if any(changed.values()):
            log.debug("ORT session rewrites pre-empted: %s", changed)
    restore_names(model, io_names)
    remove_unused_initializers(model)
    _save(model, out_path)
    _check_loads(out_path, planned, optimized=target is QuantTarget.ORT)

    calibration_used = ", ".join(calib_parts) if calib_parts else "none (no static activations)"
    if len(calib_parts) == 2:
        calibration_used = f"{calib_parts[0]} for int8, {FP8_CALIBRATION}"
    layers = [_describe(p, calibration, p.layer.name in rewritten, uint8_activations) for p in planned]
    return QuantizedModel(path=str(out_path), layers=layers, calibration_used=calibration_used)


def _pre_process(src: Path, dst: Path) -> Path:
    """ORT's quant_pre_process without its graph optimizer (which would rename/fuse the
    layer nodes): symbolic + ONNX shape inference only. Falls back to ONNX shape inference
    when symbolic inference cannot handle the graph."""
    import contextlib

    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    try:
        # When symbolic inference gives up, ORT saves "sym_shape_infer_temp.onnx" into the
        # current directory: run it from the work folder so the user's tree stays clean.
        with ort_passes.quiet(), contextlib.chdir(dst.parent):
            quant_pre_process(str(src), str(dst), skip_optimization=True)
        return dst
    except Exception as exc:  # symbolic shape inference gives up on some exporters' graphs
        log.info("symbolic shape inference failed (%s); using ONNX shape inference only", exc)
        with ort_passes.quiet():
            quant_pre_process(str(src), str(dst), skip_optimization=True, skip_symbolic_shape=True)
        return dst


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > 1_800_000_000:  # protobuf's 2 GB limit
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, str(path))


def _check_loads(path: Path, planned: Sequence[_Planned] = (), optimized: bool = True) -> None:
    """Every artifact must load in ORT on the CPU with the options the ORT CPU backend measures
    with (``pipeline.backends.ort_cpu.session_options``: all graph optimizations on).
    ``optimized=False`` (the ``tensorrt`` target, which ORT does not run in measurement): only
    that every kernel exists (ORT_DISABLE_ALL).

    Loading without optimizations only proves the kernels exist; some failures appear only
    once ORT's session-time transformers have rewritten the graph (a stale ``output_dtype`` on
    a Q that QDQPropagation inserted, see ``exporters.quant.ort_passes``), and those used to
    surface at measurement instead. When the plain load works and the optimized one does not,
    the message says so and names the layers the failing node belongs to, if it can tell.
    """
    import onnxruntime as ort

    from exporters.ort_options import session_options

    optimized_error = None
    if optimized:
        try:
            ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
            return
        except Exception as exc:  # noqa: BLE001 - reported below with what is known
            optimized_error = exc
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RuntimeError(f"quantized model {path} does not load in onnxruntime (CPU): {exc}") from exc
    if optimized_error is None:
        return
    layers = _layers_named_in(str(optimized_error), planned)
    raise RuntimeError(
        f"quantized model {path} loads in onnxruntime (CPU) without graph optimizations but not with the "
        f"default ones the ort-cpu backend measures with: {optimized_error}"
        + (f" (node of layer(s) {layers})" if layers else "")
        + ". This is ONNX Runtime rewriting the QDQ graph at session time. Workarounds: plan the layer(s) "
        "involved fp32 or int8 with int8_activations: dynamic, or export the model with a dynamic batch axis "
        "(ORT's MatMulAddFusion only rewrites fixed shapes); please report the model"
    ) from optimized_error


def _layers_named_in(message: str, planned: Sequence[_Planned]) -> list[str]:
    """Layers whose node name appears in an ORT error message (ORT names its new nodes after them)."""
    import re

    return [p.layer.name for p in planned
            if p.node and re.search(r"(^|[^\w.])" + re.escape(p.node) + r"($|[^\w.])", message)]


def _describe(p: _Planned, calibration: Calibration, rewritten: bool, uint8_activations: bool = False) -> LayerQuantization:
    k, op, b = p.kind, p.op, p.choice.int4_block_size
    suffix = " (Gemm rewritten as MatMul + Add)" if rewritten else ""
    table = {
        "fp32": (native.FP32, "fp32, unchanged"),
        "bf16": (native.CAST_BF16, "bf16 emulated: bf16 weights/bias, input and output rounded to bf16 by Cast pairs, fp32 compute"),
        "fp8": (native.QDQ_FP8, "fp8 E4M3FN QDQ, per-tensor weight scale std/std(E4M3), per-tensor activation scale amax/448 (minmax calibration), int32 bias (s_x*s_w)"),
        "int8-static": (
            native.QDQ_INT8,
            f"int8 W8A8 static per-channel symmetric weights, per-tensor symmetric activations"
            + (" (stored uint8, zero point 128: the same values)" if uint8_activations else "")
            + f", {calibration.value}, int32 bias"
            + (", int8 output (QLinearConv)" if op == "Conv" else ", fp32 output"),
        ),
        "int8-dynamic": (
            native.DYNAMIC_INT8,
            "int8 W8A8 dynamic: "
            + ("per-tensor" if op == "Conv" else "per-channel")
            + " symmetric weights, uint8 activations scaled per batch (DynamicQuantizeLinear + "
            + ("ConvInteger)" if op == "Conv" else "MatMulInteger)"),
        ),
        "int4-nbits": (native.MATMULNBITS_INT4, f"int4 weight-only, symmetric blocks of {b} along K, MatMulNBits, fp32 activations"),
        "int4-qdq": (native.QDQ_INT4, f"int4 weight-only, symmetric blocks of {b} along K, blocked DequantizeLinear(int4) + MatMul, fp32 activations"),
        "int4-conv": (native.QDQ_INT4, f"int4 weight-only, symmetric blocks of {b} along I*kh*kw, blocked DequantizeLinear(int4) + Reshape, fp32 Conv"),
        "gather-bf16": (native.CAST_BF16, "bf16 table, Gather then Cast to fp32 (weight-only)"),
        "gather-fp8": (native.GATHER_FP8, "fp8 E4M3FN table, per-tensor std scale, GatherBlockQuantized (weight-only)"),
        "gather-int8": (native.GATHER_INT8, "int8 table, symmetric per row, GatherBlockQuantized uint8 (weight-only)"),
        "gather-int4": (native.GATHER_INT4, f"int4 table, symmetric blocks of {b} along the embedding dim, GatherBlockQuantized (weight-only)"),
        "dq-gather-int8": (native.DQ_GATHER_INT8, "int8 table, symmetric per row, DequantizeLinear of the table then Gather (weight storage only)"),
        "dq-gather-int4": (native.DQ_GATHER_INT4, f"int4 table, symmetric blocks of {b} along the embedding dim, DequantizeLinear of the table then Gather (weight storage only)"),
        "dq-gather-fp8": (native.DQ_GATHER_FP8, "fp8 E4M3FN table, per-tensor std scale, DequantizeLinear of the table then Gather (weight storage only)"),
    }
    realisation, detail = table[k]
    return LayerQuantization(name=p.layer.name, format=p.choice.format, realisation=realisation, detail=detail + suffix)
