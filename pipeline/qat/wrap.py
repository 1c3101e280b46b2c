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
or after the bias is added) and static int8 (int32 bias): ``onnx_ops`` from the
layer table says whether a layer became ``Gemm``/``Conv`` (bias inside) or
``MatMul`` (+ a float ``Add``).

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
class WrappedLayer:
    """One planned layer with its quantizers attached."""

    name: str  # layer-table name
    module_path: str
    kind: str  # linear | conv | embedding | matmul
    onnx_op: str  # Gemm | MatMul | Conv | Gather (how the deployed node holds the bias)
    attr: str  # the parametrized attribute: "weight" or "in_proj_weight"
    choice: LayerChoice
    weight_q: Any  # fq.WeightFakeQuant
    input_q: Any | None  # fq.ActivationFakeQuant of the layer input, or None
    output_q: Any | None  # of the layer output, where the deployed graph quantizes it
    bias_q: Any | None = None  # fq.BiasFakeQuant / bf16 parametrization of the bias
    handles: list = field(default_factory=list)
    functional: bool = False  # reached through the MHA F.linear route, not module hooks

    def pre(self, x):
        return self.input_q(x) if self.input_q is not None else x

    def post(self, y, bias=None):
        """The deployed output: quantize/round the node's output; a MatMul node's bias is
        added after it (float ``Add``), a Gemm/Conv bias is inside."""
        if self.output_q is None:
            return y
        if bias is not None and self.onnx_op == "MatMul" and self.output_q.mode == "qat":
            return self.output_q(y - bias) + bias
        return self.output_q(y)


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


