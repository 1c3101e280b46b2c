"""End to end: plan -> candidate artifact -> measured through ONNX Runtime (and TFLite)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.evaluation import Evaluator
from pipeline.formats import Format
from pipeline.plan import QuantPlan


@pytest.fixture(scope="module")
def mlp_eval(tmp_path_factory):
    from tests.conftest import _config

    return Evaluator(_config("digits_mlp.yaml", tmp_path_factory.mktemp("ev")))


def test_uniform_int8_keeps_accuracy_and_int4_shrinks_the_file(mlp_eval, tmp_path):
    fp32 = mlp_eval.evaluate(QuantPlan.uniform("fp32"), tmp_path / "fp32")
    int8 = mlp_eval.evaluate(QuantPlan.uniform("int8"), tmp_path / "int8")
    int4 = mlp_eval.evaluate(QuantPlan.uniform("int4"), tmp_path / "int4")
    # accuracy is measured on the artifact, and the FP32 artifact reproduces the reference exactly
    assert fp32.measurement.accuracy == pytest.approx(fp32.measurement.reference_accuracy)
    assert fp32.measurement.accuracy > 0.9
    assert int8.measurement.accuracy >= fp32.measurement.accuracy - 0.02
    assert fp32.measurement.size_bytes >= 5 * int4.measurement.size_bytes
    assert fp32.measurement.effective_bits_per_weight == pytest.approx(32.0, abs=0.01)
    assert 4.0 < int4.measurement.effective_bits_per_weight < 6.0  # 4 bits + one fp32 scale per 32
    for r in (int8, int4):
        assert os.path.getsize(r.artifact_path) == r.measurement.size_bytes
        assert all(l.kernel for l in r.layers)  # ORT CPU: observed from its optimized graph
    assert all(l.execution == "native" and l.kernel == "MatMulNBits" for l in int4.layers)
    # int8 static: native exactly where ORT runs an integer kernel (QGemm); a Gemm it fused with the
    # following Relu into a float FusedGemm is emulated, and says the static table expected native.
    for l in int8.layers:
        assert l.execution == ("native" if l.kernel == "QGemm" else "emulated"), (l.name, l.kernel)
        assert ("static table expected native" in l.detail) == (l.execution == "emulated")
    assert int8.extra["execution_source"] == "observed: ort-cpu optimized graph"


def test_every_number_says_where_it_came_from(mlp_eval, tmp_path):
    plan = QuantPlan(layers={"fc1": "int4", "fc2": "fp8", "fc3": "bf16", "*": "int8"})
    r = mlp_eval.evaluate(plan, tmp_path / "mixed")
    m = r.measurement
    assert m.backend == "ort-cpu" and m.device and m.runtime_version.startswith("onnxruntime")
    assert {l.name: (l.format, l.execution) for l in r.layers} == {
        "fc1": (Format.INT4, "native"), "fc2": (Format.FP8, "emulated"),
        "fc3": (Format.BF16, "emulated"), "fc4": (Format.INT8, "native")}  # fc4: no Relu after it
    assert {l.name: l.kernel.split("(")[0] for l in r.layers} == {
        "fc1": "MatMulNBits", "fc2": "FusedGemm", "fc3": "Gemm", "fc4": "QGemm"}
    assert m.energy is not None and m.energy.source in ("rapl", "estimated") and m.energy.meter
    assert m.energy.joules_per_1k_inferences == pytest.approx(1000 * m.energy.joules_per_inference)
    assert m.latency_ms_p95 >= m.latency_ms_p50 > 0
    assert m.throughput_per_s == pytest.approx(m.batch_size / (m.latency_ms_p50 / 1e3))


def test_plan_naming_a_missing_layer_is_a_user_error(mlp_eval, tmp_path):
    with pytest.raises(ValueError, match="match no quantizable layer"):
        mlp_eval.evaluate(QuantPlan(layers={"fc9": "int8"}), tmp_path / "bad")


def test_cli_evaluate_json(tmp_path, capsys):
    from pipeline.cli import main
    from tests.conftest import ROOT

    cfg = tmp_path / "c.yaml"
    cfg.write_text((ROOT / "search_spaces" / "digits_mlp.yaml").read_text().replace(
        "name: digits-mlp", f"name: digits-mlp\nworkdir: {tmp_path / 'w'}"))
    plan = tmp_path / "plan.yaml"
    plan.write_text("method: ptq\ncalibration: percentile\nlayers: {fc1: int4, fc2: fp8, '*': int8}\n")
    assert main(["evaluate", "--config", str(cfg), "--plan", str(plan), "--json", "--no-energy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan_summary"] == "fc1=int4(b32) fc2=fp8 fc3=int8 fc4=int8"
    assert out["measurement"]["accuracy_drop"] is not None and out["extra"]["calibration_used"]
    assert os.path.exists(out["artifact_path"]) and out["artifact_path"].endswith(".onnx")
    plan.write_text("layers: {fc1: int3}\n")
    assert main(["evaluate", "--config", str(cfg), "--plan", str(plan)]) == 2
    assert "layers.fc1" in capsys.readouterr().err


@pytest.mark.keras
def test_tflite_backend_builds_and_measures_a_tflite_artifact(tmp_path):
    pytest.importorskip("tensorflow", reason="needs the [keras] extra: pip install -e '.[keras]'")
    from tests.conftest import _config

    ev = Evaluator(_config("digits_keras_tflite.yaml", tmp_path / "w"))
    r = ev.evaluate(QuantPlan(layers={"fc1": "fp32", "*": "int8"}), tmp_path / "t", energy=False)
    assert r.artifact_path.endswith(".tflite") and r.measurement.backend == "tflite"
    fmts = {l.name: l.format for l in r.layers}
    assert fmts["fc1"] is Format.FP32 and fmts["conv1"] is Format.INT8
    assert r.measurement.accuracy >= r.measurement.reference_accuracy - 0.05
    from pipeline.measure import TrialFailure

    with pytest.raises(TrialFailure, match="tflite cannot build"):
        ev.evaluate(QuantPlan.uniform("int4"), tmp_path / "int4", energy=False)


def test_the_backends_quantizer_target_reaches_the_artifact(tmp_path):
    """A backend's ``quant_target`` picks the quantizer's graph forms. TensorRT itself needs a GPU;
    here a CPU backend that declares the tensorrt target shows the wiring: the artifact has no
    com.microsoft op, int4 is a blocked DequantizeLinear, and dynamic int8 fails the trial with the fix."""
    import onnx

    from pipeline.backends import native
    from pipeline.backends.ort.cpu import OrtCpuBackend
    from pipeline.formats import QuantTarget
    from pipeline.measure import TrialFailure
    from tests.conftest import _config

    class TensorRTFormsOnCpu(OrtCpuBackend):
        quant_target = QuantTarget.TENSORRT
        uint8_activations = False  # TensorRT takes signed int8 Q/DQ only

    ev = Evaluator(_config("digits_mlp.yaml", tmp_path / "w"))
    ev.backend = TensorRTFormsOnCpu()
    r = ev.evaluate(QuantPlan(layers={"fc1": "int4", "fc2": "int8", "*": "fp32"}), tmp_path / "c", energy=False)
    model = onnx.load(r.artifact_path)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {l.name: l.detail.split(",")[0] for l in r.layers}["fc1"] == "int4 weight-only"
    assert "DequantizeLinear(int4) + MatMul" in {l.name: l.detail for l in r.layers}["fc1"]
    assert r.measurement.accuracy > 0.9  # measured on the artifact, through ORT here
    with pytest.raises(TrialFailure, match="int8_activations: static"):
        ev.evaluate(QuantPlan(layers={"*": "int8"}, int8_activations="dynamic"), tmp_path / "d", energy=False)


def test_every_subcommand_takes_set_overrides(tmp_path, capsys):
    """`--set` works on evaluate as on search: here it selects a backend this machine lacks, and the
    command fails with the install hint instead of measuring on another backend."""
    from pipeline.backends import available_backends
    from pipeline.cli import main
    from tests.conftest import ROOT

    if available_backends().get("tensorrt", (False, ""))[0]:
        pytest.skip("TensorRT is available here")
    rc = main(["evaluate", "--config", str(ROOT / "search_spaces" / "digits_mlp.yaml"), "--plan", "/dev/null",
               "--set", f"workdir={tmp_path}", "--set", "measure.backend=tensorrt",
               "--set", "search.int8_activations=[static]"])  # the preset lists dynamic: refused for tensorrt
    out = capsys.readouterr()
    assert rc != 0 and "tensorrt" in (out.out + out.err) and ".[gpu]" in (out.out + out.err)


def test_ort_cpu_stores_static_int8_activations_as_uint8_with_the_same_values(mlp_eval, tmp_path):
    """The ORT CPU backend asks the quantizer for uint8 zp-128 activations (x86 kernels take uint8);
    weights stay signed int8 and the layers run integer kernels."""
    import onnx
    from onnx import numpy_helper

    r = mlp_eval.evaluate(QuantPlan(layers={"*": "int8"}, int8_activations="static"), tmp_path / "u8", energy=False)
    model = onnx.load(r.artifact_path)
    inits = {t.name: t for t in model.graph.initializer}
    zps = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
           if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zps and all(z.dtype == np.uint8 and np.all(z == 128) for z in zps)
    assert all(l.execution == "native" and "uint8" in l.detail for l in r.layers)
