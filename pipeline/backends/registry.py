"""Name -> backend, and the ``auto`` choice."""

from __future__ import annotations

import logging

from pipeline.backends.base import Backend, BackendUnavailable
from pipeline.backends.ort_cpu import OrtCpuBackend
from pipeline.formats import QuantTarget

log = logging.getLogger(__name__)

# Preference order for ``auto``: best first. GPU backends are registered by
# their modules (pipeline.backends.gpu) when importable.
_FACTORIES: dict[str, type[Backend]] = {"ort-cpu": OrtCpuBackend}
AUTO_ORDER = ["tensorrt", "ort-trt", "ort-cuda", "ort-cpu"]


def register(cls: type[Backend]) -> type[Backend]:
    _FACTORIES[cls.name] = cls
    return cls


def _load_optional() -> None:
    # Import for their register() side effect; they import nothing heavy at module level.
    for mod in ("pipeline.backends.gpu", "pipeline.backends.tflite"):
        try:
            __import__(mod)
        except ImportError:
            pass


def get_backend(name: str) -> Backend:
    _load_optional()
    if name == "auto":
        return resolve_backend("auto")[0]
    if name not in _FACTORIES:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {sorted(_FACTORIES)} or 'auto'")
    backend = _FACTORIES[name]()
    backend.require()
    return backend


def resolve_backend(name: str) -> tuple[Backend, str]:
    """The backend to use and a sentence saying why (for logs and reports)."""
    _load_optional()
    if name != "auto":
        return get_backend(name), f"backend {name} (as configured)"
    skipped = []
    for candidate in AUTO_ORDER:
        cls = _FACTORIES.get(candidate)
        if cls is None:
            continue
        b = cls()
        ok, why = b.available()
        if ok:
            note = f"backend auto -> {candidate}"
            if skipped:
                note += " (skipped: " + "; ".join(skipped) + ")"
            return b, note
        skipped.append(f"{candidate}: {why}")
    raise BackendUnavailable("no backend available: " + "; ".join(skipped))


def available_backends() -> dict[str, tuple[bool, str]]:
    _load_optional()
    return {name: cls().available() for name, cls in _FACTORIES.items()}


def quant_target_for(name: str) -> QuantTarget:
    """The graph forms the quantizer writes for backend ``name`` (``auto``: the backend it resolves to here).

    Explicit names need no GPU or package to answer (the class says it), so a driver without a
    GPU can build a TensorRT study's search space; ``auto`` resolves on this machine, which is
    the machine that runs the trials unless a Ray cluster has other hardware.
    """
    _load_optional()
    if name == "auto":
        try:
            return resolve_backend("auto")[0].quant_target
        except BackendUnavailable:
            return QuantTarget.ORT
    cls = _FACTORIES.get(name)
    if cls is None:
        # GPU backends register from pipeline.backends.gpu, which imports nothing GPU-only.
        return QuantTarget.TENSORRT if name == "tensorrt" else QuantTarget.ORT
    return cls.quant_target
