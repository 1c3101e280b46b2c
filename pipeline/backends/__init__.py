"""Runtimes a candidate can be measured on, behind one small interface.

``get_backend(name)`` returns a :class:`Backend`; ``"auto"`` picks the best one
available and says why. Each backend states, per format, whether it runs that
format natively or emulates it (see :mod:`pipeline.backends.native`).
"""

from pipeline.backends.base import Backend, BackendUnavailable, Session
from pipeline.backends.registry import available_backends, get_backend, quant_target_for, resolve_backend

__all__ = ["Backend", "BackendUnavailable", "Session", "available_backends", "get_backend", "quant_target_for", "resolve_backend"]
