"""Any mix per layer must build and run: random plans over every format and knob.

Regression: ORT's quantize_dynamic rewrites every Gemm in the graph (not only the
ones it quantizes) into MatMul + Add under new names, which lost later bf16 layers.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from exporters.onnx_quant import quantize_model
from pipeline.data import load_dataset
from pipeline.formats import Calibration, Format, Int8Activations
from pipeline.models import get_adapter
from pipeline.plan import LayerChoice


def _random_choices(names, rng):
    out = {}
    for n in names:
        out[n] = LayerChoice(
            format=Format(rng.choice([f.value for f in Format])),
            int8_activations=Int8Activations(rng.choice(["static", "dynamic"])),
            int4_block_size=int(rng.choice([32, 64, 128])),
        )
    return out


@pytest.mark.parametrize("fixture", ["mlp_config", "encoder_config"])
def test_random_mixed_plans_build_run_and_report_their_formats(fixture, request, tmp_path):
    cfg = request.getfixturevalue(fixture)
    ref = get_adapter(cfg).export_reference(cfg.work_path)
    cal = load_dataset(cfg.data.calibration, cfg, "data.calibration")
    feeds = list(cal.head(64).batches(16, drop_last=True))
    ev = load_dataset(cfg.data.eval, cfg, "data.eval").head(8).inputs
    rng = np.random.default_rng(7)
    for i in range(6):
        choices = _random_choices(ref.layer_table.names, rng)
        q = quantize_model(ref.onnx_path, ref.layer_table, choices, feeds, Calibration.MINMAX, tmp_path / f"c{i}.onnx")
        assert {l.name: l.format for l in q.layers} == {n: c.format for n, c in choices.items()}
        out = ort.InferenceSession(q.path, providers=["CPUExecutionProvider"]).run(None, ev)[0]
        assert np.all(np.isfinite(out)), f"plan {i}: non-finite output"


def test_a_layer_called_twice_gets_a_private_bias_per_call(tmp_path):
    """Regression: the shared bias of a module called twice crashed int8-static + bf16 calls."""
    import torch
    import torch.nn as nn

    from pipeline.models.torch_adapter import build_layer_table, enumerate_layers

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    m = Twice().eval()
    prog = torch.onnx.export(m, (torch.randn(4, 16),), dynamo=True, opset_version=21, optimize=True)
    model = prog.model_proto
    table = build_layer_table(model, enumerate_layers(m))
    assert sorted(table.names) == ["fc", "fc#2"]
    import onnx

    src = tmp_path / "ref.onnx"
    onnx.save(model, str(src))
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)  # the export has a static batch of 4
    feeds = [{model.graph.input[0].name: x}]
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    for first, second in [("int8", "bf16"), ("bf16", "int8"), ("fp8", "int8"), ("int4", "fp32")]:
        choices = {"fc": LayerChoice(format=first), "fc#2": LayerChoice(format=second)}
        q = quantize_model(src, table, choices, feeds, Calibration.MINMAX, tmp_path / f"{first}-{second}.onnx")
        got = ort.InferenceSession(q.path, providers=["CPUExecutionProvider"]).run(None, {model.graph.input[0].name: x})[0]
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < 0.15, f"{first}/{second}: relative error {rel:.3f}"
