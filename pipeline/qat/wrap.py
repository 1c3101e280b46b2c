"""Attach fake quantizers to the planned layers of a torch model, and take them off again.

Weights (and, where the deployed node holds it, the bias) get a
``torch.nn.utils.parametrize`` parametrization: the module's ``weight`` /
``in_proj_weight`` becomes ``fake_quant(original)`` and the optimizer trains
``original``. Activations get forward hooks. Nothing replaces a module, so after
:meth:`QATModel.detach` the model is the user's own module tree with trained
weights, the TorchAdapter exports it unchanged, and the layer table of that
export has the same names as the reference's.

Why not swap modules (``torch.ao``/``torchao`` style ``QATLinear``)? A swap
changes module types and paths, and the layer table is keyed by them; hooks and
parametrizations leave both untouched and also reach
``MultiheadAttention.in_proj_weight``, a raw parameter no submodule owns.

``nn.MultiheadAttention`` never calls its ``out_proj`` module (it passes
``out_proj.weight`` to ``F.linear``), and its in-projection is an ``F.linear``
inside ``F.multi_head_attention_forward``; module hooks cannot see either. For
those two layers the MHA's forward runs with ``torch.nn.functional.linear``
temporarily routed through the layers' activation quantizers (matched by the
identity of the weight tensor the parametrization just produced). The route is
installed per call and removed in a ``finally``, and only while QAT is attached.

Where a deployed node includes the bias matters for bf16 (output rounded before
or after the bias is added), static int8 and fp8 (int32 bias): ``onnx_ops`` from the
layer table says whether a layer became ``Gemm``/``Conv`` (bias inside) or
``MatMul`` (+ a float ``Add``).

A module called several times in ``forward()`` (a shared layer) is exported as one ONNX node
per call, named ``name``, ``name#2``, ... in call order by the TorchAdapter, each with its own
copy of the weight, its own format in the plan and its own calibrated activation scale. So
each call gets its own quantizers (:class:`LayerCall`): the one latent weight is fake-quantized
per call with that call's format, and each call's activations are calibrated separately. Calls
are counted per forward pass of the whole model (a pre-hook on the root module resets the count).

Modes (one per model, :meth:`QATModel.set_mode`):
``fp32``     every quantizer is the identity (the model as ORT's calibrator sees it);
``observe``  fp32, and static activation quantizers record calibration statistics;
``qat``      weights and activations are fake-quantized as deployed.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

from pipeline.formats import Calibration, Format
from pipeline.plan import LayerChoice
from pipeline.qat import fake_quant as fq

log = logging.getLogger(__name__)


@dataclass
class LayerCall:
    """One call of a planned module = one ONNX node = one layer-table row (``name``, ``name#2``, ...)."""

    name: str  # layer-table name of this call's node
    choice: LayerChoice
    onnx_op: str  # Gemm | MatMul | Conv | Gather (how the deployed node holds the bias)
    weight_q: Any | None  # fq.WeightFakeQuant, None for an fp32 call
    input_q: Any | None  # fq.ActivationFakeQuant of the layer input, or None
    output_q: Any | None  # of the layer output, where the deployed graph quantizes it
    bias_q: Any | None = None  # fq.BiasFakeQuant / bf16 parametrization of the bias

    def quantizers(self) -> list:
        return [q for q in (self.input_q, self.output_q) if q is not None]

    @property
    def int8_static(self) -> bool:
        return any(q.kind == "int8_static" for q in self.quantizers())


@dataclass
class WrappedLayer:
    """One planned module with its quantizers attached, one :class:`LayerCall` per call."""

    name: str  # layer-table name of the first call (the module's layer name)
    module_path: str
    kind: str  # linear | conv | embedding | matmul
    attr: str  # the parametrized attribute: "weight" or "in_proj_weight"
    calls: list[LayerCall]
    handles: list = field(default_factory=list)
    functional: bool = False  # reached through the MHA F.linear route, not module hooks
    current: LayerCall | None = None  # the call being run
    _next: int = 0  # index of the next call within this forward pass

    # the first call's quantizers (the only ones for a module called once)
    @property
    def choice(self) -> LayerChoice:
        return self.calls[0].choice

    @property
    def input_q(self):
        return self.calls[0].input_q

    @property
    def output_q(self):
        return self.calls[0].output_q

    @property
    def weight_q(self):
        return self.calls[0].weight_q

    def reset(self) -> None:
        self._next, self.current = 0, None

    def begin_call(self) -> LayerCall:
        if self._next >= len(self.calls):
            raise RuntimeError(
                f"QAT: {self.module_path or self.name!r} was called more than {len(self.calls)} time(s) in one "
                f"forward pass, but the layer table has {len(self.calls)} node(s) for it "
                f"({', '.join(c.name for c in self.calls)}): forward() must call it as often as the export did"
            )
        self.current = self.calls[self._next]
        self._next += 1
        return self.current

    def active(self) -> LayerCall:
        """The call in progress (the first when the weight is read outside a forward call)."""
        return self.current if self.current is not None else self.calls[0]

    def pre(self, x):
        q = self.active().input_q
        return q(x) if q is not None else x

    def post(self, y, bias=None):
        """The deployed output: quantize/round the node's output; a MatMul node's bias is
        added after it (float ``Add``), a Gemm/Conv bias is inside."""
        call = self.active()
        if call.output_q is None:
            return y
        if bias is not None and call.onnx_op == "MatMul" and call.output_q.mode == "qat":
            return call.output_q(y - bias) + bias
        return call.output_q(y)


class _PerCall(fq.nn.Module if fq.nn is not None else object):
    """The parametrization of a planned module's weight (or bias): the active call's quantizer,
    identity for a call without one. The quantizers are plain attributes (they are not the
    module's parameters and must not show up in its state dict)."""

    def __init__(self, layer: WrappedLayer, attr: str):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self._attr = attr

    def forward(self, t):
        q = getattr(self._layer.active(), self._attr)
        return q(t) if q is not None else t


class _Bf16Param(fq.nn.Module if fq.nn is not None else object):
    """bf16 bias of a Gemm/Conv (the exporter stores it bf16)."""

    def __init__(self):
        super().__init__()
        self.enabled = True

    def forward(self, b):
        return fq.fake_bf16(b) if self.enabled else b


class _TrackOutput:
    """Remembers (weakly) the last tensor a weight parametrization returned, so a functional
    ``F.linear(x, w, b)`` call can be recognised as this layer by ``w is last``."""

    def __init__(self, weight_q):
        self._ref = None
        weight_q.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        try:
            self._ref = weakref.ref(out)
        except TypeError:  # pragma: no cover
            self._ref = None

    def matches(self, w) -> bool:
        return self._ref is not None and self._ref() is w


def split_call(name: str) -> tuple[str, int]:
    """``"fc#2"`` -> ``("fc", 2)``, ``"fc"`` -> ``("fc", 1)``: the TorchAdapter's names for the
    calls of a shared module (:func:`pipeline.models.torch_adapter.build_layer_table`)."""
    base, sep, n = name.rpartition("#")
    if sep and n.isdigit() and int(n) >= 2:
        return base, int(n)
    return name, 1


def call_name(base: str, index: int) -> str:
    return base if index == 1 else f"{base}#{index}"


class QATModel:
    """The fake-quantization state of one model for one plan.

    ``choices`` maps layer-table names to formats; ``onnx_ops`` (layer-table name -> ONNX op,
    every row of the table) says how each node holds its bias and, through the ``name#k``
    rows, how often each module is called. A call missing from ``choices`` stays fp32.
    """

    def __init__(self, model, choices: dict[str, LayerChoice], calibration: Calibration = Calibration.MINMAX,
                 onnx_ops: dict[str, str] | None = None):
        import torch

        from pipeline.models.torch_adapter import enumerate_layers

        self.model = model
        self.calibration = Calibration(calibration)
        self.layers: list[WrappedLayer] = []

        self._mode = "fp32"
        self._mha: dict[str, dict] = {}
        onnx_ops = onnx_ops or {}
        torch_layers = {t.name: t for t in enumerate_layers(model)}
        unknown = [n for n in choices if split_call(n)[0] not in torch_layers]
        if unknown:
            raise ValueError(f"QAT: plan layer(s) {unknown} are not layers of this torch model; "
                             f"its layers are {list(torch_layers)[:20]}")
        # calls per module: the highest name#k among the layer table's rows and the plan's
        n_calls: dict[str, int] = {}
        for n in list(onnx_ops) + list(choices):
            base, k = split_call(n)
            if base in torch_layers:
                n_calls[base] = max(n_calls.get(base, 1), k)

        # PyTorch's fused attention / encoder-layer fast paths (eval mode, no grad) run whole
        # blocks in one kernel and skip module hooks and F.linear; off while QAT is attached.
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        # Registered first: it runs before any layer's own pre-hook, also when the root is a layer.
        self._reset_handle = model.register_forward_pre_hook(self._reset_calls)
        try:
            self._attach(model, choices, onnx_ops, torch_layers, n_calls)
        except BaseException:
            self.detach()
            raise
        self.set_mode("fp32")

    def _attach(self, model, choices, onnx_ops, torch_layers, n_calls) -> None:
        import torch.nn as nn
        from torch.nn.utils import parametrize

        fp32 = LayerChoice(format=Format.FP32)
        mha_paths = {p for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        for base, count in n_calls.items():
            names = [call_name(base, k) for k in range(1, count + 1)]
            layer_choices = [choices.get(n, fp32) for n in names]
            if all(c.format is Format.FP32 for c in layer_choices):
                continue
            tl = torch_layers[base]
            module = model.get_submodule(tl.module_path) if tl.module_path else model
            is_mha = isinstance(module, nn.MultiheadAttention)
            parent = tl.module_path.rpartition(".")[0] if "." in tl.module_path else ""
            via_mha = is_mha or (tl.module_path.endswith("out_proj") and parent in mha_paths)
            attr = "in_proj_weight" if is_mha else "weight"
            bias_name = "in_proj_bias" if is_mha else "bias"
            has_bias = getattr(module, bias_name, None) is not None
            default_op = {"conv": "Conv", "embedding": "Gather", "matmul": "MatMul"}.get(tl.kind, "Gemm")
            calls = [self._make_call(n, c, tl.kind, onnx_ops.get(n) or default_op, has_bias)
                     for n, c in zip(names, layer_choices)]
            wl = WrappedLayer(base, tl.module_path, tl.kind, attr, calls, functional=via_mha)
            weight_p = _PerCall(wl, "weight_q")
            parametrize.register_parametrization(module, attr, weight_p)
            if any(c.bias_q is not None for c in calls):
                parametrize.register_parametrization(module, bias_name, _PerCall(wl, "bias_q"))
            if via_mha:
                mha_path = tl.module_path if is_mha else parent
                entry = self._mha.setdefault(mha_path, {"layers": []})
                entry["layers"].append((wl, _TrackOutput(weight_p)))
            else:
                # always: the pre-hook also says which call is running (weight format, bias scale)
                wl.handles.append(module.register_forward_pre_hook(self._pre_hook(wl), with_kwargs=True))
                if any(c.output_q is not None for c in calls):
                    wl.handles.append(module.register_forward_hook(self._post_hook(wl, module)))
            self.layers.append(wl)
        for path, entry in self._mha.items():
            mha = model.get_submodule(path) if path else model
            entry["forward"] = mha.__dict__.get("forward")
            mha.forward = self._mha_forward(mha, entry["layers"])

    def _make_call(self, name: str, choice: LayerChoice, kind: str, op: str, has_bias: bool) -> LayerCall:
        if choice.format is Format.FP32:
            return LayerCall(name, choice, op, None, None, None)
        weight_q = fq.WeightFakeQuant(choice, kind, name=name)
        input_q = fq.input_quantizer(choice, kind, self.calibration, name=name)
        output_q = fq.output_quantizer(choice, kind, self.calibration, name=name)
        call = LayerCall(name, choice, op, weight_q, input_q, output_q)
        if has_bias and op in ("Gemm", "Conv"):
            if choice.format is Format.BF16:
                call.bias_q = _Bf16Param()
            elif input_q is not None and (
                (choice.format is Format.INT8 and input_q.kind == "int8_static")
                or (choice.format is Format.FP8 and input_q.kind == "fp8")
            ):  # int32 at s_x * s_w (fp8: exporters.quant.ort_passes.fp8_int32_biases)
                call.bias_q = fq.BiasFakeQuant(weight_q, input_q)
        return call

    # -- hooks -------------------------------------------------------------
    def _reset_calls(self, module, args) -> None:
        for wl in self.layers:
            wl.reset()

    @staticmethod
    def _pre_hook(wl: WrappedLayer):
        def hook(module, args, kwargs):
            if wl.begin_call().input_q is None:
                return None
            if args:
                return (wl.pre(args[0]),) + tuple(args[1:]), kwargs
            key = next(iter(kwargs))
            kwargs[key] = wl.pre(kwargs[key])
            return args, kwargs

        return hook

    @staticmethod
    def _post_hook(wl: WrappedLayer, module):
        def hook(mod, args, output):
            return wl.post(output, getattr(module, "bias", None))

        return hook

    @staticmethod
    def _mha_forward(mha, layers: list):
        """MHA forward with ``F.linear`` routed through its planned layers' quantizers."""
        import torch.nn.functional as F

        cls_forward = type(mha).forward

        def routed_linear(original):
            def linear(x, w, b=None):
                for wl, track in layers:
                    if track.matches(w):
                        return wl.post(original(wl.pre(x), w, b), b)
                return original(x, w, b)

            return linear

        def forward(*args, **kwargs):
            for wl, _ in layers:  # one call of the MHA = one call of each of its projections
                wl.begin_call()
            original = F.linear
            F.linear = routed_linear(original)
            try:
                return cls_forward(mha, *args, **kwargs)
            finally:
                F.linear = original

        return forward

    # -- modes -------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self._mode

    def calls(self) -> list[LayerCall]:
        return [c for wl in self.layers for c in wl.calls]

    def set_mode(self, mode: str) -> None:
        if mode not in ("fp32", "observe", "qat"):
            raise ValueError(f"mode must be fp32, observe or qat, not {mode!r}")
        self._mode = mode
        for call in self.calls():
            self._set_call_mode(call, mode)

    @staticmethod
    def _set_call_mode(call: LayerCall, mode: str) -> None:
        if call.weight_q is not None:
            call.weight_q.enabled = mode == "qat"
        if call.bias_q is not None:
            call.bias_q.enabled = mode == "qat"
        for q in call.quantizers():
            q.set_mode(mode)

    def activation_quantizers(self) -> list:
        return [q for c in self.calls() for q in c.quantizers()]

    def calibrate(self, batches: Iterable[dict[str, Any]], call) -> int:
        """Static activation ranges, observed the way ``exporters.onnx_quant`` calibrates.

        Its int8-static pass calibrates the FP32 graph; its fp8 pass runs next and
        calibrates the graph *with the int8-static layers already quantized*. So: phase 1
        observes int8-static quantizers with every layer in fp32; phase 2 (only when fp8
        layers exist) observes fp8 quantizers with the int8-static layer calls fake-quantized
        and the rest in fp32 - their global min/max, since the quantizer sets every fp8
        activation scale to ``amax/448`` from ORT's MinMax calibrator on that graph.
        Returns the number of quantizers calibrated.
        """
        import torch

        batches = list(batches)
        int8_calls = {id(c) for c in self.calls() if c.int8_static}
        phases = [("int8_static", set()), ("fp8", int8_calls)]
        previous, was_training = self._mode, self.model.training
        done = 0
        self.model.eval()
        try:
            for kind, quantized in phases:
                todo = [q for q in self.activation_quantizers() if q.kind == kind]
                if not todo:
                    continue
                for c in self.calls():
                    self._set_call_mode(c, "qat" if id(c) in quantized else "fp32")
                for q in todo:
                    q.reset()
                    q.set_mode("observe")
                with torch.no_grad():
                    for batch in batches:
                        call(self.model, batch)
                for q in todo:
                    q.finalize()
                done += len(todo)
        finally:
            self.model.train(was_training)
            self.set_mode(previous)
        return done

    def detach(self) -> None:
        """Remove every hook, route and parametrization. The trained latent (unquantized)
        weights stay in the modules: that is what the ONNX quantizer must see, since it
        recomputes the same scales from them and so deploys the grid that was trained."""
        import torch
        from torch.nn.utils import parametrize

        if self._reset_handle is not None:
            self._reset_handle.remove()
            self._reset_handle = None
        for wl in self.layers:
            for h in wl.handles:
                h.remove()
            wl.handles.clear()
            module = self.model.get_submodule(wl.module_path) if wl.module_path else self.model
            for attr in (wl.attr, "in_proj_bias" if wl.attr == "in_proj_weight" else "bias"):
                if parametrize.is_parametrized(module, attr):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for path, entry in self._mha.items():
            mha = self.model.get_submodule(path) if path else self.model
            if entry.get("forward") is None:
                mha.__dict__.pop("forward", None)
            else:
                mha.forward = entry["forward"]
        self._mha = {}
        self.layers = []
        if self._fastpath is not None:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
            self._fastpath = None

    def __enter__(self) -> "QATModel":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def describe(self) -> dict[str, str]:
        """Layer-table name -> its fake quantization, for every planned (non-fp32) call."""
        return {c.name: c.weight_q.describe() for c in self.calls() if c.weight_q is not None}
