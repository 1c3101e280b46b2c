"""exporters.optimize on real PyTorch exports, checked through ONNX Runtime on the CPU.

The optimized reference must (1) keep every layer of the table on exactly one quantizable node
with its weight, (2) give the export's outputs, (3) be what the quantizer reads, and (4) fall
back to the export - never lose a layer - when an optimization cannot be mapped back.
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
from exporters.optimize import OptimizeMode, optimize_reference, remap_layers, resolve_mode, OptimizationRefused
from pipeline.config import OPTIMIZE_MODES, ConfigError, load_config
from pipeline.formats import Calibration
from pipeline.models.base import ReferenceModel
from pipeline.models.torch_adapter import build_layer_table, enumerate_layers
from pipeline.plan import QuantPlan


class Encoderish(torch.nn.Module):
    """Embedding + position table on a constant range, a residual MLP block, LayerNorm, GELU."""

    def __init__(self):
        super().__init__()
        self.tok = torch.nn.Embedding(40, 32)
        self.pos = torch.nn.Embedding(16, 32)
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 8)
        self.register_buffer("pos_ids", torch.arange(16).unsqueeze(0), persistent=False)  # as BERT does

    def forward(self, ids):
        h = self.tok(ids) + self.pos(self.pos_ids[:, : ids.shape[1]])
        h = self.norm(h + self.fc2(torch.nn.functional.gelu(self.fc1(h))))
        return self.head(h)


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.fc(h.mean(dim=(2, 3)))


def _export(module, feed: dict[str, np.ndarray], path, output="y", dynamic=None) -> ReferenceModel:
    torch.manual_seed(0)
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, tuple(torch.from_numpy(v) for v in feed.values()), dynamo=True,
                                    opset_version=21, input_names=list(feed), output_names=[output],
                                    optimize=True, verbose=False, report=False, dynamic_shapes=dynamic)
    model = program.model_proto
    onnx.save(model, str(path))
    table = build_layer_table(model, enumerate_layers(module))
    return ReferenceModel(onnx_path=str(path), layer_table=table, input_names=list(feed), output_names=[output],
                          content_hash="test", framework="torch")


def _opt(raw: ReferenceModel, mode: str, feeds) -> ReferenceModel:
    path, table = optimize_reference(raw.onnx_path, raw.layer_table, raw.content_hash, mode, "ort-cpu", feeds)
    return raw.model_copy(update={"onnx_path": path, "layer_table": table})


def _run(path, feed):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    enc_feed = {"ids": rng.integers(0, 40, (3, 16)).astype(np.int64)}
    cnn = ConvBN()
    with torch.no_grad():  # a BatchNorm that is not the identity
        cnn.bn1.running_mean.uniform_(-0.5, 0.5)
        cnn.bn1.running_var.uniform_(0.5, 2.0)
        cnn.bn1.weight.uniform_(0.5, 1.5)
    cnn_feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    (d / "enc").mkdir()
    (d / "cnn").mkdir()
    return {
        "enc": (_export(Encoderish(), enc_feed, d / "enc" / "reference.onnx",
                        dynamic=({1: torch.export.Dim("seq", min=2, max=16)},)), enc_feed),
        "cnn": (_export(cnn, cnn_feed, d / "cnn" / "reference.onnx"), cnn_feed),
    }


@pytest.mark.parametrize("name", ["enc", "cnn"])
@pytest.mark.parametrize("mode", ["basic", "transformer"])
def test_optimized_reference_keeps_every_layer_and_the_outputs(refs, name, mode):
    raw, feed = refs[name]
    opt = _opt(raw, mode, [feed])
    assert opt.onnx_path != raw.onnx_path, "the optimization was abandoned"
    assert opt.layer_table.names == raw.layer_table.names  # every layer still addressable
    model = onnx.load(opt.onnx_path)
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name for t in model.graph.initializer}
    for layer in opt.layer_table:
        n = nodes[layer.onnx_node]
        assert n.op_type == layer.onnx_op and layer.weight in n.input and layer.weight in inits
    assert {i.name for i in model.graph.input} == set(raw.input_names)  # no protected weight left as an input
    np.testing.assert_allclose(_run(opt.onnx_path, feed), _run(raw.onnx_path, feed), rtol=1e-4, atol=1e-5)
    # ... and the quantizer reads it: every layer int8 dynamic
    plan = QuantPlan(layers={"*": "int8"}, int8_activations="dynamic")
    q = quantize_model(opt.onnx_path, opt.layer_table, plan.resolve(opt.layer_table.names), [feed],
                       Calibration.MINMAX, raw.onnx_path.replace("reference.onnx", f"q-{mode}.onnx"))
    assert len(q.layers) == len(raw.layer_table)
    # second call: the cached copy
    again = _opt(raw, mode, [feed])
    assert again.onnx_path == opt.onnx_path and again.layer_table == opt.layer_table


def test_constant_position_table_stays_a_layer(refs):
    """Constant folding would fold Gather(pos table, arange) into a constant and lose the layer."""
    raw, feed = refs["enc"]
    assert raw.layer_table["pos"].onnx_op == "Gather"
    opt = _opt(raw, "basic", [feed])
    assert opt.layer_table["pos"].onnx_op == "Gather"


def test_weights_are_kept_out_of_constant_folding(tmp_path):
    """A Gather on constant indices (a position table with static shapes) folds to a constant in
    ORT's optimizer; the layer's weight is protected so its node survives (MiniLM lost its
    position-embedding layer this way)."""
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.layers import Layer, LayerTable

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "pos.weight")
    idx = numpy_helper.from_array(np.arange(4, dtype=np.int64), "pos_ids")
    g = helper.make_graph(
        [helper.make_node("Gather", ["pos.weight", "pos_ids"], ["p"], name="gather_pos"),
         helper.make_node("Add", ["x", "p"], ["y"], name="add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])], [table, idx])
    path = tmp_path / "reference.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    layer = Layer(name="pos", kind="embedding", module_type="Embedding", onnx_node="gather_pos", onnx_op="Gather",
                  weight="pos.weight", weight_shape=(16, 8), params=128)
    raw = ReferenceModel(onnx_path=str(path), layer_table=LayerTable(layers=[layer]), input_names=["x"],
                         output_names=["y"], content_hash="h", framework="torch")
    feed = {"x": rng.standard_normal((2, 4, 8)).astype(np.float32)}
    opt = _opt(raw, "basic", [feed])
    assert opt.onnx_path != raw.onnx_path
    assert opt.layer_table["pos"].onnx_node == "gather_pos"
    assert "gather_pos" in {n.name for n in onnx.load(opt.onnx_path).graph.node}


def test_transformer_mode_fuses_on_a_dynamo_export(refs):
    raw, feed = refs["enc"]
    opt = _opt(raw, "transformer", [feed])
    ops = {n.op_type for n in onnx.load(opt.onnx_path).graph.node}
    assert ops & {"SkipLayerNormalization", "BiasGelu", "Gelu", "LayerNormalization"}


def test_modes_per_backend():
    assert resolve_mode("auto", "ort-cpu") is OptimizeMode.BASIC
    assert resolve_mode("auto", "tensorrt") is OptimizeMode.NONE
    assert resolve_mode("transformer", "tflite") is OptimizeMode.NONE  # TFLite reads no ONNX
    assert resolve_mode("none", "ort-cpu") is OptimizeMode.NONE
    assert set(OPTIMIZE_MODES) == {m.value for m in OptimizeMode}
    with pytest.raises(ValueError):
        resolve_mode("fast", "ort-cpu")


def test_unmappable_layer_abandons_the_optimization(refs, tmp_path, caplog):
    raw, feed = refs["enc"]
    model = onnx.load(raw.onnx_path)
    table = raw.layer_table
    bad = table.model_copy(update={"layers": [table.layers[0].model_copy(update={"onnx_node": "gone",
                                                                                  "weight": "gone"})]})
    with pytest.raises(OptimizationRefused, match="cannot be located"):
        remap_layers(model, model, bad)


def test_none_mode_returns_the_export(refs):
    raw, feed = refs["cnn"]
    assert _opt(raw, "none", [feed]) == raw


def test_bad_config_value_names_the_field(tmp_path):
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "search_spaces" / "digits_mlp.yaml"
    cfg = tmp_path / "c.yaml"
    shutil.copy(src, cfg)
    with pytest.raises(ConfigError, match=r"export\.optimize.*one of \['auto', 'none', 'basic', 'transformer'\]"):
        load_config(cfg, overrides={"export.optimize": "fast"}, check_imports=False)
    assert load_config(cfg, overrides={"export.optimize": "none"}, check_imports=False).export.optimize == "none"
