"""Layer table: every quantizable layer maps to exactly one ONNX node and one weight."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pipeline.data import load_dataset
from pipeline.models import get_adapter
from pipeline.models.torch_adapter import enumerate_layers


def _check_table(ref, model):
    graph = onnx.load(ref.onnx_path).graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    torch_names = [t.name for t in enumerate_layers(model)]
    assert sorted(ref.layer_table.names) == sorted(torch_names), "a layer maps to zero ONNX nodes"
    assert len(set(l.onnx_node for l in ref.layer_table)) == len(ref.layer_table), "two layers share a node"
    consumers = Counter(i for n in graph.node for i in n.input)
    params = dict(model.named_parameters())
    for layer in ref.layer_table:
        node = nodes[layer.onnx_node]
        assert node.op_type == layer.onnx_op and layer.weight in node.input
        assert consumers[layer.weight] == 1, f"{layer.name}: weight feeds {consumers[layer.weight]} nodes"
        w = inits[layer.weight]
        tw = params[layer.name + (".weight" if not layer.name.endswith("in_proj") else "_weight")].detach().numpy()
        assert np.array_equal(w, tw) or np.array_equal(w, tw.T), f"{layer.name}: initializer is not its weight"


@pytest.mark.parametrize("fixture", ["mlp_config", "cnn_config", "encoder_config"])
def test_each_layer_maps_to_exactly_one_node(fixture, request):
    cfg = request.getfixturevalue(fixture)
    adapter = get_adapter(cfg)
    ref = adapter.export_reference(cfg.work_path)
    _check_table(ref, adapter.load_model())


def test_transformer_encoder_layers_inputs_and_outputs(encoder_config):
    adapter = get_adapter(encoder_config)
    ref = adapter.export_reference(encoder_config.work_path)
    kinds = Counter(l.kind for l in ref.layer_table)
    # embedding + per block (in_proj, out_proj, linear1, linear2) x 2 + head
    assert kinds == {"embedding": 1, "matmul": 2, "linear": 7}
    assert ref.input_names == ["input_ids", "attention_mask"]
    embed = ref.layer_table["embed"]
    assert embed.onnx_op == "Gather"
    # The exported model reproduces torch on the integer inputs, at another batch size (dynamic axis).
    ds = load_dataset(encoder_config.data.eval, encoder_config, "data.eval").head(5)
    sess = ort.InferenceSession(ref.onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(None, ds.inputs)[0]
    with torch.no_grad():
        want = adapter.load_model()(**{k: torch.from_numpy(v) for k, v in ds.inputs.items()}).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_reference_is_cached_by_content(mlp_config, tmp_path):
    adapter = get_adapter(mlp_config)
    a = adapter.export_reference(tmp_path)
    b = adapter.export_reference(tmp_path)
    assert a.onnx_path == b.onnx_path and a.content_hash == b.content_hash
    model = adapter.load_model()
    with torch.no_grad():
        model.fc1.weight.mul_(1.01)
    other = adapter.export_model(model, tmp_path / "tuned.onnx")
    assert other.layer_table.names == a.layer_table.names


def test_genuinely_tied_weights_become_two_layers(tmp_path):
    import torch.nn as nn

    from pipeline.models.torch_adapter import build_layer_table

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)
            self.b = nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight  # one Parameter, used twice

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    m = Tied().eval()
    prog = torch.onnx.export(m, (torch.randn(2, 8),), dynamo=True, opset_version=21, optimize=True)
    table = build_layer_table(prog.model_proto, enumerate_layers(m))
    # named_modules lists a then b; the shared Parameter is one weight used by two nodes.
    assert len(table) == 2 and len({l.onnx_node for l in table}) == 2
    assert len({l.weight for l in table}) == 2  # un-tied: each node owns its initializer


def test_layer_whose_weight_is_folded_away_is_skipped_not_silently_lost():
    import torch.nn as nn

    from pipeline.models.torch_adapter import build_layer_table

    class WithPositions(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(16, 8)  # looked up with constant indices: folded by the exporter
            self.unused = nn.Linear(8, 8)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x + self.pos(torch.arange(4)).sum(0))

    m = WithPositions().eval()
    prog = torch.onnx.export(m, (torch.randn(2, 8),), dynamo=True, opset_version=21, optimize=True)
    table = build_layer_table(prog.model_proto, enumerate_layers(m))
    assert table.names == ["fc"]
    assert sorted(table.skipped) == ["pos", "unused"]


def test_module_called_twice_maps_each_call_and_dict_outputs_are_named():
    import torch.nn as nn

    from pipeline.models.torch_adapter import build_layer_table

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(384, 384)  # big enough that the exporter keeps its Transpose

        def forward(self, a, b):
            return {"left": self.enc(a.unsqueeze(1)).squeeze(1), "right": self.enc(b.unsqueeze(1)).squeeze(1)}

    m = Siamese().eval()
    x = (torch.randn(2, 384), torch.randn(2, 384))
    prog = torch.onnx.export(m, x, dynamo=True, opset_version=21, optimize=True)
    table = build_layer_table(prog.model_proto, enumerate_layers(m))
    assert sorted(table.names) == ["enc", "enc#2"]  # the kept weight Transpose is folded, then each call maps
    assert len({l.onnx_node for l in table}) == 2


def test_reference_accuracy_follows_the_eval_rows(make_config):
    from pipeline.evaluate import Evaluator

    full = Evaluator(make_config("digits_mlp.yaml"))
    few = Evaluator(make_config("digits_mlp.yaml", **{"data.eval.limit": 7}))
    assert full.reference.onnx_path == few.reference.onnx_path  # same cached export
    assert len(few.eval_set) == 7
    # 7 rows cannot give the 360-row accuracy except by coincidence of k/7 == full
    values = {full.reference_accuracy, few.reference_accuracy}
    assert few.reference_accuracy * 7 == round(few.reference_accuracy * 7)
    assert len(values) == 2 or full.reference_accuracy * 7 == round(full.reference_accuracy * 7)
