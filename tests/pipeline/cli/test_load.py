"""``precision-search load``'s smoke-test batch (no --config, no --input) on a model with an attention mask."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from pipeline.cli.load import _random_feeds


def _masked_softmax(path) -> ort.InferenceSession:
    """softmax(ids + log(mask)) over positions: an all-zero mask masks every position and gives NaN."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", 4])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", 4])
    out = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Cast", ["input_ids"], ["f_ids"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["f_mask"], to=TensorProto.FLOAT),
             helper.make_node("Log", ["f_mask"], ["bias"]),
             helper.make_node("Add", ["f_ids", "bias"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "masked", [ids, mask], [out]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_smoke_batch_keeps_an_attention_mask_open(tmp_path):
    session = _masked_softmax(tmp_path / "m.onnx")
    feeds = _random_feeds(session)
    assert {k: v.shape for k, v in feeds.items()} == {"input_ids": (1, 4), "attention_mask": (1, 4)}
    (probs,) = session.run(None, feeds)
    assert np.all(np.isfinite(probs))  # a healthy model is reported finite
    (zeros,) = session.run(None, {**feeds, "attention_mask": np.zeros((1, 4), np.int64)})
    assert not np.all(np.isfinite(zeros))  # what the old all-zero batch reported for the same model
