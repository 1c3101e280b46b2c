"""The format families by name, and the rules everyone asks them: THE calibrated rule, THE native
rule, tags, realisation names and bits.

Adding a format: one family module (see ``int4.py``) listed in :data:`FAMILY_MODULES`, a member
of :class:`~pipeline.formats.spec.Format`, and its graph writers in ``exporters``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from functools import lru_cache
from typing import TYPE_CHECKING

from pipeline.formats.spec import Format, FormatFamily, Realisation

if TYPE_CHECKING:
    from pipeline.plan import LayerChoice

FAMILY_MODULES: tuple[str, ...] = (
    "pipeline.formats.fp32",
    "pipeline.formats.bf16",
    "pipeline.formats.fp8",
    "pipeline.formats.int8",
    "pipeline.formats.int4",
)


@lru_cache(maxsize=1)
def families() -> dict[Format, FormatFamily]:
    out = {}
    for mod in FAMILY_MODULES:
        fam = importlib.import_module(mod).FAMILY
        out[fam.format] = fam
    missing = [f.value for f in Format if f not in out]
    if missing:
        raise RuntimeError(f"format(s) {missing} have no family module in pipeline.formats.registry.FAMILY_MODULES")
    return out


def family(fmt: Format | str) -> FormatFamily:
    return families()[Format(fmt)]


def by_name(name: str) -> Format:
    """A format from its name or an alias (``float32`` -> fp32)."""
    key = name.strip().lower()
    for fmt, fam in families().items():
        if key == fmt.value or key in fam.aliases:
            return fmt
    raise ValueError(f"unknown format {name!r}; known: {', '.join(f.value for f in Format)}")


WEIGHT_ONLY_OPS = frozenset({"Gather"})
"""Ops whose quantized form is weight-only in every family (an embedding table is looked up, not
multiplied with an activation), so they never need calibration."""


def needs_calibration(choice: "LayerChoice", op: str | None = None) -> bool:
    """THE calibrated rule: this layer choice needs activation ranges from calibration data.

    ``op`` (the layer's ONNX op, where known): embedding lookups (:data:`WEIGHT_ONLY_OPS`) never do.
    Without it the answer is the plan-level one (the study's duplicate key, the search space).
    """
    if op in WEIGHT_ONLY_OPS:
        return False
    return family(choice.format).calibrated(choice)


def any_calibrated(choices: Iterable["LayerChoice"]) -> bool:
    """Whether any of ``choices`` is calibrated (then ``QuantPlan.calibration`` matters)."""
    return any(needs_calibration(c) for c in choices)


def tag(choice: "LayerChoice") -> str:
    """Short notation of a layer choice: ``int8``, ``int8(dyn)``, ``int4(b32)``, ``bf16``."""
    return family(choice.format).layer_tag(choice)


def qat_input_kind(choice: "LayerChoice") -> str | None:
    return family(choice.format).qat_input_kind(choice)


def qat_output_kind(choice: "LayerChoice", onnx_op: str) -> str | None:
    return family(choice.format).qat_output_kind(choice, onnx_op)


@lru_cache(maxsize=1)
def qat_calibrated_kinds() -> frozenset[str]:
    """QAT activation quantizer kinds that observe ranges before training (``int8_static``, ``fp8``)."""
    return frozenset().union(*(f.qat_calibrated_kinds for f in families().values()))


def qat_kind_calibrated(kind: str) -> bool:
    return kind in qat_calibrated_kinds()


@lru_cache(maxsize=1)
def realisations() -> dict[str, tuple[Format, Realisation]]:
    """Every realisation name -> (its format, its declaration), in family order."""
    return {r.name: (fam.format, r) for fam in families().values() for r in fam.realisations}


def realisation_format(name: str) -> Format:
    return realisations()[name][0]


def is_native(backend: str, fmt: Format, realisation: str, fp8_capable_gpu: bool = False,
              extra: Iterable[str] = ()) -> bool:
    """THE native rule: ``backend`` computes ``realisation`` in ``fmt`` itself (else it emulates it).

    FP32 is native everywhere; ``extra`` are realisations a backend plugin declares native on top
    of what the families say (``Backend.native_realisations``).
    """
    if fmt is Format.FP32 or realisation in set(extra):
        return True
    decl = realisations().get(realisation)
    if decl is None:
        return False
    r = decl[1]
    return backend in r.native_on or (fp8_capable_gpu and backend in r.native_on_fp8_gpus)


def is_unsupported(backend: str, realisation: str, fp8_capable_gpu: bool = False) -> bool:
    """``backend`` cannot build ``realisation`` at all (the build fails)."""
    r = realisations()[realisation][1]
    return backend in r.unsupported_on or (not fp8_capable_gpu and backend in r.unsupported_without_fp8)
