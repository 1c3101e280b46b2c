"""The passes done by ONNX Runtime's own quantization tools, one per deployed form.

Each pass quantizes only the nodes it is given (``nodes_to_quantize``, or for
MatMulNBitsQuantizer ``nodes_to_exclude`` = everything else, because its
``nodes_to_include`` *adds* nodes rather than restricting them). Settings, all checked
against the installed onnxruntime 1.32 sources:

* int8 static - ``quantize_static`` QDQ, QInt8 weights per output channel (symmetric
  [-127, 127]) and QInt8 symmetric activations (TensorRT needs zero point 0; ORT x86 runs
  S8S8), int32 bias with ORT's weight-scale adjustment switched off so the weight scale is
  always absmax/127. MatMul/Gemm outputs stay float (ORT fuses DQ->MatMul/Gemm into QGemm
  with fp32 output, an integer kernel); Conv outputs are quantized too, because ORT only
  fuses a Conv into QLinearConv when its output is quantized (checked: without it the Conv
  runs in float on dequantized inputs).
* int8 Entropy calibration is run here with 2048 histogram bins and 255 quantized bins (the
  int8 levels) and handed to quantize_static as its calibration cache: quantize_static alone
  uses 128/128, where the KL search has a single candidate - the full range, i.e. MinMax.
* fp8 - a second ``quantize_static`` with QFLOAT8E4M3FN weights and activations, per tensor,
  Distribution calibration (quantize_static refuses any other calibrator for fp8), outputs
  and bias left in fp32. It runs after the int8 pass, so it calibrates on the graph as
  deployed upstream. Its activation QuantizeLinear nodes are then rewritten to carry the
  fp8 type in ``output_dtype`` instead of a zero-point input (:func:`fp8_q_without_zero_point`),
  which works around an ORT optimizer bug that deletes a Relu feeding an fp8 Q. Finally each
  fp8 *activation* scale (Q and its DQs) is replaced by ``amax/448``, amax from ORT's MinMax
  calibrator on the same graph and feeds (:func:`fp8_activation_scales_from_minmax`): ORT's
  ``std/std(E4M3)`` clips beyond ~4.5 sigma, and transformer activations reach 35-98 sigma.
  Weight scales keep ORT's std rule.
* int8 dynamic - ``quantize_dynamic``: QInt8 per-channel symmetric weights for MatMul
  (per tensor for Conv: ORT's ConvInteger path has no per-channel form), uint8 activations
  from DynamicQuantizeLinear at run time.
* int4 - ``MatMulNBitsQuantizer`` (QOperator, symmetric, accuracy_level unset = fp32
  activations) for MatMul -> MatMulNBits and Gather -> GatherBlockQuantized, once per block size.
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

from exporters import numerics
from exporters.quant.calibration import ENTROPY_NUM_BINS, ENTROPY_NUM_QUANTIZED_BINS, FP8_METHOD, FeedsReader

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
    feeds: Sequence[dict[str, np.ndarray]],
) -> None:
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


def fp8_static_pass(
    src: Path, dst: Path, nodes: Sequence[str], op_types: Sequence[str], feeds: Sequence[dict[str, np.ndarray]]
) -> None:
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


def int8_dynamic_pass(src: Path, dst: Path, nodes: Sequence[str], op_types: Sequence[str]) -> None:
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


def int4_nbits_pass(model: onnx.ModelProto, nodes: Sequence[str], block_size: int) -> onnx.ModelProto:
    """MatMul -> MatMulNBits and Gather -> GatherBlockQuantized for exactly ``nodes``."""
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
            quant_format=QuantFormat.QOperator,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
        quantizer.process()
    return quantizer.model.model
