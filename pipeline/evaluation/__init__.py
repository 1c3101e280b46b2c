"""Evaluation of one candidate: the plan resolved once, QAT if asked, the backend's build, the measurement."""

from pipeline.evaluation.evaluator import Evaluator

__all__ = ["Evaluator"]
