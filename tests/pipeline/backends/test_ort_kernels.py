"""Observed kernels on ORT CPU: what ONNX Runtime actually runs per layer, read from its optimized graph.

Real artifacts from the real quantizer, real ORT sessions. Expectations come from the graphs
themselves (which layer is followed by a Relu, which op ORT wrote), not from a stored run.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from pipeline.backends.base import Backend
from pipeline.backends.ort.cpu import OrtCpuBackend
from pipeline.backends.ort.kernels import INTEGER_KERNELS, observe_kernels, optimized_graph
from pipeline.formats import Format
from pipeline.plan import QuantPlan


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    from pipeline.evaluation import Evaluator
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


def _resnet_block(tmp_path):
    """A ResNet-style block: c1's quantized output feeds a Relu -> c2 and the residual Add; the
    block's output z is read by two int8 Convs d and e, whose sum goes through f into two Linears
    reading one tensor. Returns (reference path, layer table, calibration feeds)."""
    import torch
    import torch.nn as nn

    from pipeline.models.torch_adapter import build_layer_table, enumerate_layers

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.d = nn.Conv2d(8, 8, 1)
            self.e = nn.Conv2d(8, 8, 1)
            self.f = nn.Conv2d(8, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 10)
            self.fc2 = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            h = self.c1(x)
            z = torch.relu(self.c2(torch.relu(h)) + h)  # residual from c1's output
            t = self.f(self.d(z) + self.e(z)).flatten(1)  # z read by two int8 Convs
            return self.fc(t) + self.fc2(t)  # t read by two int8 Gemms

    torch.manual_seed(0)
    m = Block().eval()
    model = torch.onnx.export(m, (torch.randn(2, 3, 8, 8),), dynamo=True, opset_version=21, optimize=True).model_proto
    table = build_layer_table(model, enumerate_layers(m))
    src = tmp_path / "ref.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    feeds = [{model.graph.input[0].name: rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    return src, table, feeds


def _run(path, feeds, level):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, f)[0] for f in feeds]


def test_uint8_activations_give_every_int8_conv_of_a_residual_block_its_integer_kernel(tmp_path):
    """Written int8 (zero point 0), c1's output Q has two readers (Relu -> c2 and the residual Add):
    ORT's x86 S8->U8 conversion wants a single Q -> DQ edge, skips it, and c1 runs as a float Conv
    on dequantized int8 - the static table says native, the observation says what runs. Written
    uint8 with zero point 128 (``uint8_activations``), every int8 Conv/Gemm runs ORT's integer
    kernel - also d/e and fc/fc2, which read one shared pair each (no per-layer split needed) -
    and every stored and computed value is the same."""
    import onnxruntime as ort

    from exporters.onnx_quant import quantize_model
    from pipeline.backends.native import QDQ_INT8
    from pipeline.backends.native import execution as static_table
    from pipeline.formats import Calibration
    from pipeline.plan import LayerChoice

    src, table, feeds = _resnet_block(tmp_path)
    choices = {n: LayerChoice(format="int8") for n in table.names}
    fmts = {n: Format.INT8 for n in table.names}
    s8 = quantize_model(src, table, choices, feeds, Calibration.MINMAX, tmp_path / "s8.onnx")
    u8 = quantize_model(src, table, choices, feeds, Calibration.MINMAX, tmp_path / "u8.onnx", uint8_activations=True)

    # before: c1 (branching output) emulated, the others native
    before = observe_kernels(s8.path, table, fmts)
    assert set(before) == set(table.names)
    kernel, execution = before["c1"]
    assert kernel.startswith("Conv") and "dequantized int8" in kernel and execution == "emulated"
    assert static_table("ort-cpu", Format.INT8, QDQ_INT8) == "native"
    # after: every layer on its integer kernel
    after = observe_kernels(u8.path, table, fmts)
    assert set(after) == set(table.names)
    for name in table.names:
        op = next(l.onnx_op for l in table if l.name == name)
        assert after[name] == (("QLinearConv" if op == "Conv" else "QGemm"), "native"), (name, after[name])
    assert all("stored uint8, zero point 128" in l.detail for l in u8.layers)

    # stored: activations uint8 zero point 128 with the int8 artifact's scales; weights int8, biases int32
    def qdq(path):
        m = onnx.load(path)
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
        acts = {n.name: (inits[n.input[1]], inits[n.input[2]]) for n in m.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in inits}
        consts = sorted(str(inits[n.input[0]].dtype) for n in m.graph.node
                        if n.op_type == "DequantizeLinear" and n.input[0] in inits)
        return acts, consts

    a8, c8 = qdq(s8.path)
    a_u, c_u = qdq(u8.path)
    assert c8 == c_u and set(c_u) == {"int8", "int32"}
    assert all(zp.dtype == np.int8 and zp.item() == 0 for _, zp in a8.values())
    assert all(zp.dtype == np.uint8 and zp.item() == 128 for _, zp in a_u.values())
    for name, (scale, _) in a_u.items():  # the int8 artifact has each of these nodes (and more: its split copies)
        assert name in a8 and scale == a8[name][0] and scale.dtype == np.float32, name

    # d and e (fc and fc2) read one uint8 pair; the int8 artifact needed a split copy per extra reader
    g = onnx.load(u8.path).graph
    node_of = {l.name: next(n for n in g.node if n.name == l.onnx_node) for l in table}
    assert node_of["d"].input[0] == node_of["e"].input[0] and node_of["fc"].input[0] == node_of["fc2"].input[0]
    assert len(a8) == len(a_u) + 4  # two split Q/DQ pairs

    # the values: both artifacts run as written (ORT_DISABLE_ALL: the QDQ graph itself) and at level
    # BASIC (level-1 rules such as ReluQuantFusion and WeightBiasQuantization, no QDQ fusion, no S8->U8)
    # are bit for bit the same - the written numbers did not change
    L = ort.GraphOptimizationLevel
    for level in (L.ORT_DISABLE_ALL, L.ORT_ENABLE_BASIC):
        for x, y in zip(_run(u8.path, feeds, level), _run(s8.path, feeds, level)):
            np.testing.assert_array_equal(x, y, err_msg=str(level))
    # default sessions: c1 now requantizes in QLinearConv instead of a float Conv + Q; that may round an
    # output that lies on a tie differently (identical on the machine this was written on), no more
    for x, y in zip(_run(u8.path, feeds, L.ORT_ENABLE_ALL), _run(s8.path, feeds, L.ORT_ENABLE_ALL)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-3 * float(np.abs(y).max()))

    # the tensorrt target keeps signed int8 and refuses the option
    with pytest.raises(ValueError, match="uint8_activations"):
        quantize_model(src, table, choices, feeds, Calibration.MINMAX, tmp_path / "trt.onnx", target="tensorrt",
                       uint8_activations=True)


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
    from pipeline.evaluation import Evaluator
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

    assert mlp.backend.quant_target is QuantTarget.ORT  # ort-cpu: MatMulNBits is the int4 form
    artifact, _, _ = _quantize(mlp, QuantPlan.uniform("int4"), tmp_path)
    nbits = [n for n in optimized_graph(artifact).graph.node if n.op_type == "MatMulNBits"]
    assert nbits
    for n in nbits:
        level = next((a.i for a in n.attribute if a.name == "accuracy_level"), 0)
        assert level == 0
    assert "MatMulNBits" in INTEGER_KERNELS


def test_only_ort_cpu_observes_its_kernels():
    from pipeline.backends.ort.cuda import OrtCudaBackend, OrtTrtBackend
    from pipeline.backends.tensorrt.plugin import TensorRTBackend

    assert OrtCpuBackend.observed_kernels is not Backend.observed_kernels
    for cls in (OrtCudaBackend, OrtTrtBackend, TensorRTBackend):  # GPU: static table, never guessed
        assert cls.observed_kernels is Backend.observed_kernels
