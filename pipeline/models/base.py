"""Adapter interface shared by the PyTorch and Keras paths."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.layers import LayerTable


class ReferenceModel(BaseModel):
    """The FP32 ONNX reference of a model, cached by content hash."""

    onnx_path: str
    layer_table: LayerTable
    input_names: list[str]
    output_names: list[str]
    content_hash: str
    framework: str


class ModelAdapter(ABC):
    """Loads a framework model and exports its FP32 reference.

    Subclasses are small: load the model, export it once, and build the layer
    table. Quantization itself never happens here (it is done on ONNX by
    ``exporters.onnx_quant``), except QAT, which needs the framework to train.
    """

    framework: str

    def __init__(self, config: Any):
        self.config = config

    @abstractmethod
    def load_model(self) -> Any:
        """The trained framework model (weights loaded), in eval mode."""

    @abstractmethod
    def export_reference(self, workdir: Path) -> ReferenceModel:
        """Export FP32 ONNX (cached by content hash of weights + config) and its layer table."""

    @abstractmethod
    def export_model(self, model: Any, out_path: Path) -> ReferenceModel:
        """Export a (possibly fine-tuned) framework model the same way as the reference,
        so its layer table maps identically. Used by QAT."""
