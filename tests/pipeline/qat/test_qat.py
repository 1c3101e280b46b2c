"""QAT end to end: recovery on the ONNX artifact, the outcome contract, attach/detach, training knobs."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.data import Dataset
from pipeline.formats import Calibration, Format
from pipeline.models import get_adapter
from pipeline.plan import LayerChoice, QATSettings, QuantPlan

logging.getLogger("onnx_ir").setLevel(logging.WARNING)
logging.getLogger("onnxscript").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- recovery
def test_qat_recovers_at_least_half_of_what_ptq_lost(make_config, tmp_path):
    """Every layer int4 (block 32) on the 16-wide digits MLP: PTQ loses ~5 points on the
    artifact; QAT at the same plan must win back at least half (measured: ~117% with 300
    steps at lr 1e-3; the example model's training is seeded, so this is the same model on
    every machine)."""
    from pipeline.evaluation import Evaluator

    cfg = make_config("digits_mlp.yaml", **{"model.kwargs": {"hidden": 16}})
    ev = Evaluator(cfg)
    fp32 = ev.reference_accuracy
    ptq = ev.evaluate(QuantPlan(layers={"*": "int4"}), tmp_path / "ptq", energy=False)
    lost = fp32 - ptq.measurement.accuracy
    assert lost >= 0.01, f"int4 PTQ lost only {lost:.4f}: this model no longer shows anything to recover"

    plan = QuantPlan(method="qat", layers={"*": "int4"}, qat=QATSettings(steps=300, learning_rate=1e-3, seed=0))
    qat = ev.evaluate(plan, tmp_path / "qat", energy=False, progress=False)
    recovered = qat.measurement.accuracy - ptq.measurement.accuracy
    assert recovered >= 0.5 * lost, (fp32, ptq.measurement.accuracy, qat.measurement.accuracy)

    # what the trial reports: method, the curve per step, the budget, the same quantizer's layers
    assert qat.method == "qat"
    assert len(qat.qat_curve) == 300 and all(math.isfinite(v) for v in qat.qat_curve)
    assert qat.extra["qat_steps"] == 300 and qat.extra["qat_seconds"] > 0
    assert [(l.name, l.format) for l in qat.layers] == [(l.name, l.format) for l in ptq.layers]
    assert {l.detail for l in qat.layers} == {l.detail for l in ptq.layers}
    assert qat.artifact_path != ptq.artifact_path


# ----------------------------------------------------------------------------- calibration data
def test_qat_calibrates_on_exactly_the_quantizers_feeds(mlp_config, tmp_path):
    """QAT trains against the deployed activation scales, so it must calibrate on the rows the
    quantizer calibrates on. The digits calibration set has 359 rows = 11 batches of 32 + 7;
    the Evaluator drops the short batch (ORT's histogram calibrators stack equal batches)."""
    from exporters.onnx_quant import quantize_model
    from pipeline.evaluation import Evaluator
    from pipeline.qat import _calibration_batches
    from pipeline.qat.train import call_model
    from pipeline.qat.wrap import QATModel
    from tests.pipeline.qat.deployed import input_scale

    ev = Evaluator(mlp_config)
    feeds = ev.calibration_feeds()
    assert len(ev.calibration) % 32 != 0, "the set must have a short last batch for this test to see it"
    batches = _calibration_batches(mlp_config, ev.reference.input_names)
    assert len(batches) == len(feeds)
    for got, want in zip(batches, feeds):
        assert list(got) == list(want)
        for k in want:
            np.testing.assert_array_equal(got[k].numpy(), want[k])

    # and so the deployed scale: an fp8 (std) scale moves with every row
    table = ev.reference.layer_table
    choices = {n: LayerChoice(format=Format.FP8 if n == "fc1" else Format.FP32) for n in table.names}
    built = quantize_model(ev.reference.onnx_path, table, choices, feeds, Calibration.MINMAX, tmp_path / "c.onnx")
    with QATModel(ev.adapter.load_model(), choices, onnx_ops={l.name: l.onnx_op for l in table}) as qm:
        qm.calibrate(batches, call_model)
        assert np.float32(qm.calls()[0].input_q.scale) == input_scale(built.path, table["fc1"].onnx_node)


def test_calibration_batches_are_equal_sized_and_capped():
    from pipeline.data import MAX_CALIBRATION_ROWS, calibration_batches

    def ds(n):
        return Dataset({"input": np.arange(n * 2, dtype=np.float32).reshape(n, 2),
                        "extra": np.zeros((n, 1), np.float32)}, None)

    assert [len(b["input"]) for b in calibration_batches(ds(100), ["input"])] == [32, 32, 32]
    assert [len(b["input"]) for b in calibration_batches(ds(20), ["input"])] == [20]  # smaller than a batch
    capped = calibration_batches(ds(MAX_CALIBRATION_ROWS + 50), ["input"])
    assert sum(len(b["input"]) for b in capped) == MAX_CALIBRATION_ROWS
    assert all(list(b) == ["input"] for b in capped)  # only the model's inputs
    np.testing.assert_array_equal(capped[1]["input"], ds(64).inputs["input"][32:64])
    with pytest.raises(ConfigError, match="data.calibration"):
        calibration_batches(ds(0), ["input"])


# ----------------------------------------------------------------------------- outcome
def test_run_qat_outcome_trains_and_exports_a_plain_fp32_model(mlp_config, tmp_path):
    import onnx

    from pipeline.qat import run_qat

    adapter = get_adapter(mlp_config)
    ref = adapter.export_reference(mlp_config.work_path)
    settings = QATSettings(steps=30, learning_rate=1e-3, batch_size=32, seed=3)
    plan = QuantPlan(method="qat", layers={"fc1": "int8", "fc2": "fp8", "fc3": "bf16", "*": "int4"}, qat=settings)
    calls = []
    out = run_qat(mlp_config, adapter, plan, ref, tmp_path, progress=lambda s, n, l: calls.append((s, n, l)))

    assert out.steps == 30 and len(out.loss_curve) == 30 and out.seconds > 0
    assert [c[0] for c in calls] == list(range(1, 31)) and {c[1] for c in calls} == {30}
    assert out.budget == settings.model_dump()
    assert out.loss == "cross_entropy"
    assert out.recalibrations >= 1  # fc1 int8-static and fc2 fp8 ranges observed before training
    assert out.layers == {"fc1": "int8 static", "fc2": "fp8", "fc3": "bf16", "fc4": "int4 block 32"}
    assert out.reference.layer_table.names == ref.layer_table.names
    # the export is plain FP32 (the quantizer does the rest) with trained weights
    graph = onnx.load(out.reference.onnx_path).graph
    assert not {n.op_type for n in graph.node} & {"QuantizeLinear", "DequantizeLinear", "Cast"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    ref_inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(ref.onnx_path).graph.initializer}
    for new, old in zip(out.reference.layer_table, ref.layer_table):
        w, w0 = inits[new.weight], ref_inits[old.weight]
        assert w.shape == w0.shape and not np.array_equal(w, w0), f"{new.name} was not trained"
        assert np.abs(w - w0).max() < 0.1 * np.abs(w0).max()  # fine-tuned, not re-learned


def test_same_seed_same_curve_other_seed_other_curve(mlp_config):
    """Seeded sampling and initial state: the same plan and seed give the same loss curve."""
    from pipeline.data import load_dataset
    from pipeline.qat.train import call_model, resolve_loss, to_tensors, train
    from pipeline.qat.wrap import QATModel

    adapter = get_adapter(mlp_config)
    ds = load_dataset(mlp_config.data.train, mlp_config, "data.train")
    calib = [to_tensors({"input": ds.inputs["input"][:64]})]

    def curve(seed):
        model = adapter.load_model()
        qm = QATModel(model, {n: LayerChoice(format=Format.INT8) for n in ("fc1", "fc2", "fc3", "fc4")})
        qm.calibrate(calib, call_model)
        qm.set_mode("qat")
        report = train(model, ds, ["input"], resolve_loss(mlp_config, ["output"], ds.targets), steps=12,
                       learning_rate=1e-3, batch_size=32, seed=seed, threads=1, progress=False)
        qm.detach()
        return report.loss_curve

    a, b, c = curve(0), curve(0), curve(1)
    assert a == b
    assert a != c


# ----------------------------------------------------------------------------- attach / detach
def test_attach_detach_leaves_the_users_model(encoder_config):
    from pipeline.qat.train import call_model, to_tensors
    from pipeline.qat.wrap import QATModel

    adapter = get_adapter(encoder_config)
    ref = adapter.export_reference(encoder_config.work_path)
    model = adapter.load_model()
    before_types = {n: type(m) for n, m in model.named_modules()}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    fmts = [Format.INT8, Format.FP8, Format.BF16, Format.INT4]
    choices = {n: LayerChoice(format=fmts[i % 4]) for i, n in enumerate(ref.layer_table.names)}
    linear, fastpath = F.linear, torch.backends.mha.get_fastpath_enabled()

    qm = QATModel(model, choices, Calibration.MINMAX, {l.name: l.onnx_op for l in ref.layer_table})
    ds = adapter.sample_inputs()
    qm.calibrate([to_tensors(ds)], call_model)
    qm.set_mode("qat")
    out_q = call_model(model, to_tensors(ds))
    qm.set_mode("fp32")
    with torch.no_grad():
        out_f = call_model(model, to_tensors(ds))
    qm.detach()

    assert not torch.allclose(out_q, out_f), "fake quantization changed nothing"
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    after = model.state_dict()
    assert list(after) == list(before_state) or sorted(after) == sorted(before_state)
    assert all(torch.equal(after[k], v) for k, v in before_state.items())
    assert F.linear is linear and torch.backends.mha.get_fastpath_enabled() == fastpath
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():  # the plain model again
        np.testing.assert_allclose(call_model(model, to_tensors(ds)).numpy(),
                                   adapter.load_model()(**to_tensors(ds)).numpy(), rtol=1e-5, atol=1e-6)


def test_encoder_qat_end_to_end(encoder_config, tmp_path):
    """Embedding + MultiheadAttention (in_proj via the F.linear route) + Linear, trained and
    measured as an artifact; no data.train in this config: the calibration set is used."""
    from pipeline.evaluation import Evaluator

    ev = Evaluator(encoder_config)
    plan = QuantPlan(method="qat", layers={"head": "fp32", "*": "int8"}, qat=QATSettings(steps=10, batch_size=16))
    result = ev.evaluate(plan, tmp_path, energy=False, progress=False)
    assert len(result.qat_curve) == 10 and all(math.isfinite(v) for v in result.qat_curve)
    assert math.isfinite(result.measurement.accuracy)
    assert {l.name for l in result.layers if l.format is Format.INT8} == set(ev.reference.layer_table.names) - {"head"}


# ----------------------------------------------------------------------------- training knobs
def _tiny_data(targets):
    rng = np.random.default_rng(0)
    return Dataset({"input": rng.standard_normal((40, 6)).astype(np.float32)}, targets)


def test_loss_resolution(mlp_config):
    from pipeline.qat.train import resolve_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    name, fn = resolve_loss(mlp_config, ["output"], np.array([0, 1]))
    assert name == "cross_entropy" and float(fn(logits, y)) == pytest.approx(float(F.cross_entropy(logits, y)))
    cfg = mlp_config.model_copy(update={"loss": None})
    assert resolve_loss(cfg, ["output"], np.array([0.5, 1.0], np.float32))[0] == "mse"
    assert resolve_loss(cfg, ["output"], np.array([0, 1]))[0] == "cross_entropy"
    name, fn = resolve_loss(mlp_config.model_copy(update={"loss": "torch.nn:SmoothL1Loss"}), ["output"], None)
    assert float(fn(torch.ones(3), torch.zeros(3))) == pytest.approx(0.5)
    name, fn = resolve_loss(mlp_config.model_copy(update={"loss": "torch.nn.functional:l1_loss"}), ["output"], None)
    assert float(fn(torch.ones(3), torch.zeros(3))) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="loss"):
        resolve_loss(mlp_config.model_copy(update={"loss": "hinge"}), ["output"], None)
    with pytest.raises(ConfigError, match="loss"):
        resolve_loss(mlp_config.model_copy(update={"loss": "no_such_module_xyz:fn"}), ["output"], None)


