"""The passes done by ONNX Runtime's own quantization tools, one per deployed form.

Each pass quantizes only the nodes it is given (``nodes_to_quantize``, or for
MatMulNBitsQuantizer ``nodes_to_exclude`` = everything else, because its
``nodes_to_include`` *adds* nodes rather than restricting them). Settings, all checked
against the installed onnxruntime 1.32 sources:

* int8 static - ``quantize_static`` QDQ, QInt8 weights per output channel (symmetric
  [-127, 127]) and QInt8 symmetric activations (TensorRT needs zero point 0; for ORT's CPU they
  may be stored uint8 with zero point 128 afterwards, see below), int32 bias
  with ORT's weight-scale adjustment switched off so the weight scale is
  always absmax/127. MatMul/Gemm outputs stay float (ORT fuses DQ->MatMul/Gemm into QGemm /
  MatMulIntegerToFloat with fp32 output, integer kernels - once the graph is written as the last
  section below says); Conv outputs are quantized too, because ORT only
  fuses a Conv into QLinearConv when its output is quantized (checked: without it the Conv
  runs in float on dequantized inputs).
* int8 Entropy calibration is run here with 2048 histogram bins and 255 quantized bins (the
  int8 levels) and handed to quantize_static as its calibration cache: quantize_static alone
  uses 128/128, where the KL search has a single candidate - the full range, i.e. MinMax.
* fp8 - a second ``quantize_static`` with QFLOAT8E4M3FN weights and activations, per tensor,
  Distribution calibration (quantize_static refuses any other calibrator for fp8), outputs
  left in fp32, Gemm/Conv bias int32 at ``s_x * s_w`` (below). It runs after the int8 pass,
  so it calibrates on the graph as deployed upstream; an fp8 layer reading an int8 Conv's
  output DQ gets it through an Identity first (quantize_static skips DQ outputs as "already
  quantized", which left such a layer without its fp8 input Q). Its activation QuantizeLinear nodes are then rewritten to carry the
  fp8 type in ``output_dtype`` instead of a zero-point input (:func:`fp8_q_without_zero_point`),
  which works around an ORT optimizer bug that deletes a Relu feeding an fp8 Q. Finally each
  fp8 *activation* scale (Q and its DQs) is replaced by ``amax/448``, amax from ORT's MinMax
  calibrator on the same graph and feeds (:func:`fp8_activation_scales_from_minmax`): ORT's
  ``std/std(E4M3)`` clips beyond ~4.5 sigma, and transformer activations reach 35-98 sigma.
  Weight scales keep ORT's std rule.
* int8 dynamic - ``quantize_dynamic``: QInt8 per-channel symmetric weights for MatMul
  (per tensor for Conv: ORT's ConvInteger path has no per-channel form), uint8 activations
  from DynamicQuantizeLinear at run time. Gemms it is not given are hidden from its
  Gemm -> MatMul + Add rewrite (:func:`int8_dynamic_pass`).
* int4 - ``MatMulNBitsQuantizer`` (QOperator, symmetric, accuracy_level unset = fp32
  activations) for MatMul -> MatMulNBits and Gather -> GatherBlockQuantized, once per block size.
  accuracy_level is left unset by measurement, not by default: ``accuracy_level=4`` (int8
  compute, VNNI) was *slower* on an AVX-512 VNNI/AMX Xeon with ORT 1.32 for encoder-sized
  matmuls (all-MiniLM-L6-v2, 16 x 64 tokens, 2 threads, interleaved: block 32 1.19x FP32's
  latency with level 4 vs 0.99x unset; block 128 1.06x vs 1.01x), because MLAS quantizes the
  activations per block for every call; unset, MatMulNBits runs about as fast as FP32 there.

What ORT runs must be what is written. Every default ONNX Runtime session (level BASIC and up)
runs the graph transformer ``WeightBiasQuantization``
(``onnxruntime/core/optimizer/qdq_transformer/weight_bias_quantization.cc``). For each
Conv / ConvTranspose / Gemm whose input 0 comes straight from a DequantizeLinear with a
per-tensor (scalar) scale, and whose output reaches a QuantizeLinear through single-consumer
Relu/Clip nodes only, it

1. quantizes an fp32 *initializer* weight to per-tensor int8 (``Q -> DQ``), and
2. rewrites a 1-D fp32 *initializer* bias as ``DQ(Cast<int32>(Round(b / (s_x * s_w))))``.

It skips the node when the bias exists but is not an initializer (e.g. already a DQ), and
when the weight is a DQ and there is no bias. It runs right after ``QDQPropagationTransformer``,
which moves a DQ with a constant scalar scale forward through single-edge MaxPool / Reshape /
Transpose / Squeeze / Unsqueeze / Slice, so "straight from a DQ" includes those paths. Two forms
the passes would otherwise write are changed by it, so they are written differently here:

* fp8 Gemm/Conv bias (ORT's fp8 QDQ keeps it fp32 behind a float Cast): written as ORT would
  round it, int32 at ``s_x * s_w`` behind a DequantizeLinear (:func:`fp8_int32_biases`, the
  rule of :func:`exporters.numerics.int8_bias_quantize` with the fp8 scales) - for every fp8
  Gemm/Conv, so the rule does not depend on what follows the layer. The transformer then has
  nothing to do, and TensorRT's explicit quantization wants this form too.
* A layer that stays float (fp32 weight initializer) reading an int8-static Conv's output
  DequantizeLinear would run int8. The int8 Conv's output ``Q -> DQ`` has to stay exactly as
  it is (ORT fuses the Conv into QLinearConv only when its output is quantized, and on x86 only
  after converting that pair to uint8, which needs a scalar single-edge pair), so the float
  layer reads it through a second, *per-axis* ``Q -> DQ`` repeating the same scale and zero
  point (:func:`shield_float_layers`): bit for bit the same values, and a non-scalar scale,
  which neither WeightBiasQuantization, QDQPropagation nor DoubleQDQPairsRemover matches.
  (A per-axis DQ in place of the int8 Conv's own DQ was tried: it blocks the uint8 conversion
  and with it the QLinearConv fusion of the int8 layer.) The shield is ORT-specific:
  ``shield=False`` leaves it out (TensorRT wants per-tensor activation Q/DQ).

Two more session-time rewrites, and the graph shapes that kept ORT's x86 kernels from fusing
int8 layers, are pre-empted after these passes: :mod:`exporters.quant.ort_session_forms`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from exporters.quant.calibration import ENTROPY_NUM_BINS, ENTROPY_NUM_QUANTIZED_BINS, FP8_METHOD, FeedsReader
from exporters.quant.fp8_rewrites import (  # noqa: F401 - fp8_* were defined here; callers import them from here
    fp8_activation_scales_from_minmax,
    fp8_int32_biases,
    fp8_q_without_zero_point,
)
from exporters.quant.graph import NameScope, insert_before, is_scalar_init, node, node_index, remove_unused_initializers

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """ORT's quantizers print progress to stdout and warn on the root logger; keep them quiet."""
    root = logging.getLogger()
    level = root.level
    ort_logger = logging.getLogger("onnxruntime")
    ort_level = ort_logger.level
    buf = io.StringIO()
    try:
        root.setLevel(logging.ERROR)
        ort_logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        root.setLevel(level)
        ort_logger.setLevel(ort_level)
        if buf.getvalue():
            log.debug("onnxruntime.quantization output:\n%s", buf.getvalue())


