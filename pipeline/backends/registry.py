"""Name -> backend plugin, and the ``auto`` choice.

Each plugin module lists its classes in ``BACKENDS``; each class declares its ``name``,
``auto_rank`` (its place in ``auto``'s preference, best first; None: never picked by ``auto``),
``needs_gpu`` and ``quant_target``. Everyone who needs a backend name (config validation,
the study's per-trial resources) asks this module, so adding a backend is one plugin module
plus one line in :data:`PLUGIN_MODULES`. Plugin modules import nothing heavy at module level
(runtimes are imported inside their methods), so reading the declarations is cheap and works
on a machine without the runtime: answering ``quant_target_for("tensorrt")`` needs no GPU.
"""

from __future__ import annotations

import importlib
import logging
from functools import lru_cache

from pipeline.backends.base import Backend, BackendUnavailable
from pipeline.formats import QuantTarget

log = logging.getLogger(__name__)

PLUGIN_MODULES: tuple[str, ...] = (
    "pipeline.backends.ort.cpu",
    "pipeline.backends.ort.cuda",
    "pipeline.backends.tensorrt.plugin",
    "pipeline.backends.tflite",
)
"""Where the plugins live; each module's ``BACKENDS`` tuple names its classes."""

AUTO = "auto"


@lru_cache(maxsize=1)
def plugins() -> dict[str, type[Backend]]:
    """Every declared backend class by name, in :data:`PLUGIN_MODULES` order."""
    out: dict[str, type[Backend]] = {}
    for mod in PLUGIN_MODULES:
        for cls in importlib.import_module(mod).BACKENDS:
            if cls.name in out:
                raise RuntimeError(f"backend name {cls.name!r} is declared twice ({out[cls.name].__module__}, {mod})")
            out[cls.name] = cls
    return out


def backend_names() -> tuple[str, ...]:
    """The names ``measure.backend`` accepts besides ``auto``."""
    return tuple(plugins())


def auto_order() -> list[str]:
    """Names ``auto`` tries, best first (from each plugin's ``auto_rank``)."""
    ranked = [(cls.auto_rank, name) for name, cls in plugins().items() if cls.auto_rank is not None]
    return [name for _, name in sorted(ranked)]


def plugin(name: str) -> type[Backend]:
    """The class of backend ``name``, without starting it; raises for an unknown name."""
    cls = plugins().get(name)
    if cls is None:
        raise BackendUnavailable(f"unknown backend {name!r}; known: {sorted(plugins())} or {AUTO!r}")
    return cls


def needs_gpu(name: str) -> bool:
    """Whether backend ``name`` needs a GPU (``auto``: False; the caller decides from the machine)."""
    return name != AUTO and plugin(name).needs_gpu


def get_backend(name: str) -> Backend:
    if name == AUTO:
        return resolve_backend(AUTO)[0]
    backend = plugin(name)()
    backend.require()
    return backend


def resolve_backend(name: str) -> tuple[Backend, str]:
    """The backend to use and a sentence saying why (for logs and reports)."""
    if name != AUTO:
        return get_backend(name), f"backend {name} (as configured)"
    skipped = []
    for candidate in auto_order():
        b = plugins()[candidate]()
        ok, why = b.available()
        if ok:
            note = f"backend auto -> {candidate}"
            if skipped:
                note += " (skipped: " + "; ".join(skipped) + ")"
            return b, note
        skipped.append(f"{candidate}: {why}")
    raise BackendUnavailable("no backend available: " + "; ".join(skipped))


def available_backends() -> dict[str, tuple[bool, str]]:
    return {name: cls().available() for name, cls in plugins().items()}


def quant_target_for(name: str) -> QuantTarget:
    """The graph forms the quantizer writes for backend ``name`` (``auto``: the backend it resolves to here).

    Explicit names need no GPU or package to answer (the class says it), so a driver without a
    GPU can build a TensorRT study's search space; ``auto`` resolves on this machine, which is
    the machine that runs the trials unless a Ray cluster has other hardware.
    """
    if name == AUTO:
        try:
            return resolve_backend(AUTO)[0].quant_target
        except BackendUnavailable:
            return QuantTarget.ORT
    return plugin(name).quant_target
