"""The bundled Conv+BatchNorm examples: every conv searchable, the params share right, INT8 holds.

Run as a user would: ``precision-search layers --json`` on the presets, then a uniform INT8 plan
through the Evaluator (the quantized artifact measured in ONNX Runtime).
"""

from __future__ import annotations

import json

import pytest
import torch.nn as nn

from pipeline.cli import main
from pipeline.examples import digits_bn

ROOT_PRESETS = {"digits_bn_cnn.yaml": digits_bn.bn_cnn, "digits_separable_cnn.yaml": digits_bn.separable_cnn}


@pytest.mark.parametrize("preset", list(ROOT_PRESETS))
def test_every_conv_of_the_bundled_bn_examples_is_searchable(preset, make_config, capsys):
    from pipeline.evaluate import Evaluator
    from pipeline.plan import QuantPlan

    cfg = make_config(preset)
    assert main(["layers", "--config", str(cfg.base_dir / preset), "--set", f"workdir={cfg.workdir}", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    model = ROOT_PRESETS[preset]()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert [l["name"] for l in listed["layers"] if l["kind"] == "conv"] == convs
    assert all(l["folded"] for l in listed["layers"] if l["kind"] == "conv"), "each conv has its BatchNorm folded in"
    assert not listed["skipped"]
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert sum(l["params"] for l in listed["layers"]) == weights
    assert sum(u["params"] for u in listed["unquantized"]) == norms
    assert all("folded" in u["reason"] for u in listed["unquantized"])

    ev = Evaluator(cfg)
    assert ev.reference.layer_table.quantizable_share() == pytest.approx(weights / (weights + norms))
    result = ev.evaluate(QuantPlan.uniform("int8"), cfg.work_path / "int8", energy=False)
    m = result.measurement
    assert m.reference_accuracy > 0.9 and m.accuracy_drop < 0.03
    assert {l.name for l in result.layers if l.format.value == "int8"} == {l["name"] for l in listed["layers"]}
