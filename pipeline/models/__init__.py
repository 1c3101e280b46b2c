"""Framework adapters: turn a user's trained model into the FP32 ONNX reference
plus its layer table. One adapter per framework, picked by ``model.framework``."""

from pipeline.models.base import ModelAdapter, ReferenceModel, get_adapter

__all__ = ["ModelAdapter", "ReferenceModel", "get_adapter"]
