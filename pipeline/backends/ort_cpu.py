"""Moved to :mod:`pipeline.backends.ort.cpu` and :mod:`pipeline.backends.ort.session` (old path kept for imports)."""

from pipeline.backends.ort.cpu import OrtCpuBackend, cpu_model_name  # noqa: F401
from pipeline.backends.ort.session import WEIGHT_ONLY_ACCURACY_LEVEL, OrtSession, session_options  # noqa: F401