def _entropy_cache(src: Path, op_types: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], cache: Path) -> Path:
    """ORT's EntropyCalibrater with a real search space, saved in quantize_static's cache format."""
    calibrator = create_calibrator(
        src, sorted(set(op_types)), augmented_model_path=str(cache.with_suffix(".augmented.onnx")),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_NUM_BINS, "num_quantized_bins": ENTROPY_NUM_QUANTIZED_BINS},
    )
    calibrator.collect_data(FeedsReader(feeds))
    cache.unlink(missing_ok=True)
    save_tensors_data(calibrator.compute_data(), cache)
    return cache


def int8_static_pass(
    src: Path, dst: Path, nodes: Sequence[str], op_types: Sequence[str], method: CalibrationMethod,
    feeds: Sequence[dict[str, np.ndarray]], shield: bool = True,
) -> None:
    """int8 W8A8 static QDQ for ``nodes``. ``shield``: keep float Conv/Gemm layers behind an
    int8 Conv float in ORT (:func:`shield_float_layers`; ORT-specific, numerically neutral)."""
    with quiet():
        cache = None
        if method == CalibrationMethod.Entropy:
            cache = _entropy_cache(src, op_types, feeds, dst.with_name(dst.stem + ".entropy.json"))
        quantize_static(
            str(src),
            str(dst),
            FeedsReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=sorted(set(op_types)),
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(nodes),
            calibrate_method=method,
            calibration_cache_path=cache,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QDQDisableWeightAdjustForInt32Bias": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": -1},
                "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
            },
        )
    model = onnx.load(str(dst))
    activation_dq_value_info(model)
    if shield:
        shield_float_layers(model)
    onnx.save(model, str(dst))


