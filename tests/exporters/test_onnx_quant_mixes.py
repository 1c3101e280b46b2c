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
