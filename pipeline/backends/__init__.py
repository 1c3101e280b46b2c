"""Runtimes a candidate can be measured on: plugins behind one small interface.

``get_backend(name)`` returns a :class:`Backend`; ``"auto"`` picks the best one available
and says why. Each plugin declares its name, ``auto`` rank, GPU need and graph target, and
owns building its artifact (:meth:`Backend.build`); whether a layer runs natively or is
emulated is the format registry's rule (:func:`pipeline.formats.registry.is_native`).
The plugin list is :data:`pipeline.backends.registry.PLUGIN_MODULES`.
"""

from pipeline.backends.artifact import BuildInputs, BuiltArtifact
from pipeline.backends.base import Backend, BackendUnavailable, Session
from pipeline.backends.registry import (
    available_backends,
    backend_names,
    get_backend,
    needs_gpu,
    quant_target_for,
    resolve_backend,
)

__all__ = ["Backend", "BackendUnavailable", "BuildInputs", "BuiltArtifact", "Session", "available_backends",
           "backend_names", "get_backend", "needs_gpu", "quant_target_for", "resolve_backend"]
