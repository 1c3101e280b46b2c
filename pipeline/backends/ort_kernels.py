"""Moved to :mod:`pipeline.backends.ort.kernels` (this path stays for old imports)."""

from pipeline.backends.ort.kernels import INTEGER_KERNELS, observe_kernels, optimized_graph  # noqa: F401
