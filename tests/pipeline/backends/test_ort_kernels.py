"""Observed kernels on ORT CPU: what ONNX Runtime actually runs per layer, read from its optimized graph.

Real artifacts from the real quantizer, real ORT sessions. Expectations come from the graphs
themselves (which layer is followed by a Relu, which op ORT wrote), not from a stored run.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from pipeline.backends.base import Backend
from pipeline.backends.ort_cpu import INTEGER_KERNELS, OrtCpuBackend, observe_kernels, optimized_graph
from pipeline.formats import Format
from pipeline.plan import QuantPlan


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    from pipeline.evaluate import Evaluator
    from tests.conftest import _config

    return Evaluator(_config("digits_mlp.yaml", tmp_path_factory.mktemp("kernels-mlp")))


def _followed_by_relu(reference_onnx: str) -> dict[str, bool]:
    """Per ONNX node of the reference: is its output read by a Relu (what ORT fuses into FusedGemm)?"""
    g = onnx.load(reference_onnx).graph
    readers = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    return {n.name: "Relu" in readers.get(n.output[0], []) for n in g.node}


def _quantize(ev, plan, out):
    artifact, layers, extra, _ = ev.quantize(plan, out)
    return artifact, {l.name: l for l in layers}, extra


def test_int8_static_gemms_run_qgemm_with_or_without_a_relu_after_them(mlp, tmp_path):
    """ORT's QDQ selector rejects a Gemm followed by a Relu that a symmetric int8 Q does not make
    redundant; the quantizer writes that Relu as Max(x, 0) (exporters.quant.ort_passes), so every
    int8-static Gemm of the MLP - three followed by a Relu, one not - runs ORT's QGemm."""
    artifact, layers, extra = _quantize(mlp, QuantPlan.uniform("int8"), tmp_path)
    relu_after = _followed_by_relu(mlp.reference.onnx_path)
    table = mlp.reference.layer_table
    assert any(relu_after[l.onnx_node] for l in table) and not all(relu_after[l.onnx_node] for l in table)
    opt_ops = [n.op_type for n in optimized_graph(artifact).graph.node]
    for layer in table:
        r = layers[layer.name]
        assert (r.kernel, r.execution) == ("QGemm", "native"), (layer.name, r.kernel)
        assert "static table" not in r.detail
    assert opt_ops.count("QGemm") == len(table) and "FusedGemm" not in opt_ops  # the kernels named are ORT's
    assert extra["execution_source"].startswith("observed") and extra["kernel_observation_s"] >= 0


def test_an_int8_conv_whose_output_branches_is_observed_emulated(tmp_path):
    """The case left float (exporters.quant.ort_passes.split_shared_int8_quantizers): an int8 Conv
    whose quantized output feeds two int8 Convs. ORT copies the output DQ per reader, the Conv's
    output Q then has two edges, its S8->U8 conversion is skipped and no QLinearConv is fused on
    x86. The static table says native; the observation says what runs."""
    import torch
    import torch.nn as nn

    from exporters.onnx_quant import quantize_model
    from pipeline.backends.native import QDQ_INT8
    from pipeline.backends.native import execution as static_table
    from pipeline.formats import Calibration
    from pipeline.models.torch_adapter import build_layer_table, enumerate_layers
    from pipeline.plan import LayerChoice

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.d = nn.Conv2d(4, 4, 1)
            self.e = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.c(x)
            return self.d(h) + self.e(h)

    torch.manual_seed(0)
    m = Branch().eval()
    model = torch.onnx.export(m, (torch.randn(2, 3, 8, 8),), dynamo=True, opset_version=21, optimize=True).model_proto
    table = build_layer_table(model, enumerate_layers(m))
    src = tmp_path / "ref.onnx"
    onnx.save(model, str(src))
    feeds = [{model.graph.input[0].name: np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)}]
    choices = {n: LayerChoice(format="int8") for n in table.names}
    q = quantize_model(src, table, choices, feeds, Calibration.MINMAX, tmp_path / "q.onnx")
    seen = observe_kernels(q.path, table, {n: Format.INT8 for n in table.names})
    kernel, execution = seen["c"]
    assert kernel.startswith("Conv") and "dequantized int8" in kernel and execution == "emulated"
    assert static_table("ort-cpu", Format.INT8, QDQ_INT8) == "native"