def fp8_static_pass(
    src: Path, dst: Path, nodes: Sequence[str], op_types: Sequence[str], feeds: Sequence[dict[str, np.ndarray]],
    shield: bool = True,
) -> None:
    """fp8 E4M3FN QDQ for ``nodes`` (int32 biases, amax/448 activation scales; see the module doc)."""
    prepared = onnx.load(str(src))
    touched = unshield(prepared, nodes) + activation_dq_value_info(prepared) + _behind_identity(prepared, nodes)
    if touched:  # the int8 pass's shields off layers that are fp8 after all; int8 DQs behind an Identity
        src = dst.with_name(dst.stem + ".unshielded.onnx")
        onnx.save(prepared, str(src))
    with quiet():
        quantize_static(
            str(src),
            str(dst),
            FeedsReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=sorted(set(op_types)),
            per_channel=False,
            reduce_range=False,
            activation_type=QuantType.QFLOAT8E4M3FN,
            weight_type=QuantType.QFLOAT8E4M3FN,
            nodes_to_quantize=list(nodes),
            calibrate_method=FP8_METHOD,
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm", "Conv"]},
        )
    model = onnx.load(str(dst))
    fp8_q_without_zero_point(model)
    with quiet():
        ranges = _minmax_ranges(src, op_types, feeds, dst.with_name(dst.stem + ".minmax.augmented.onnx"))
    fp8_activation_scales_from_minmax(model, ranges)
    fp8_int32_biases(model, nodes)  # after the scale rewrite: s_x is the deployed amax/448
    if shield:
        shield_float_layers(model)
    onnx.save(model, str(dst))


