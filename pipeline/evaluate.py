"""Moved to :mod:`pipeline.evaluation.evaluator`; this path stays for ``from pipeline.evaluate import Evaluator``."""

from pipeline.evaluation.evaluator import Evaluator  # noqa: F401

__all__ = ["Evaluator"]
