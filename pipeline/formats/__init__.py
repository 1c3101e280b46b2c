"""Numeric formats a layer can be given: one module per family, one registry that answers for them.

``from pipeline.formats import Format, Int8Activations, Calibration, QuantTarget`` is the
vocabulary the whole code shares, so that "int4" means exactly one thing everywhere; what each
format *is* (bits, knobs, calibration, ONNX realisations, native backends, QAT kinds, tags)
lives in its family module (``fp32.py`` ... ``int4.py``), read through :mod:`.registry`.
"""

from __future__ import annotations

from pipeline.formats.int4 import BLOCK_SIZES as INT4_BLOCK_SIZES
from pipeline.formats.registry import (
    any_calibrated,
    by_name,
    families,
    family,
    is_native,
    is_unsupported,
    needs_calibration,
    realisation_format,
    realisations,
    tag,
)
from pipeline.formats.spec import Calibration, Format, FormatFamily, Int8Activations, QuantTarget, Realisation

__all__ = [
    "ALL_FORMATS", "Calibration", "Format", "FormatFamily", "INT4_BLOCK_SIZES", "Int8Activations", "QuantTarget",
    "Realisation", "TARGET_INT8_ACTIVATIONS", "WEIGHT_BITS", "any_calibrated", "by_name", "families", "family",
    "is_native", "is_unsupported", "needs_calibration", "realisation_format", "realisations", "tag",
]

ALL_FORMATS: tuple[Format, ...] = tuple(Format)

WEIGHT_BITS: dict[Format, int] = {f: family(f).weight_bits for f in Format}

TARGET_INT8_ACTIVATIONS: dict[QuantTarget, tuple[Int8Activations, ...]] = {
    QuantTarget.ORT: (Int8Activations.STATIC, Int8Activations.DYNAMIC),
    QuantTarget.TENSORRT: (Int8Activations.STATIC,),
}
"""INT8 activation modes each target can write (TensorRT's parser has no DynamicQuantizeLinear)."""
