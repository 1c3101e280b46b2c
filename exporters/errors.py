"""Errors every exporter shares."""

from __future__ import annotations


class UnsupportedPlan(ValueError):
    """The plan asks for a form the exporter's target cannot express (dynamic int8 for TensorRT,
    bf16 for TFLite, ...). A plan error, not a bug: the trial fails with this message, which says
    what to change, and the study goes on."""