def test_int4_matmulnbits_native_fp8_emulated_dynamic_int8_integer(mlp, tmp_path):
    _, int4, _ = _quantize(mlp, QuantPlan.uniform("int4"), tmp_path / "int4")
    _, fp8, _ = _quantize(mlp, QuantPlan.uniform("fp8"), tmp_path / "fp8")
    _, dyn, _ = _quantize(mlp, QuantPlan.uniform("int8", int8_activations="dynamic"), tmp_path / "dyn")
    _, bf16, _ = _quantize(mlp, QuantPlan.uniform("bf16"), tmp_path / "bf16")
    _, fp32, _ = _quantize(mlp, QuantPlan.uniform("fp32"), tmp_path / "fp32")
    names = mlp.reference.layer_table.names
    for n in names:
        assert (int4[n].kernel, int4[n].execution) == ("MatMulNBits", "native")
        assert "dequantized fp8-e4m3fn" in fp8[n].kernel and fp8[n].execution == "emulated"
        assert dyn[n].kernel in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger")
        assert dyn[n].execution == "native"
        assert "bf16-rounded inputs" in bf16[n].kernel and bf16[n].execution == "emulated"
        assert fp32[n].execution == "native" and fp32[n].kernel in ("Gemm", "FusedGemm")
        # where observation and the table agree, the detail is the quantizer's, untouched
        assert "static table" not in int4[n].detail + fp8[n].detail + dyn[n].detail


def test_cnn_int8_conv_is_qlinearconv_and_int4_conv_is_float_on_dequantized_int4(tmp_path):
    from pipeline.evaluate import Evaluator
    from tests.conftest import _config

    ev = Evaluator(_config("digits_cnn.yaml", tmp_path / "w"))
    _, int8, _ = _quantize(ev, QuantPlan.uniform("int8"), tmp_path / "int8")
    _, int4, _ = _quantize(ev, QuantPlan.uniform("int4"), tmp_path / "int4")
    convs = [l.name for l in ev.reference.layer_table if l.onnx_op == "Conv"]
    assert convs
    for n in convs:
        assert (int8[n].kernel, int8[n].execution) == ("QLinearConv", "native")
        assert "dequantized int4" in int4[n].kernel and int4[n].execution == "emulated"


def _twice_model(tmp_path):
    import torch
    import torch.nn as nn

    from pipeline.models.torch_adapter import build_layer_table, enumerate_layers

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))  # 1st call feeds a Relu, the 2nd does not

    torch.manual_seed(0)
    m = Twice().eval()
    prog = torch.onnx.export(m, (torch.randn(4, 16),), dynamo=True, opset_version=21, optimize=True)
    model = prog.model_proto
    table = build_layer_table(model, enumerate_layers(m))  # unties the shared weight in ``model``
    src = tmp_path / "ref.onnx"
    onnx.save(model, str(src))
    return src, table, model.graph.input[0].name


def test_a_shared_layer_reports_each_calls_kernel(tmp_path):
    from exporters.onnx_quant import quantize_model
    from pipeline.formats import Calibration
    from pipeline.plan import LayerChoice

    src, table, inp = _twice_model(tmp_path)
    assert sorted(table.names) == ["fc", "fc#2"]
    relu_after = _followed_by_relu(str(src))
    feeds = [{inp: np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)}]
    for fmt in ("int8", "fp32"):
        choices = {n: LayerChoice(format=fmt) for n in table.names}
        q = quantize_model(src, table, choices, feeds, Calibration.MINMAX, tmp_path / f"{fmt}.onnx")
        seen = observe_kernels(q.path, table, {n: Format(fmt) for n in table.names})
        assert set(seen) == set(table.names), f"{fmt}: not every call located: {seen}"
        for layer in table:
            kernel, execution = seen[layer.name]
            if fmt == "fp32":
                assert execution == "native"
                assert kernel == ("FusedGemm" if relu_after[layer.onnx_node] else "Gemm")
            else:  # int8: QGemm whether or not a Relu follows the call
                assert kernel == "QGemm" and execution == "native"


def test_the_optimized_graph_is_built_with_the_measured_sessions_options(mlp, tmp_path):
    """int4 weight-only stays weight-only: the pinned accuracy level 0 reaches the observation session."""
    from pipeline.formats import QuantTarget

    if mlp.backend.quant_target is not QuantTarget.ORT:
        pytest.skip("needs the ort target")
    artifact, _, _ = _quantize(mlp, QuantPlan.uniform("int4"), tmp_path)
    nbits = [n for n in optimized_graph(artifact).graph.node if n.op_type == "MatMulNBits"]
    assert nbits
    for n in nbits:
        level = next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
        assert level == 0
    assert "MatMulNBits" in INTEGER_KERNELS


def test_only_ort_cpu_observes_its_kernels():
    from pipeline.backends.gpu import OrtCudaBackend, OrtTrtBackend, TensorRTBackend

    assert OrtCpuBackend.observed_kernels is not Backend.observed_kernels
    for cls in (OrtCudaBackend, OrtTrtBackend, TensorRTBackend):  # GPU: static table, never guessed
        assert cls.observed_kernels is Backend.observed_kernels
