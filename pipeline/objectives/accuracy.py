"""accuracy: the task metric on the artifact's outputs (direction follows the metric: mse is minimised)."""

from pipeline.objectives.base import Objective, register

ACCURACY = register(Objective(
    name="accuracy", direction="maximize", unit="", label="accuracy", metric="accuracy",
    read=lambda r: r.measurement.accuracy, fmt=".4f",
))