def test_training_without_targets_distills_from_the_fp32_teacher(mlp_config):
    from pipeline.qat.train import resolve_loss, train

    torch.manual_seed(0)
    student = torch.nn.Linear(6, 3)
    teacher = torch.nn.Linear(6, 3)
    ds = _tiny_data(None)
    loss = resolve_loss(mlp_config.model_copy(update={"loss": None}), ["output"], None)
    assert loss[0] == "mse"
    report = train(student, ds, ["input"], loss, steps=150, learning_rate=0.05, batch_size=16, seed=0,
                   teacher=teacher, progress=False)
    assert report.loss_curve[-1] < 0.05 * report.loss_curve[0]
    with pytest.raises(ValueError, match="no targets"):
        train(student, ds, ["input"], loss, steps=1, learning_rate=0.1, batch_size=8, seed=0, progress=False)


def test_bf16_autocast_trains_and_is_chosen_by_size(monkeypatch, mlp_config):
    from pipeline.qat import train as T

    monkeypatch.setenv(T.AUTOCAST_ENV, "off")
    assert T.choose_autocast(10**9) is None
    monkeypatch.setenv(T.AUTOCAST_ENV, "bf16")
    assert T.choose_autocast(10) == "bf16"
    monkeypatch.setenv(T.AUTOCAST_ENV, "auto")
    assert T.choose_autocast(10) is None  # small models stay fp32 on CPU
    monkeypatch.setenv(T.AUTOCAST_ENV, "sometimes")
    with pytest.raises(ConfigError, match=T.AUTOCAST_ENV):
        T.choose_autocast(10)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ds = _tiny_data(np.random.default_rng(1).integers(0, 3, 40))
    report = T.train(model, ds, ["input"], T.resolve_loss(mlp_config, ["output"], ds.targets), steps=60,
                     learning_rate=0.01, batch_size=16, seed=0, autocast="bf16", threads=1, progress=False)
    assert report.autocast == "bf16"
    assert np.mean(report.loss_curve[-10:]) < np.mean(report.loss_curve[:10])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32 for export


def test_rich_progress_gets_a_task():
    from rich.progress import Progress

    from pipeline.qat.train import _Progress

    with Progress(disable=True) as progress:
        with _Progress(progress, 5, "QAT") as bar:
            assert len(progress.tasks) == 1
            bar.update(5, 0.1)
            assert progress.tasks[0].completed == 5
        assert len(progress.tasks) == 0


def test_own_progress_bar_only_on_a_terminal(monkeypatch):
    """progress=None: a bar on an interactive stderr, nothing in logs (Ray workers, CI)."""
    from pipeline.qat.train import _Progress

    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    with _Progress(None, 3, "QAT") as bar:  # pytest captures stderr: not a terminal
        assert bar._own is None
        bar.update(1, 0.5)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: treat the output as a terminal
    with _Progress(None, 3, "QAT") as bar:
        assert bar._own is not None
        bar.update(3, 0.25)
        assert bar._own.tasks[0].completed == 3
