"""Framework adapters: turn a user's trained model into the FP32 ONNX reference
plus its layer table. One adapter per framework, picked by ``model.framework``.

:func:`get_adapter` lives here, not in ``base``, so the adapters can import ``base`` without
``base`` importing them back (the adapters are imported lazily: torch or TensorFlow load only
for the framework asked for).
"""

from typing import Any

from pipeline.models.base import ModelAdapter, ReferenceModel

__all__ = ["ModelAdapter", "ReferenceModel", "get_adapter"]

FRAMEWORKS = ("torch", "keras")


def get_adapter(config: Any) -> ModelAdapter:
    fw = config.model.framework
    if fw == "torch":
        from pipeline.models.torch_adapter import TorchAdapter

        return TorchAdapter(config)
    if fw == "keras":
        from pipeline.models.keras_adapter import KerasAdapter

        return KerasAdapter(config)
    raise ValueError(f"unknown framework {fw!r}; known: {', '.join(FRAMEWORKS)}")
