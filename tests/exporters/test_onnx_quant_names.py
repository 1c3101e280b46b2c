"""User names never collide with names the quantizer (or the exporter) writes internally.

A config whose output was named ``embedding`` failed every candidate with "Duplicate definition
of name (embedding)": torch's exporter calls the aten.embedding value ``embedding`` too, and ORT's
quantizers derive names by suffixing (``relu_quantized``, ``relu_scale``...). Here graph outputs,
inputs and initializers are named like those internal names, and every format must still build
an artifact that loads in ORT and computes what the FP32 graph computes.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporters.onnx_quant import quantize_model
from exporters.quant.names import private_names, repair_duplicate_definitions, restore_names
from pipeline.formats import Calibration
from pipeline.models.torch_adapter import build_layer_table, enumerate_layers
from pipeline.plan import QuantPlan


class Net(torch.nn.Module):
    """emb -> fc1 -> relu -> (q | k read the same tensor) -> out: Gather, shared input, residual."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 32)
        self.fc1 = torch.nn.Linear(32, 32)
        self.q = torch.nn.Linear(32, 32)
        self.k = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, ids):
        a = torch.relu(self.fc1(self.emb(ids)))
        return self.out(self.q(a) + self.k(a) + a)


PLANS = {
    "int8-static": QuantPlan(layers={"*": "int8"}, int8_activations="static"),
    "int8-dynamic": QuantPlan(layers={"*": "int8"}, int8_activations="dynamic"),
    "int4": QuantPlan(layers={"*": "int4"}),
    "fp8": QuantPlan(layers={"*": "fp8"}),
    "bf16": QuantPlan(layers={"*": "bf16"}),
}


def _export(path, output: str, input_name: str = "ids"):
    torch.manual_seed(0)
    module = Net().eval()
    ids = torch.randint(0, 30, (4, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, (ids,), dynamo=True, opset_version=21, input_names=[input_name],
                                    output_names=[output], optimize=True, verbose=False, report=False)
    model = program.model_proto
    onnx.save(model, str(path))
    return module, model, build_layer_table(model, enumerate_layers(module))


def _run(path, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [o.name for o in s.get_outputs()], s.run(None, feed)[0]


@pytest.mark.parametrize("output, input_name", [
    ("embedding", "ids"),  # torch's own name for the aten.embedding value: the reported failure
    ("relu_scale", "ids"),  # what quantize_dynamic names the shared activation's scale
    ("relu_quantized", "relu_zero_point"),  # ... its quantized tensor, and an input named like its zero point
    ("y", "embedding"),
])
def test_internal_names_never_collide_with_user_names(tmp_path, output, input_name):
    module, model, table = _export(tmp_path / "ref.onnx", output, input_name)
    rng = np.random.default_rng(0)
    feeds = [{input_name: rng.integers(0, 30, (4, 6)).astype(np.int64)} for _ in range(2)]
    with torch.no_grad():
        expected = module(torch.from_numpy(feeds[0][input_name])).numpy()
    for label, plan in PLANS.items():
        q = quantize_model(tmp_path / "ref.onnx", table, plan.resolve(table.names), feeds, Calibration.MINMAX,
                           tmp_path / f"{label}.onnx")
        names, y = _run(q.path, feeds[0])
        assert names == [output], label  # the user's output name, exactly
        scale = float(np.abs(expected).max())
        assert np.abs(y - expected).max() < 0.25 * scale, label  # a working quantized graph, not garbage
        graph = onnx.load(q.path).graph
        defined = [o for n in graph.node for o in n.output] + [t.name for t in graph.initializer] + \
            [i.name for i in graph.input]
        assert len(defined) == len(set(defined)), f"{label}: a name is defined twice"


def test_initializer_named_like_an_internal_name(tmp_path):
    """An initializer (a bias) named like what the quantizer writes for a weight."""
    module, model, table = _export(tmp_path / "ref.onnx", "y")
    fc1 = table["fc1"]
    bias = next(i for n in model.graph.node for i in n.input if i.endswith("fc1.bias"))
    new = f"{fc1.weight}_quantized"
    for t in model.graph.initializer:
        if t.name == bias:
            t.name = new
    for n in model.graph.node:
        for j, i in enumerate(n.input):
            if i == bias:
                n.input[j] = new
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    feeds = [{"ids": np.random.default_rng(1).integers(0, 30, (4, 6)).astype(np.int64)}]
    _, want = _run(tmp_path / "renamed.onnx", feeds[0])
    for label, plan in PLANS.items():
        q = quantize_model(tmp_path / "renamed.onnx", table, plan.resolve(table.names), feeds, Calibration.MINMAX,
                           tmp_path / f"{label}.onnx")
        _, y = _run(q.path, feeds[0])
        assert np.abs(y - want).max() < 0.25 * float(np.abs(want).max()), label


def test_duplicate_definitions_are_repaired_in_order():
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"], name="a"),
         helper.make_node("Neg", ["t"], ["u"], name="b"),
         helper.make_node("Abs", ["u"], ["t"], name="c")],  # redefines t: the graph output
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    fixed = repair_duplicate_definitions(m)
    assert list(fixed) == ["t"]
    a, b, c = m.graph.node
    assert a.output[0] == b.input[0] != "t" and c.output[0] == "t"
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, np.abs(-np.maximum(x, 0)))
    before = m.SerializeToString()
    back = private_names(m)
    assert all(v.name.startswith("precision_search::t") for v in list(m.graph.input) + list(m.graph.output))
    restore_names(m, back)
    assert m.SerializeToString() == before  # a round trip changes nothing
