"""Quantization-aware training for Keras 3 models (TensorFlow backend).

The fake quantizers reproduce what ``exporters.onnx_quant`` deploys (rules:
``exporters.numerics``), per layer, on the weight *as the ONNX node holds it*:
each Keras kernel is mapped to its ONNX initializer layout (Dense [K, N] as is,
Conv2D HWIO -> OIHW, Conv1D -> [O, I, 1, k]; found by matching the reference
ONNX's weight exactly), quantized there with the deployed per-channel axis /
block axis, and mapped back. Per (format, node):

=============  ==========================================================  ==========================================
format         weight (ONNX layout)                                        activations / bias
=============  ==========================================================  ==========================================
int8 static    symmetric per output channel, ``absmax/127``, rne           input per tensor (calibrated, sat.);
                                                                           Conv/Gemm: int32 bias ``s_x*s_w``;
                                                                           Conv: output q'd
int8 dynamic   per output channel (Conv: per tensor)                       input uint8 per call (DynamicQuantizeLinear)
fp8 E4M3FN     per tensor, ``std(w)/std(E4M3)``, sat. +-448, rne           input per tensor, ``amax/448`` (MinMax);
                                                                           Conv/Gemm: int32 bias ``s_x*s_w``
int4           blocks of B along K (Conv: along I*kh*kw), ``v/-8``,        unchanged (weight only)
               MLAS rounding ``roundf(w/s + 8) - 8`` (ties up)
bf16           bf16 (rne); Conv bias too                                   input and node output rounded to bf16
=============  ==========================================================  ==========================================

The Keras export writes a ``Dense`` on a 2-D input as a Gemm holding its bias
(``keras_adapter.fold_dense_bias``; int8-static/fp8: int32 bias at ``s_x*s_w``, as a
Conv's) and ``Conv*`` as a Conv holding its bias; ``EinsumDense`` and a Dense on a 3-D or
larger input stay MatMul + a float ``Add`` (the bias stays fp32 and a bf16 output is
rounded *before* the bias). The fake quantizers follow the node, not the Keras layer. A
2-D Dense whose bias is all zeros is a bare MatMul in the reference (tf2onnx drops the
Add), but once fine-tuning moves the bias the export is a Gemm again: such a layer is
trained with the Gemm's bias rule (the same numbers while the bias is zero).
Static activation ranges are observed on the FP32 model with ONNX Runtime's own
collectors and settings (through :class:`pipeline.qat.fake_quant.ActivationFakeQuant`,
the same statistics code the PyTorch QAT uses) and refreshed every
:data:`pipeline.qat.RECALIBRATE_EVERY` steps. Gradients are straight-through
(identity for weights, zero outside the representable range for activations).

Keras 3's own quantization (``layer.quantize("int8" | "int4" | "float8")``) was
checked (keras 3.15.1) and does not match the deployed numerics: its int8 scales
are ``127/(absmax+eps)`` with activations quantized per *row* on the fly, its int4
is asymmetric with zero points, its float8 uses delayed amax-history scaling -
none is ORT's rule, so training with them would train a different grid.

How the quantizers are attached: each planned layer's ``call`` is replaced on the
instance (not the class) by an equivalent that applies the quantizers, and
restored afterwards. Layers a layer owns are covered too (MultiHeadAttention's
query/key/value/output EinsumDense). A layer called several times (shared
weights) is one weight quantizer but one activation quantizer per call, because
the export has one node - and one calibrated scale - per call. Layer objects, names and variables stay the user's, so the
fine-tuned model exports with an identical layer table, and subclassed models
work as well as functional ones.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from exporters import numerics
from pipeline.formats import Calibration, Format, Int8Activations
from pipeline.formats import registry as formats
from pipeline.models.base import ReferenceModel
from pipeline.plan import LayerChoice

from pipeline.qat.keras_fake_quant import (  # noqa: F401 - the TF rules, one home
    E4M3_MAX, E4M3_STD, INT8_QMAX, INT8_QMIN, _tf, _ste, _ste_masked, int8_weight_scale, _per_axis, fake_int8_weight, fake_int8_static, fake_int8_dynamic, fp8_weight_scale, _e4m3, fake_fp8, fake_bf16, _roundf, fake_int4_blocks, fake_int8_bias,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- per layer
@dataclass
class _ActQ:
    """One activation quantizer: its kind, the deployed scale (a tf.Variable), its statistics."""

    kind: str  # int8_static | int8_dynamic | fp8 | bf16
    name: str
    scale: Any = None  # tf.Variable for static kinds
    stats: Any = None  # pipeline.qat.fake_quant.ActivationFakeQuant (numpy/ORT statistics only)

    @property
    def needs_calibration(self) -> bool:
        return formats.qat_kind_calibrated(self.kind)

    def apply(self, x, mode: str):
        if mode == "observe":
            if self.needs_calibration:
                import torch

                self.stats.observe(torch.from_numpy(np.array(x, dtype=np.float32)))
            return x
        if mode != "qat":
            return x
        if self.kind == "bf16":
            return fake_bf16(x)
        if self.kind == "int8_dynamic":
            return fake_int8_dynamic(x)
        if self.kind == "int8_static":
            return fake_int8_static(x, self.scale)
        return fake_fp8(x, self.scale, weight=False)


@dataclass
class _QLayer:
    name: str
    layer: Any
    family: str  # dense | einsum | conv
    choice: LayerChoice
    onnx_op: str  # MatMul | Gemm | Conv
    perm: tuple[int, ...]  # Keras kernel axes -> ONNX weight axes (before the reshape)
    onnx_shape: tuple[int, ...]
    channel_axis: int  # output-channel axis of the ONNX weight
    input_qs: list  # per call of the layer (a shared layer has one ONNX node, and one scale, per call)
    output_qs: list
    bias_in_node: bool
    last_weight_scale: Any = None
    _calls: int = 0

    def next_use(self) -> int:
        """Which call of the layer this is, within one forward pass (calls come in graph order)."""
        i = self._calls % len(self.input_qs)
        self._calls += 1
        return i

    def to_onnx(self, k):
        tf = _tf()
        return tf.reshape(tf.transpose(k, self.perm), self.onnx_shape)

    def from_onnx(self, w, kernel_shape):
        tf = _tf()
        transposed = [kernel_shape[p] for p in self.perm]
        inv = [self.perm.index(i) for i in range(len(self.perm))]
        return tf.transpose(tf.reshape(w, transposed), inv)

    def weight(self, kernel, mode: str):
        if mode != "qat":
            return kernel
        tf = _tf()
        fmt = self.choice.format
        w = self.to_onnx(kernel)
        if fmt is Format.BF16:
            wq = fake_bf16(w)
        elif fmt is Format.FP8:
            s = fp8_weight_scale(w)
            self.last_weight_scale = s  # per tensor: the fp8 Conv bias is int32 at s_x * s_w too
            wq = fake_fp8(w, s, weight=True)
        elif fmt is Format.INT8:
            per_tensor = self.onnx_op == "Conv" and self.choice.int8_activations is Int8Activations.DYNAMIC
            wq, s = fake_int8_weight(w, None if per_tensor else self.channel_axis)
            self.last_weight_scale = s
        else:  # int4: [N, K] rows = output channels, K = the reduction axis as ONNX stores it
            if self.onnx_op == "Conv":
                wq = tf.reshape(fake_int4_blocks(tf.reshape(w, [self.onnx_shape[0], -1]), self.choice.int4_block_size),
                                self.onnx_shape)
            else:  # MatMul [K, N]
                wq = tf.transpose(fake_int4_blocks(tf.transpose(w), self.choice.int4_block_size))
        return self.from_onnx(wq, [int(d) for d in kernel.shape])

    def bias(self, b, mode: str, input_q: _ActQ | None):
        if mode != "qat" or b is None or not self.bias_in_node:
            return b
        if self.choice.format is Format.BF16:
            return fake_bf16(b)
        if (input_q is not None and self.last_weight_scale is not None
                and ((self.choice.format is Format.INT8 and input_q.kind == "int8_static")
                     or (self.choice.format is Format.FP8 and input_q.kind == "fp8"))):
            return fake_int8_bias(b, input_q.scale, self.last_weight_scale)
        return b


def _input_kind(choice: LayerChoice) -> str | None:
    return formats.qat_input_kind(choice)


def _output_kind(choice: LayerChoice, onnx_op: str) -> str | None:
    return formats.qat_output_kind(choice, onnx_op)


def _find_perm(kernel: np.ndarray, onnx_w: np.ndarray, preferred: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The axis permutation p with ``kernel.transpose(p).reshape(W.shape) == W`` exactly."""
    cands = ([preferred] if preferred else []) + list(itertools.permutations(range(kernel.ndim)))
    for p in cands:
        t = kernel.transpose(p)
        if t.size == onnx_w.size and np.array_equal(t.reshape(onnx_w.shape), onnx_w):
            return tuple(p)
    return None


