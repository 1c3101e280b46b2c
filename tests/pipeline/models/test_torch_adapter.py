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
    from pipeline.evaluation import Evaluator

    full = Evaluator(make_config("digits_mlp.yaml"))
    few = Evaluator(make_config("digits_mlp.yaml", **{"data.eval.limit": 7}))
    assert full.reference.onnx_path == few.reference.onnx_path  # same cached export
    assert len(few.eval_set) == 7
    # 7 rows cannot give the 360-row accuracy except by coincidence of k/7 == full
    values = {full.reference_accuracy, few.reference_accuracy}
    assert few.reference_accuracy * 7 == round(few.reference_accuracy * 7)
    assert len(values) == 2 or full.reference_accuracy * 7 == round(full.reference_accuracy * 7)


def test_modules_left_in_fp32_are_listed_with_their_parameters():
    """A GRU and a LayerNorm hold weights no plan can change: the table says so, with counts,
    instead of a parameter total that silently leaves them out."""
    from pipeline.models.torch_adapter import enumerate_unquantized
    from tests.pipeline.models.recurrent_example import SeriesNet

    m = SeriesNet()
    got = {u.name: u for u in enumerate_unquantized(m)}
    assert set(got) == {"gru", "norm"}
    assert got["gru"].params == sum(p.numel() for p in m.gru.parameters())
    assert got["norm"].params == 80 and "normalisation" in got["norm"].reason
    assert got["gru"].module_type == "GRU" and "recurrent" in got["gru"].reason
    covered = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("gru.", "norm.")))
    assert sum(p.numel() for p in m.parameters()) == covered + sum(u.params for u in got.values())


def test_a_new_users_model_through_the_cli(tmp_path, capsys):
    """Two inputs, a GRU, a custom metric, written as a config file and run as a user would:
    `layers --json` lists what stays fp32; `evaluate` measures a mixed plan on the artifact."""
    import json

    import yaml

    from pipeline.cli import main

    cfg = {
        "name": "series-net", "workdir": str(tmp_path / "work"),
        "model": {"framework": "torch", "factory": "tests.pipeline.models.recurrent_example:build"},
        "data": {"calibration": {"source": "tests.pipeline.models.recurrent_example:calibration"},
                 "eval": {"source": "tests.pipeline.models.recurrent_example:evaluation"}},
        "metric": {"name": "tests.pipeline.models.recurrent_example:r2", "higher_is_better": True},
        "measure": {"backend": "ort-cpu", "runs": 3, "warmup": 1, "batch_size": 32,
                    "energy": {"min_seconds": 0.05, "repeats": 1}},
    }
    path = tmp_path / "series.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["layers", "--config", str(path), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert sorted(l["name"] for l in table["layers"]) == ["cat", "conv", "head", "mix"]
    assert {u["name"] for u in table["unquantized"]} == {"gru", "norm"}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"layers": {"mix": "int4", "conv": "int8", "cat": "int8", "*": "fp32"}},
                                   sort_keys=False))  # first match wins: "*" last
    assert main(["evaluate", "--config", str(path), "--plan", str(plan), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    m = result["measurement"]
    assert m["metric"] == "tests.pipeline.models.recurrent_example:r2"
    assert m["reference_accuracy"] > 0.5  # the seeded model learned the target; R^2 of the FP32 artifact
    assert abs(m["accuracy"] - m["reference_accuracy"]) < 0.1
    assert {l["name"]: l["format"] for l in result["layers"]} == {"cat": "int8", "conv": "int8", "mix": "int4",
                                                                 "head": "fp32"}