class QATModel:
    """The fake-quantization state of one model for one plan."""

    def __init__(self, model, choices: dict[str, LayerChoice], calibration: Calibration = Calibration.MINMAX,
                 onnx_ops: dict[str, str] | None = None):
        import torch.nn as nn
        from torch.nn.utils import parametrize

        from pipeline.models.torch_adapter import enumerate_layers

        import torch

        self.model = model
        self.calibration = Calibration(calibration)
        self.layers: list[WrappedLayer] = []

        self._mode = "fp32"
        self._mha: dict[str, dict] = {}
        onnx_ops = onnx_ops or {}
        torch_layers = {t.name: t for t in enumerate_layers(model)}
        unknown = [n for n in choices if n.split("#")[0] not in torch_layers]
        if unknown:
            raise ValueError(f"QAT: plan layer(s) {unknown} are not layers of this torch model; "
                             f"its layers are {list(torch_layers)[:20]}")
        # A tied weight is one Parameter behind several layer-table rows (name, name#2, ...):
        # it can carry one fake quantizer only; use the first row's choice and say so.
        by_base: dict[str, LayerChoice] = {}
        for name, choice in choices.items():
            base = name.split("#")[0]
            if base in by_base:
                if by_base[base] != choice:
                    log.warning("QAT: %s shares its weight with %s but has another format; "
                                "training with %s's format (%s)", name, base, base, by_base[base].format)
                continue
            by_base[base] = choice

        mha_paths = {p for p, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        for name, choice in by_base.items():
            if choice.format is Format.FP32:
                continue
            tl = torch_layers[name]
            module = model.get_submodule(tl.module_path) if tl.module_path else model
            is_mha = isinstance(module, nn.MultiheadAttention)
            parent = tl.module_path.rpartition(".")[0] if "." in tl.module_path else ""
            via_mha = is_mha or (tl.module_path.endswith("out_proj") and parent in mha_paths)
            attr = "in_proj_weight" if is_mha else "weight"
            op = onnx_ops.get(name) or {"conv": "Conv", "embedding": "Gather", "matmul": "MatMul"}.get(tl.kind, "Gemm")
            weight_q = fq.WeightFakeQuant(choice, tl.kind, name=name)
            parametrize.register_parametrization(module, attr, weight_q)
            input_q = fq.input_quantizer(choice, tl.kind, self.calibration, name=name)
            output_q = fq.output_quantizer(choice, tl.kind, self.calibration, name=name)
            wl = WrappedLayer(name, tl.module_path, tl.kind, op, attr, choice, weight_q, input_q, output_q,
                              functional=via_mha)
            bias_name = "in_proj_bias" if is_mha else "bias"
            bias = getattr(module, bias_name, None)
            if bias is not None and op in ("Gemm", "Conv"):
                if choice.format is Format.BF16:
                    wl.bias_q = _Bf16Param()
                elif choice.format is Format.INT8 and input_q is not None and input_q.kind == "int8_static":
                    wl.bias_q = fq.BiasFakeQuant(weight_q, input_q)
                if wl.bias_q is not None:
                    parametrize.register_parametrization(module, bias_name, wl.bias_q)
            if via_mha:
                mha_path = tl.module_path if is_mha else parent
                entry = self._mha.setdefault(mha_path, {"layers": []})
                entry["layers"].append((wl, _TrackOutput(weight_q)))
            else:
                if input_q is not None:
                    wl.handles.append(module.register_forward_pre_hook(self._pre_hook(wl), with_kwargs=True))
                if output_q is not None:
                    wl.handles.append(module.register_forward_hook(self._post_hook(wl, module)))
            self.layers.append(wl)
        for path, entry in self._mha.items():
            mha = model.get_submodule(path) if path else model
            entry["forward"] = mha.__dict__.get("forward")
            mha.forward = self._mha_forward(mha, entry["layers"])
        # PyTorch's fused attention / encoder-layer fast paths (eval mode, no grad) run whole
        # blocks in one kernel and skip module hooks and F.linear; off while QAT is attached.
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self.set_mode("fp32")

    # -- hooks -------------------------------------------------------------
    @staticmethod
    def _pre_hook(wl: WrappedLayer):
        def hook(module, args, kwargs):
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

    def set_mode(self, mode: str) -> None:
        if mode not in ("fp32", "observe", "qat"):
            raise ValueError(f"mode must be fp32, observe or qat, not {mode!r}")
        self._mode = mode
        for wl in self.layers:
            self._set_layer_mode(wl, mode)

    @staticmethod
    def _set_layer_mode(wl: WrappedLayer, mode: str) -> None:
        wl.weight_q.enabled = mode == "qat"
        if wl.bias_q is not None:
            wl.bias_q.enabled = mode == "qat"
        for q in (wl.input_q, wl.output_q):
            if q is not None:
                q.set_mode(mode)

    def activation_quantizers(self) -> list:
        return [q for wl in self.layers for q in (wl.input_q, wl.output_q) if q is not None]

    def calibrate(self, batches: Iterable[dict[str, Any]], call) -> int:
        """Static activation ranges, observed the way ``exporters.onnx_quant`` calibrates.

        Its int8-static pass calibrates the FP32 graph; its fp8 pass runs next and
        calibrates the graph *with the int8-static layers already quantized*. So: phase 1
        observes int8-static quantizers with every layer in fp32; phase 2 (only when fp8
        layers exist) observes fp8 quantizers with the int8-static layers fake-quantized
        and the rest in fp32. Returns the number of quantizers calibrated.
        """
        import torch

        batches = list(batches)
        int8_layers = [wl for wl in self.layers if any(q is not None and q.kind == "int8_static"
                                                        for q in (wl.input_q, wl.output_q))]
        phases = [("int8_static", set()), ("fp8", {id(wl) for wl in int8_layers})]
        previous, was_training = self._mode, self.model.training
        done = 0
        self.model.eval()
        try:
            for kind, quantized in phases:
                todo = [q for q in self.activation_quantizers() if q.kind == kind]
                if not todo:
                    continue
                for wl in self.layers:
                    self._set_layer_mode(wl, "qat" if id(wl) in quantized else "fp32")
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
        from torch.nn.utils import parametrize

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
        import torch

        torch.backends.mha.set_fastpath_enabled(self._fastpath)

    def __enter__(self) -> "QATModel":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def describe(self) -> dict[str, str]:
        return {wl.name: wl.weight_q.describe() for wl in self.layers}