class KerasQAT:
    """Fake quantizers on the planned layers of one Keras model, for one plan.

    Modes: ``fp32`` (identity), ``observe`` (identity, static activation quantizers
    record statistics; eager calls only), ``qat`` (deployed numerics).
    """

    def __init__(self, model, choices: dict[str, LayerChoice], reference: ReferenceModel,
                 calibration: Calibration = Calibration.MINMAX):
        import onnx
        from onnx import numpy_helper

        from pipeline.models.keras_adapter import enumerate_layers, import_tf
        from pipeline.qat.fake_quant import ActivationFakeQuant

        tf, keras = import_tf()
        self.model = model
        self.calibration = Calibration(calibration)
        self.mode = "fp32"
        self.layers: list[_QLayer] = []
        ref_model = onnx.load(reference.onnx_path)
        graph = ref_model.graph
        rank_cache: dict[str, int] = {}

        def ranks() -> dict[str, int]:
            if not rank_cache:
                from pipeline.models.keras_adapter import tensor_ranks

                rank_cache.update(tensor_ranks(ref_model) or {"": 0})
            return rank_cache
        inits = {i.name: i for i in graph.initializer}
        nodes = {n.name: n for n in graph.node}
        klayers = {kl.name: kl for kl in enumerate_layers(model, keras)}
        table = {l.name: l for l in reference.layer_table}
        unknown = [n for n in choices if n.split("#")[0] not in klayers]
        if unknown:
            raise ValueError(f"QAT: plan layer(s) {unknown} are not layers of this Keras model; "
                             f"its layers are {list(klayers)[:20]}")
        done: dict[str, LayerChoice] = {}
        for name, choice in choices.items():
            base = name.split("#")[0]
            if base in done:  # a shared layer: one weight, one fake quantizer (the first call's format)
                if done[base] != choice:
                    log.warning("QAT: %s shares its weight with %s; training with %s's format (%s)",
                                name, base, base, done[base].format)
                continue
            done[base] = choice
            if choice.format is Format.FP32:
                continue
            kl = klayers[base]
            row = table[base]
            if kl.kind == "embedding":
                raise NotImplementedError(f"QAT: Keras Embedding layers ({base}) are not supported yet; plan them fp32 "
                                          "or use method: ptq")
            if row.onnx_op not in ("MatMul", "Gemm", "Conv"):
                raise NotImplementedError(f"QAT: layer {base} became an ONNX {row.onnx_op}; only MatMul/Gemm/Conv")
            layer = kl.layer
            node = nodes[row.onnx_node]
            w = numpy_helper.to_array(inits[row.weight]).astype(np.float32)
            family = ("conv" if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)) else
                      "einsum" if isinstance(layer, keras.layers.EinsumDense) else "dense")
            preferred = _preferred_perm(family, kl.weight.ndim)
            perm = _find_perm(kl.weight, w, preferred)
            if perm is None:
                raise RuntimeError(f"QAT: cannot map layer {base}'s kernel {kl.weight.shape} onto its ONNX weight "
                                   f"{w.shape}; was the reference exported from these weights?")
            if row.onnx_op == "Gemm":
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                axis = 0 if trans_b else 1
            else:
                axis = 0 if row.onnx_op == "Conv" else len(w.shape) - 1
            bias_in_node = row.onnx_op in ("Conv", "Gemm") and len(node.input) > 2 and bool(node.input[2])
            if (not bias_in_node and family == "dense" and row.onnx_op == "MatMul" and getattr(layer, "use_bias", False)
                    and not np.any(np.asarray(layer.bias.numpy())) and ranks().get(node.input[0]) == 2
                    and not any(n.op_type in ("Add", "Reshape") and node.output[0] in n.input for n in graph.node)):
                # an all-zero bias that tf2onnx dropped from a 2-D Dense (no Tensordot Reshape after
                # it): once fine-tuning moves it, the export folds MatMul + Add into a Gemm
                bias_in_node = True
            uses = sum(1 for n in table if n.split("#")[0] == base)
            ql = _QLayer(base, layer, family, choice, row.onnx_op, perm, tuple(w.shape), axis, [], [], bias_in_node)
            for use in range(uses):
                for which, kind in (("input", _input_kind(choice)), ("output", _output_kind(choice, row.onnx_op))):
                    aq = None
                    if kind is not None:
                        aq = _ActQ(kind, f"{base}{'#%d' % (use + 1) if use else ''}:{which}")
                        if aq.needs_calibration:
                            aq.scale = tf.Variable(1.0, trainable=False, dtype=tf.float32,
                                                   name=f"qat_scale_{len(self.layers)}_{use}_{which}")
                            aq.stats = ActivationFakeQuant(kind, self.calibration, name=aq.name)
                    getattr(ql, f"{which}_qs").append(aq)
            self.layers.append(ql)
        for ql in self.layers:
            self._attach(ql)

    # -- attach / detach -------------------------------------------------------
    def _attach(self, ql: _QLayer) -> None:
        from pipeline.models.keras_adapter import import_tf

        _, keras = import_tf()
        ops = keras.ops
        layer = ql.layer
        if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
            raise NotImplementedError(f"QAT: layer {ql.name} is already Keras-quantized or has LoRA enabled")
        qat = self

        def mode() -> str:
            return qat.mode_for(ql)

        def finish(y, bias, out_q):
            if ql.bias_in_node:  # Conv: bias inside the node, output quantized after it
                if bias is not None:
                    y = y + bias
                if out_q is not None:
                    y = out_q.apply(y, mode())
            else:  # MatMul (or a Conv without bias input) then a float Add: node output is before the bias
                if out_q is not None:
                    y = out_q.apply(y, mode())
                if bias is not None:
                    y = y + bias
            return layer.activation(y) if layer.activation is not None else y

        def quantizers():
            i = ql.next_use()
            return ql.input_qs[i], ql.output_qs[i]

        if ql.family == "dense":
            def call(inputs, training=None):
                in_q, out_q = quantizers()
                x = in_q.apply(inputs, mode()) if in_q else inputs
                y = ops.matmul(x, ql.weight(layer.kernel, mode()))
                return finish(y, ql.bias(layer.bias, mode(), in_q), out_q)
        elif ql.family == "einsum":
            def call(inputs, training=None):
                in_q, out_q = quantizers()
                x = in_q.apply(inputs, mode()) if in_q else inputs
                y = ops.einsum(layer.equation, x, ql.weight(layer.kernel, mode()))
                return finish(y, ql.bias(layer.bias, mode(), in_q), out_q)
        else:
            def call(inputs):
                in_q, out_q = quantizers()
                padding = layer.padding
                if padding == "causal":
                    inputs = ops.pad(inputs, layer._compute_causal_padding())
                    padding = "valid"
                x = in_q.apply(inputs, mode()) if in_q else inputs
                y = ops.conv(x, ql.weight(layer.kernel, mode()), strides=list(layer.strides), padding=padding,
                             dilation_rate=layer.dilation_rate, data_format=layer.data_format)
                bias = None
                if layer.use_bias:
                    shape = ((1,) * (layer.rank + 1) + (layer.filters,) if layer.data_format == "channels_last"
                             else (1, layer.filters) + (1,) * layer.rank)
                    bias = ops.reshape(ql.bias(layer.bias, mode(), in_q), shape)
                return finish(y, bias, out_q)

        layer.__dict__["call"] = call  # instance attribute shadows the class method; restored by detach()

    def detach(self) -> None:
        for ql in self.layers:
            ql.layer.__dict__.pop("call", None)
        self.layers = []

    # -- modes -----------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in ("fp32", "observe", "qat", "observe-after-int8"):
            raise ValueError(f"mode must be fp32, observe or qat, not {mode!r}")
        self.mode = mode

    def mode_for(self, ql: _QLayer) -> str:
        """``observe-after-int8``: static-int8 layers run quantized, the rest observe (see calibrate)."""
        if self.mode != "observe-after-int8":
            return self.mode
        return "qat" if _is_int8_static(ql.choice) else "observe"

    def static_quantizers(self) -> list[_ActQ]:
        return [q for ql in self.layers for q in ql.input_qs + ql.output_qs if q is not None and q.needs_calibration]

    def calibrate(self, batches: list[dict[str, np.ndarray]], call: Callable[[Any, dict], Any]) -> int:
        """Static activation scales from the FP32 model on ``batches`` (eager), as ORT's
        calibrator gets them from the FP32 ONNX graph. Returns how many were set."""
        static = self.static_quantizers()
        if not static:
            return 0
        int8 = [q for ql in self.layers if _is_int8_static(ql.choice) for q in ql.input_qs + ql.output_qs if q is not None]
        fp8 = [q for q in static if q.kind == "fp8"]
        # The quantizer calibrates int8-static layers on the FP32 graph, then fp8 layers on the
        # graph with the int8 QDQ already in place (exporters.onnx_quant pass order): same here.
        phases = [("observe", int8 if fp8 and int8 else static)]
        if fp8 and int8:
            phases.append(("observe-after-int8", fp8))
        previous = self.mode
        try:
            for mode, group in phases:
                for q in group:
                    q.stats.reset()
                self.set_mode(mode)
                for batch in batches:
                    call(self.model, batch)
                for q in group:
                    q.stats.finalize()
                    q.scale.assign(_deployed_scale(q))
        finally:
            self.set_mode(previous)
        return len(static)

    def describe(self) -> dict[str, str]:
        out = {}
        for ql in self.layers:
            c = ql.choice
            tag = c.format.value
            if c.format is Format.INT8:
                tag += f" {c.int8_activations}"
            if c.format is Format.INT4:
                tag += f" block {c.int4_block_size}"
            out[ql.name] = f"{tag} on ONNX {ql.onnx_op} weight {list(ql.onnx_shape)}"
        return out

    def __enter__(self) -> "KerasQAT":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def _deployed_scale(q: _ActQ) -> float:
    """The scale the quantizer stores for this activation.

    int8: ORT's ``compute_scale_zp``: ``2*absmax/254`` computed in float64 from the
    calibrated range, rounded to float32 once. fp8: ``amax/448`` of the MinMax range
    (``numerics.fp8_activation_scale``, computed by the shared ActivationFakeQuant).
    """
    if q.kind != "int8_static":
        return float(q.stats.scale)
    rmin, rmax = q.stats.range
    absmax = max(abs(min(float(rmin), 0.0)), abs(max(float(rmax), 0.0)))
    s = np.float32((2.0 * np.float64(absmax)) / np.float64(2 * numerics.INT8_WEIGHT_QMAX))
    return float(s) if s >= np.finfo(np.float32).tiny else 1.0


def _is_int8_static(choice: LayerChoice) -> bool:
    return choice.format is Format.INT8 and choice.int8_activations is Int8Activations.STATIC


def _preferred_perm(family: str, ndim: int) -> tuple[int, ...] | None:
    """How tf2onnx usually lays out a kernel: Dense as is; Conv (..., I, O) -> (O, I, ...)."""
    if family == "conv":
        return (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
    return tuple(range(ndim))


def _all_layers(model):
    from pipeline.models.keras_adapter import _walk

    return list(_walk(model, set()))
