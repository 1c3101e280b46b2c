"""What a format family declares: the vocabulary every layer of the code shares.

A *format* (:class:`Format`) is what a user writes per layer; a *family* (:class:`FormatFamily`,
one module per family in this package) says everything else about it once: bits, knobs, whether
it needs calibration, its ONNX *realisations* (the graph forms the quantizer writes, e.g.
``qdq-int8``) and on which backends each runs natively, its QAT quantizer kinds and the short tag
reports use (``int8(dyn)``). The rest of the code asks :mod:`pipeline.formats.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pipeline.plan import LayerChoice


class Format(str, Enum):
    """Per-layer precision. Values are the spellings users write in YAML."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"  # E4M3 (float8e4m3fn), per-tensor scale
    INT8 = "int8"
    INT4 = "int4"

    def __str__(self) -> str:  # so f-strings print "int8", not "Format.INT8"
        return self.value


class Int8Activations(str, Enum):
    """How INT8 activations get their scale.

    static: calibrated once, per tensor, stored in the graph (QDQ).
    dynamic: computed at run time per batch (DynamicQuantizeLinear + MatMulInteger).
    On ORT CPU dynamic is much faster for transformer encoders (see DESIGN facts).
    """

    STATIC = "static"
    DYNAMIC = "dynamic"

    def __str__(self) -> str:
        return self.value


class Calibration(str, Enum):
    """Activation-range calibration for static quantization (ORT calibrators)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"

    def __str__(self) -> str:
        return self.value



class QuantTarget(str, Enum):
    """Which runtime the quantizer writes its graph forms for (``exporters.onnx_quant``).

    The numbers stored per layer are the same for every target (one rule per format in
    :mod:`exporters.numerics`); what differs is the ONNX form that carries them:

    ort: the forms ONNX Runtime runs fastest - INT4 MatMul as com.microsoft MatMulNBits,
        quantized embeddings as GatherBlockQuantized, INT8 with dynamic activations
        (DynamicQuantizeLinear + MatMulInteger). Used by ort-cpu, ort-cuda and ort-trt (whose
        TensorRT EP hands the com.microsoft nodes to the CUDA EP, which has real kernels).
    tensorrt: standard-ONNX QDQ only, signed and symmetric, which TensorRT's ONNX parser builds:
        INT4 MatMul/Gemm as blocked DequantizeLinear(int4) feeding the MatMul (TensorRT's
        weight-only form), quantized embeddings as DequantizeLinear feeding the Gather. INT8
        with dynamic activations has no TensorRT form and is refused.
    """

    ORT = "ort"
    TENSORRT = "tensorrt"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Realisation:
    """One ONNX graph form of a format (what ``exporters.onnx_quant`` records per layer).

    ``native_on``: backends whose runtime computes this form in the format itself; everywhere
    else it is emulated (stored in the format, computed wider). ``unsupported_on``: backends that
    cannot build it at all. ``native_on_fp8_gpus`` / ``unsupported_without_fp8``: the same, only
    on GPUs with FP8 tensor cores (sm >= 8.9).
    """

    name: str
    description: str
    native_on: frozenset[str] = frozenset()
    unsupported_on: frozenset[str] = frozenset()
    native_on_fp8_gpus: frozenset[str] = frozenset()
    unsupported_without_fp8: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FormatFamily:
    """Everything about one format, declared once (see the family modules)."""

    format: Format
    weight_bits: int
    activation_bits: int | None  # None: weight-only (activations stay fp32)
    realisations: tuple[Realisation, ...]
    aliases: tuple[str, ...] = ()
    knobs: tuple[str, ...] = ()  # LayerChoice fields that change this format's artifact
    # THE calibrated rule, per family: does this layer choice need activation ranges observed?
    calibrated: Callable[["LayerChoice"], bool] = field(default=lambda c: False)
    # Short tag for reports and MLflow tags ("int8(dyn)", "int4(b32)").
    tag: Callable[["LayerChoice"], str] | None = None
    # QAT activation quantizer kinds: on a layer's input, and on its output for an op.
    qat_input_kind: Callable[["LayerChoice"], str | None] = field(default=lambda c: None)
    qat_output_kind: Callable[["LayerChoice", str], str | None] = field(default=lambda c, op: None)
    # QAT activation kinds of this family that are calibrated (observe ranges before training).
    qat_calibrated_kinds: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.format.value

    def layer_tag(self, choice: "LayerChoice") -> str:
        return self.tag(choice) if self.tag else self.format.value

    def key_knobs(self, choice: "LayerChoice") -> dict:
        """The knobs of ``choice`` that change this format's artifact (a plan key's entry)."""
        return {k: _plain(getattr(choice, k)) for k in self.knobs}


def _plain(v):
    return v.value if isinstance(v, Enum) else int(v) if isinstance(v, int) else v
