"""Read what the ONNX quantizer deployed: the activation scale in front of a layer's node."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def input_scale(model_path: str, node_name: str, weight: str | None = None) -> np.float32:
    """The scale of the DequantizeLinear feeding ``node_name``'s activation input (input 0, or for
    a MatMul the input that is not the weight's DQ). Fails if that input is not dequantized."""
    model = onnx.load(model_path)
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    node = next((n for n in model.graph.node if n.name == node_name), None)
    assert node is not None, f"node {node_name!r} is not in {model_path}"
    for name in node.input:
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
            continue  # a constant (weight / bias) or not dequantized
        if weight is not None and weight in dq.input[0]:
            continue
        return np.float32(numpy_helper.to_array(inits[dq.input[1]]))
    raise AssertionError(f"{node_name!r}: no dequantized activation input in {model_path}")