def _minmax_ranges(
    src: Path, op_types: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], augmented: Path
) -> dict[str, tuple[float, float]]:
    """ORT's MinMax calibrator (global min / max over all batches) on ``src``: tensor -> (rmin, rmax)."""
    calibrator = create_calibrator(
        src, sorted(set(op_types)), augmented_model_path=str(augmented), calibrate_method=CalibrationMethod.MinMax
    )
    calibrator.collect_data(FeedsReader(feeds))
    data = calibrator.compute_data()
    augmented.unlink(missing_ok=True)
    out = {}
    for name, td in data.items():
        lo, hi = td.range_value
        out[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    return out


# --------------------------------------------------------------------------- WeightBiasQuantization
WEIGHT_BIAS_OPS = ("Conv", "ConvTranspose", "Gemm")
"""Op types ORT's WeightBiasQuantization transformer rewrites."""

DQ_PROPAGATES_THROUGH = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")
"""Ops ORT's QDQPropagationTransformer moves a scalar-scale DequantizeLinear forward through
(``CanNodePropagate`` in qdq_propagation.cc; it runs just before WeightBiasQuantization)."""


def _float_weight_layer(n: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A node whose fp32 initializer weight WeightBiasQuantization would quantize to int8."""
    return (n.op_type in WEIGHT_BIAS_OPS and len(n.input) > 1 and n.input[1] in inits
            and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT)


def _input_channel_axis(n: onnx.NodeProto, w: onnx.TensorProto) -> tuple[int, int]:
    """(axis, size) of the reduction (input-channel) axis of a Conv/ConvTranspose/Gemm's input 0,
    read from its weight, so no shape inference is needed."""
    def attr(name: str, default: int) -> int:
        return next((a.i for a in n.attribute if a.name == name), default)

    dims = list(w.dims)
    if n.op_type == "Conv":
        return 1, dims[1] * attr("group", 1)
    if n.op_type == "ConvTranspose":
        return 1, dims[0]
    k = dims[1] if attr("transB", 0) else dims[0]  # Gemm
    return (0 if attr("transA", 0) else 1), k


SHIELD_TAG = "_keep_float"
"""Name marker of the Q/DQ pairs :func:`shield_float_layers` writes (``unshield`` finds them by it)."""

_TRANSPARENT = ("Identity", "Dropout")  # removed by ORT's level-1 rules before WeightBiasQuantization


def _feeding_dq(model: onnx.ModelProto, tensor: str, producer: dict, inits: dict) -> onnx.NodeProto | None:
    """The per-tensor activation DequantizeLinear that ORT would see feeding ``tensor`` after its
    level-1 rules (Identity/Dropout removed) and DQ propagation (MaxPool/Reshape/...), if any."""
    p = producer.get(tensor)
    while p is not None and (p.op_type in _TRANSPARENT or p.op_type in DQ_PROPAGATES_THROUGH):
        p = producer.get(p.input[0])
    if p is None or p.op_type != "DequantizeLinear" or p.input[0] in inits:
        return None
    if SHIELD_TAG in p.name or not is_scalar_init(inits.get(p.input[1])):
        return None  # already shielded / per-axis: neither transformer matches it
    if len(p.input) < 3 or p.input[2] not in inits:
        return None  # the int8 pass always writes a zero point; without one the type is unknown here
    if inits[p.input[2]].data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
        return None
    return p


def shield_float_layers(model: onnx.ModelProto) -> int:
    """Keep float Conv/Gemm layers float in ORT: no per-tensor DQ may feed their input 0.

    A layer that stays fp32 but reads an int8-static Conv's output ``DequantizeLinear`` (maybe
    through Identity, or through ops that ORT's QDQPropagation moves the DQ across) has its
    fp32 weight quantized to per-tensor int8 by ORT's WeightBiasQuantization. The int8 Conv's
    ``Q -> DQ`` pair must stay as it is (scalar, one edge: ORT's x86 S8->U8 conversion and the
    QLinearConv fusion need exactly that), so the float layer's input gets its own
    ``QuantizeLinear -> DequantizeLinear`` with a *per-axis* scale and zero point that repeat the
    per-tensor ones. The values are unchanged bit for bit: the input is already on the int8 grid
    (``q*s`` re-quantizes to ``q`` exactly for |q| <= 128), and a per-axis DQ matches neither
    WeightBiasQuantization (it wants a scalar input scale), QDQPropagation nor
    DoubleQDQPairsRemover (both want scalar pairs). Returns how many layers were shielded.
    Neutral for any reader, so it may run before later passes quantize some of those layers
    (:func:`unshield` takes it off them again).
    """
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    victims = [(n.name, _feeding_dq(model, n.input[0], producer, inits)) for n in model.graph.node
               if _float_weight_layer(n, inits)]
    victims = [(name, dq.name) for name, dq in victims if dq is not None]
    if not victims:
        return 0
    names = NameScope(model)
    for layer, dq_name in victims:
        n, dq = node(model, layer), node(model, dq_name)
        axis, size = _input_channel_axis(n, inits[n.input[1]])
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]]).reshape(())
        zp = onnx.numpy_helper.to_array(inits[dq.input[2]]).reshape(())
        s_name = names.fresh(f"{dq.input[1]}{SHIELD_TAG}_{layer}")
        z_name = names.fresh(f"{dq.input[2]}{SHIELD_TAG}_{layer}")
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.full(size, scale, dtype=scale.dtype), s_name))
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.full(size, zp, dtype=zp.dtype), z_name))
        x = n.input[0]
        q_out, dq_out = names.fresh(f"{x}{SHIELD_TAG}_q"), names.fresh(f"{x}{SHIELD_TAG}")
        q = onnx.helper.make_node("QuantizeLinear", [x, s_name, z_name], [q_out], name=names.fresh(f"{layer}{SHIELD_TAG}_QuantizeLinear"), axis=axis)
        d = onnx.helper.make_node("DequantizeLinear", [q_out, s_name, z_name], [dq_out], name=names.fresh(f"{layer}{SHIELD_TAG}_DequantizeLinear"), axis=axis)
        insert_before(model, layer, [q, d])
        node(model, layer).input[0] = dq_out
        _copy_value_info(model, x, dq_out)
    return len(victims)


def unshield(model: onnx.ModelProto, nodes: Sequence[str]) -> int:
    """Take :func:`shield_float_layers`' Q/DQ off ``nodes`` (layers a later pass quantizes)."""
    targets = set(nodes)
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for n in model.graph.node:
        if n.name not in targets or not n.input:
            continue
        d = producer.get(n.input[0])
        if d is None or d.op_type != "DequantizeLinear" or SHIELD_TAG not in d.name:
            continue
        q = producer[d.input[0]]
        n.input[0] = q.input[0]
        count += 1
    if count:
        used = {i for m in model.graph.node for i in m.input} | {o.name for o in model.graph.output}
        for _ in range(2):  # the DQ, then its Q
            dead = [m.name for m in model.graph.node if SHIELD_TAG in m.name and not any(o in used for o in m.output)]
            for name in dead:
                del model.graph.node[node_index(model, name)]
            used = {i for m in model.graph.node for i in m.input} | {o.name for o in model.graph.output}
        remove_unused_initializers(model)
    return count


def _behind_identity(model: onnx.ModelProto, nodes: Sequence[str]) -> int:
    """Feed each activation input of ``nodes`` that an (int8) DequantizeLinear produces through an Identity.

    quantize_static deliberately skips a tensor that a DequantizeLinear produces ("already
    quantized"), so an fp8 Conv right after an int8-static Conv kept reading the int8 DQ: no fp8
    input quantizer, its bias scaled by the int8 scale. Behind an Identity the tensor is a plain
    float tensor to the fp8 pass (``int8 DQ -> fp8 Q -> fp8 DQ``, as QAT models it); ORT drops the
    Identity when it loads the model. Returns how many inputs were rerouted.
    """
    targets = set(nodes)
    inits = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    names = NameScope(model)
    todo = []
    for n in model.graph.node:
        if n.name not in targets:
            continue
        for k, x in enumerate(n.input):
            p = producer.get(x)
            if p is not None and p.op_type == "DequantizeLinear" and p.input[0] not in inits:
                todo.append((n.name, k, x))
    for layer, k, x in todo:
        out = names.fresh(f"{x}__fp8_input")
        insert_before(model, layer, [onnx.helper.make_node("Identity", [x], [out], name=names.fresh(f"{out}_isolate"))])
        node(model, layer).input[k] = out
        _copy_value_info(model, x, out)
    return len(todo)


def _copy_value_info(model: onnx.ModelProto, src: str, dst: str) -> bool:
    """Give tensor ``dst`` the type/shape recorded for ``src`` (ORT's quantizer and calibrators
    only handle tensors that have a value_info)."""
    if any(v.name == dst for v in model.graph.value_info):
        return True
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if v.name == src:
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(v)
            copy.name = dst
            model.graph.value_info.append(copy)
            return True
    return False


def activation_dq_value_info(model: onnx.ModelProto) -> int:
    """Record type and shape of every activation DQ output whose Q input has them.

    quantize_static writes ``x -> Q -> DQ -> x_DequantizeLinear_Output`` without a value_info
    for the new tensor; a later quantize_static (the fp8 pass) then cannot type it, skips it
    ("failed to infer the type") and leaves the fp8 layer reading the int8 DQ directly -
    an fp8 Conv right after an int8-static Conv ran on int8 inputs without its fp8 input Q.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for d in model.graph.node:
        if d.op_type != "DequantizeLinear" or d.input[0] in inits or d.input[1] not in inits:
            continue
        q = producer.get(d.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        if not _copy_value_info(model, q.input[0], d.output[0]):  # no shape known: the type is enough
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(d.output[0], inits[d.input[1]].data_type, None))
        count += 1
    return count


_HIDDEN_GEMM_DOMAIN, _HIDDEN_GEMM = "precision_search.hidden", "HiddenGemm"


def int8_dynamic_pass(src: Path, dst: Path, nodes: Sequence[str], op_types: Sequence[str]) -> None:
    """int8 dynamic (DynamicQuantizeLinear + MatMulInteger/ConvInteger) for ``nodes``.

    quantize_dynamic rewrites *every* Gemm of the graph into MatMul + Add first
    (``ONNXModel.replace_gemm_with_matmul``), also Gemms it does not quantize - an int8-static
    or fp8 Gemm (int32 bias inside) would become a MatMul + float Add that ORT's
    MatMulAddFusion turns back into a Gemm at session time, where WeightBiasQuantization may
    round that bias again. So every Gemm that is not a target is hidden from it (op type
    renamed into a private domain: ORT matches ``op_type == "Gemm"`` alone) and restored
    afterwards, unchanged and under its name.
    """
    prepared = onnx.load(str(src))
    targets = set(nodes)
    hidden = [n.name for n in prepared.graph.node if n.op_type == "Gemm" and n.domain in ("", "ai.onnx") and n.name not in targets]
    changed = unshield(prepared, nodes)  # ConvInteger/MatMulInteger read no DQ: the int8 pass's shield is not needed
    for name in hidden:
        g = node(prepared, name)
        g.op_type, g.domain = _HIDDEN_GEMM, _HIDDEN_GEMM_DOMAIN
    if hidden:
        prepared.opset_import.append(onnx.helper.make_opsetid(_HIDDEN_GEMM_DOMAIN, 1))
    if changed or hidden:
        src = dst.with_name(dst.stem + ".prepared.onnx")
        onnx.save(prepared, str(src))
    with quiet():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=sorted(set(op_types)),
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=list(nodes),
            extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True},
        )
    if hidden:
        model = onnx.load(str(dst))
        kept = 0
        for n in model.graph.node:
            if n.domain == _HIDDEN_GEMM_DOMAIN and n.op_type == _HIDDEN_GEMM:
                n.op_type, n.domain = "Gemm", ""
                kept += 1
        if kept != len(hidden):
            raise RuntimeError(f"int8 dynamic pass: {len(hidden)} Gemm nodes hidden from quantize_dynamic, {kept} came back")
        for imp in [o for o in model.opset_import if o.domain == _HIDDEN_GEMM_DOMAIN]:
            model.opset_import.remove(imp)
        onnx.save(model, str(dst))


def int4_nbits_pass(model: onnx.ModelProto, nodes: Sequence[str], block_size: int,
                    qdq: bool = False) -> onnx.ModelProto:
    """MatMul -> MatMulNBits and Gather -> GatherBlockQuantized for exactly ``nodes``.

    ``qdq=True``: ORT's QDQ form instead, MatMul only - a blocked DequantizeLinear(int4, axis 0)
    feeding the MatMul (the TensorRT target's int4 form; ORT renames the MatMul ``<name>_matmul_Q4``).
    Same MLAS block rule either way, symmetric (int4, no zero point).
    """
    targets = set(nodes)
    exclude = sorted({n.name for n in model.graph.node} - targets)
    with quiet():
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=None,
            nodes_to_exclude=exclude,
            quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
            op_types_to_quantize=("MatMul",) if qdq else ("MatMul", "Gather"),
            quant_axes=(("MatMul", 0),) if qdq else (("MatMul", 0), ("Gather", 1)),
        )
        quantizer.process()
    return quantizer.model.model
