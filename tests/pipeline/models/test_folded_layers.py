"""Layer discovery follows the exporter's folding and fusion (issue 14, section 2).

Models with BatchNorm after their convs (and after a Linear), depthwise and grouped convs, residual blocks and a
LayerNorm+GELU MLP (``torch_zoo``): every conv and linear is in the layer table under its module
name, tied to the right ONNX node; the params share counts exactly what is searchable; and each
mapped node really is quantizable: uniform INT8 and INT4 plans go through the quantizer and run in
ONNX Runtime close to the FP32 reference.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from pipeline.config import parse_config
from pipeline.formats import Calibration, Format
from pipeline.layers import scaled_axis
from pipeline.models.torch_adapter import TorchAdapter, build_layer_table, enumerate_layers
from pipeline.plan import LayerChoice
from tests.pipeline.models.torch_zoo import ZOO

QUANT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _config(workdir):
    return parse_config({"name": "zoo", "workdir": str(workdir), "model": {"factory": "unused:factory"},
                         "data": {"calibration": {"source": "unused:data"}, "eval": {"source": "unused:data"}}},
                        check_imports=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, reference), each model exported once from memory with an input spec."""
    work = tmp_path_factory.mktemp("zoo")
    out = {}
    for name, build in ZOO.items():
        model, shape = build()
        adapter = TorchAdapter(_config(work), model=model, sample_inputs=((None, *shape), "float32"))
        out[name] = (model, adapter.export_reference(work), shape)
    return out


def _expected_share(model: nn.Module) -> float:
    """Quantizable weights over all parameters except those layers' biases, counted from torch."""
    quant = [m for m in model.modules() if isinstance(m, QUANT_TYPES)]
    q = sum(m.weight.numel() for m in quant)
    biases = sum(m.bias.numel() for m in quant if m.bias is not None)
    total = sum(p.numel() for p in model.parameters())
    return q / (total - biases)


@pytest.mark.parametrize("name", list(ZOO))
def test_every_conv_and_linear_is_found_under_its_module_name(exported, name):
    model, ref, _ = exported[name]
    table = ref.layer_table
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}
    assert sorted(table.names) == sorted(modules), "a conv/linear is missing from the layer table"
    assert not table.skipped
    graph = onnx.load(ref.onnx_path).graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    norms_after = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    for layer in table:
        module = modules[layer.name]
        node = nodes[layer.onnx_node]
        assert node.op_type == ("Conv" if isinstance(module, nn.Conv2d) else "Gemm") == layer.onnx_op
        assert node.input[1] == layer.weight
        if isinstance(module, nn.Conv2d):
            assert dict((a.name, a.i) for a in node.attribute).get("group", 1) == module.groups
        w = module.weight.detach().numpy()
        # The ONNX weight is the module's, rescaled per output channel where a BatchNorm was folded in.
        assert scaled_axis(inits[layer.weight], w) == 0, f"{layer.name}: ONNX weight is not its module's"
        if layer.folded:
            assert layer.folded in norms_after
            assert not np.allclose(inits[layer.weight], w), "folded, yet the weight is unchanged"
    if name != "ln_gelu_mlp":
        folded = {l.folded for l in table if l.folded}
        assert folded == norms_after, "every BatchNorm here follows a conv and is folded into it"
        reasons = {m.name: m.reason for m in table.unquantized}
        assert all("folded" in reasons[n] for n in norms_after)
    else:
        assert {m.name for m in table.unquantized} == {"ln1", "ln2"}
    assert table.quantizable_share() == pytest.approx(_expected_share(model), abs=1e-9)


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("fmt,tolerance", [(Format.INT8, 0.1), (Format.INT4, 0.5)])
def test_uniform_int8_and_int4_plans_quantize_and_run(exported, name, fmt, tolerance, tmp_path):
    from exporters.onnx_quant import quantize_model

    model, ref, shape = exported[name]
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((16, *shape)).astype(np.float32)} for _ in range(4)]
    x = rng.standard_normal((32, *shape)).astype(np.float32)
    choices = {n: LayerChoice(format=fmt) for n in ref.layer_table.names}
    q = quantize_model(ref.onnx_path, ref.layer_table, choices, calib, Calibration.MINMAX, tmp_path / "q.onnx",
                       workdir=tmp_path)
    assert {l.name: l.format for l in q.layers} == {n: fmt for n in ref.layer_table.names}
    graph = onnx.load(q.path).graph
    assert not any(n.name in {l.onnx_node for l in ref.layer_table} and n.op_type in ("Conv", "Gemm")
                   and n.input[1] in {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
                   for n in graph.node), "a layer still reads an fp32 weight"
    want = ort.InferenceSession(ref.onnx_path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(q.path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(want, model(torch.from_numpy(x)).numpy(), rtol=1e-3, atol=1e-4)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < tolerance, f"{name} {fmt.value}: relative error {rel:.3f}"


def test_folded_weight_is_found_by_structure_alone():
    """No name evidence at all (initializers renamed, scopes stripped): the per-channel rescaling
    still ties each folded conv to its module."""
    model, shape = ZOO["conv_bn_cnn"]()
    x = torch.randn(2, *shape)
    proto = torch.onnx.export(model, (x,), dynamo=True, optimize=True, verbose=False, report=False).model_proto
    graph = proto.graph
    renames = {i.name: f"anon_{k}" for k, i in enumerate(graph.initializer)}
    for i in graph.initializer:
        i.name = renames[i.name]
    for n in graph.node:
        n.input[:] = [renames.get(v, v) for v in n.input]
        del n.metadata_props[:]
    table = build_layer_table(proto, enumerate_layers(model))
    assert table.names == ["conv1", "conv2", "conv3", "fc"]
    for layer, node in zip(table, [n for n in graph.node if n.op_type in ("Conv", "Gemm")]):
        assert layer.onnx_node == node.name


def test_in_memory_model_is_not_changed_by_export(tmp_path):
    model, shape = ZOO["conv_bn_cnn"]()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    TorchAdapter(_config(tmp_path), model=model, sample_inputs=np.zeros((3, *shape), np.float32)) \
        .export_reference(tmp_path)
    assert model.training, "the caller's module was put in eval mode"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_in_memory_adapter_refuses_a_non_module(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="torch.nn.Module"):
        TorchAdapter(_config(tmp_path), model=object())
