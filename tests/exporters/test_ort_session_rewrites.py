"""What a default ONNX Runtime session runs must be what the quantizer wrote.

ORT's session-time ``WeightBiasQuantization`` transformer (ORT_ENABLE_BASIC and up) quantizes
the fp32 weight of a Conv/Gemm whose input is a per-tensor DequantizeLinear and whose output
leads to a QuantizeLinear, and rounds its fp32 bias to int32 (see
``exporters/quant/ort_passes.py``, ``exporters/quant/ort_session_forms.py``). These tests open every artifact twice - as deployed (all
optimizations) and with that one transformer disabled - and require the same optimized graph
and the same numbers, and read the optimized graph to check that a layer planned fp32 still
has its fp32 weight and that int8-static Convs still become QLinearConv. Fixed-shape 3-D
Linears (MatMul + Add, which ORT's MatMulAddFusion fuses through Reshapes) must also load with
the ORT CPU backend's options: they used to fail there on a Q node that ORT's own QDQ
propagation inserted (the quantizer's load check only used ORT_DISABLE_ALL then).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from exporters.onnx_quant import quantize_model
from pipeline.formats import Calibration, Format, Int8Activations
from pipeline.plan import LayerChoice


class Chain(nn.Module):
    """c1 -> c2 with nothing in between (c2 reads c1's output DQ), Relu, c3, then two Linears."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(self.c1(x)))))
        return self.fc2(torch.relu(self.fc(x.flatten(1))))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from pipeline.models.torch_adapter import build_layer_table, enumerate_layers

    torch.manual_seed(0)
    m = Chain().eval()
    prog = torch.onnx.export(m, (torch.randn(4, 3, 6, 6),), dynamo=True, opset_version=21, optimize=True)
    model = prog.model_proto
    table = build_layer_table(model, enumerate_layers(m))
    assert sorted(table.names) == ["c1", "c2", "c3", "fc", "fc2"]
    src = tmp_path_factory.mktemp("chain") / "ref.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    feeds = [{name: rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    return src, table, feeds, {l.name: l for l in table}


def _choice(f: str) -> LayerChoice:
    if f.startswith("int8"):
        acts = Int8Activations.DYNAMIC if f.endswith("dynamic") else Int8Activations.STATIC
        return LayerChoice(format=Format.INT8, int8_activations=acts)
    return LayerChoice(format=Format(f), int4_block_size=32)


def _build(chain, plan: dict[str, str], path, uint8: bool = False):
    src, table, feeds, _ = chain
    choices = {n: _choice(plan.get(n, "fp32")) for n in table.names}
    return quantize_model(src, table, choices, feeds, Calibration.MINMAX, path, uint8_activations=uint8).path


def _written(path, feeds):
    """The artifact's own numbers: every Q/DQ as written, no ORT graph rewrite (ORT_DISABLE_ALL)."""
    sess = _session(path, Path(str(path) + ".plain.onnx"), level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    return [sess.run(None, f)[0] for f in feeds]


def _uint8_is_neutral(path_s8, path_u8, feeds):
    """The uint8 artifact stores the same numbers: its activation pairs are the int8 ones' as uint8
    zero point 128 (same scales), its constants unchanged, and its plain run bit for bit the same."""
    a, b = onnx.load(str(path_s8)), onnx.load(str(path_u8))
    ia = {t.name: onnx.numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    qdq = ("QuantizeLinear", "DequantizeLinear")
    converted = 0
    for n in b.graph.node:
        if n.op_type not in qdq or n.input[0] in ib or len(n.input) < 3 or ib[n.input[2]].dtype != np.uint8:
            continue
        assert ib[n.input[2]].size == 1 and ib[n.input[2]].item() == 128 and ib[n.input[1]].size == 1, n.name
        twin = next((m for m in a.graph.node if m.name == n.name), None)
        assert twin is not None and ia[twin.input[2]].dtype == np.int8 and ia[twin.input[2]].item() == 0, n.name
        assert ia[twin.input[1]] == ib[n.input[1]], n.name
        converted += 1
    for n in b.graph.node:  # constants (weights, biases, shields' per-axis pairs) as the int8 artifact has them
        if n.op_type in qdq and n.input[0] in ib:
            np.testing.assert_array_equal(ib[n.input[0]], ia[n.input[0]])
    for x, y in zip(_written(path_u8, feeds), _written(path_s8, feeds)):
        np.testing.assert_array_equal(x, y)
    return converted


def _session(path, out, disabled=(), level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(out)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    return sess, onnx.load(str(out)).graph


def _signature(g: onnx.GraphProto) -> list[tuple[str, list[str]]]:
    return [(n.op_type, list(n.input)) for n in g.node]


PLANS = {
    "fp32-between-int8": {"c1": "int8-static", "c3": "int8-static", "fc": "int8-static"},
    "fp8-between-int8": {"c1": "int8-static", "c2": "fp8", "c3": "int8-static", "fc": "int8-static"},
    "all-fp8": {"c1": "fp8", "c2": "fp8", "c3": "fp8", "fc": "fp8", "fc2": "fp8"},
    "bf16-int4": {"c1": "int8-static", "c2": "bf16", "c3": "int4", "fc": "fp8"},
    "int4-conv-behind-int8": {"c1": "int8-static", "c2": "int4", "c3": "fp8"},
    "conv-dynamic": {"c1": "int8-static", "c2": "int8-dynamic", "c3": "int8-static", "fc": "fp8"},
    "all-int8": {n: "int8-static" for n in ("c1", "c2", "c3", "fc", "fc2")},
}


@pytest.mark.parametrize("uint8", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_default_session_runs_the_written_graph(plan, uint8, chain, tmp_path):
    """WeightBiasQuantization finds nothing to change in any of these plans; with the activations
    stored uint8 (``uint8_activations``) neither, and the written numbers are the int8 artifact's."""
    art = _build(chain, PLANS[plan], tmp_path / "q.onnx", uint8)
    if uint8:
        converted = _uint8_is_neutral(_build(chain, PLANS[plan], tmp_path / "s8.onnx"), art, chain[2])
        assert (converted > 0) == any(v == "int8-static" for v in PLANS[plan].values())
    feeds = chain[2][0]
    default, g_default = _session(art, tmp_path / "default.onnx")
    without, g_without = _session(art, tmp_path / "without.onnx", ["WeightBiasQuantization"])
    assert _signature(g_default) == _signature(g_without)
    np.testing.assert_array_equal(default.run(None, feeds)[0], without.run(None, feeds)[0])


def test_gemm_layers_in_a_plan_with_a_dynamic_layer(chain, tmp_path):
    """Only Gemms planned int8-dynamic/int4 are rewritten as MatMul + Add; the others keep their bias
    in the node, so ORT's MatMulAddFusion + WeightBiasQuantization find nothing to re-round."""
    art = _build(chain, {"c2": "int8-dynamic", "fc": "int8-static", "fc2": "fp8"}, tmp_path / "q.onnx")
    _, g_default = _session(art, tmp_path / "default.onnx")
    _, g_without = _session(art, tmp_path / "without.onnx", ["WeightBiasQuantization"])
    assert _signature(g_default) == _signature(g_without)


def test_fp32_layer_behind_an_int8_conv_keeps_its_fp32_weight(chain, tmp_path):
    """c2 is planned fp32 and reads c1's (int8-static) output; its output feeds c3's quantizer.
    Before the shield, ORT quantized c2's weight to per-tensor int8 at session time."""
    _, _, feeds, layers = chain
    art = _build(chain, PLANS["fp32-between-int8"], tmp_path / "q.onnx")
    w_c2 = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(art)).graph.initializer if t.name == layers["c2"].weight))

    # default session (ORT_ENABLE_ALL): two QLinearConv (c1, c3), one float conv with a float weight
    sess, g = _session(art, tmp_path / "all.onnx")
    inits = {t.name: t for t in g.initializer}
    ops = [n.op_type for n in g.node]
    assert ops.count("QLinearConv") == 2, ops
    float_convs = [n for n in g.node if n.op_type in ("Conv", "FusedConv")]
    assert len(float_convs) == 1, ops
    w = inits.get(float_convs[0].input[1])
    assert w is not None and w.data_type == onnx.TensorProto.FLOAT, "c2's weight is computed (dequantized) at run time"
    # without the NCHWc layout (level 3), c2's weight is the very initializer the quantizer wrote
    _, g2 = _session(art, tmp_path / "extended.onnx", level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    inits2 = {t.name: t for t in g2.initializer}
    convs = [n for n in g2.node if n.op_type in ("Conv", "FusedConv")]
    assert len(convs) == 1
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits2[convs[0].input[1]]), w_c2)

    # and the session computes c2 in fp32: the same output as with the transformer off
    without, _ = _session(art, tmp_path / "without.onnx", ["WeightBiasQuantization"])
    np.testing.assert_array_equal(sess.run(None, feeds[0])[0], without.run(None, feeds[0])[0])


def test_fp8_conv_behind_an_int8_conv_gets_its_own_fp8_input_quantizer(chain, tmp_path):
    """quantize_static skips a tensor produced by a DequantizeLinear, so c2 (fp8) used to read
    c1's int8 DQ with no fp8 quantizer of its own."""
    _, _, _, layers = chain
    art = _build(chain, PLANS["fp8-between-int8"], tmp_path / "q.onnx")
    g = onnx.load(str(art)).graph
    producer = {o: n for n in g.node for o in n.output}
    c2 = next(n for n in g.node if n.name == layers["c2"].onnx_node)
    dq = producer[c2.input[0]]
    q = producer[dq.input[0]]
    assert dq.op_type == "DequantizeLinear" and q.op_type == "QuantizeLinear"
    assert any(a.name == "output_dtype" and a.i == onnx.TensorProto.FLOAT8E4M3FN for a in q.attribute)


# ------------------------------------------------------------------ fixed-shape 3-D Linear layers
class Seq(nn.Module):
    """Linears on a [B, T, C] input, exported with a fixed batch: MatMul + Add each, static shapes,
    which ORT's MatMulAddFusion turns into Reshape -> Gemm -> Reshape at session time. c (a Conv
    whose output goes through a Transpose into fc) gives an int8 DQ for ORT to propagate."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 1)
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):  # x: [B, 3, T, 1]
        h = torch.relu(self.c(x).squeeze(-1).transpose(1, 2))  # [B, T, 8]; c's output DQ -> Squeeze -> Transpose
        return self.b(torch.relu(self.a(h)))


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    from pipeline.models.torch_adapter import build_layer_table, enumerate_layers

    torch.manual_seed(0)
    m = Seq().eval()
    shape = (4, 3, 5, 1)
    model = torch.onnx.export(m, (torch.randn(*shape),), dynamo=True, opset_version=21, optimize=True).model_proto
    assert all(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim), "a fixed-shape export"
    table = build_layer_table(model, enumerate_layers(m))
    assert {l.name: l.onnx_op for l in table} == {"c": "Conv", "a": "MatMul", "b": "MatMul"}
    src = tmp_path_factory.mktemp("seq") / "ref.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    feeds = [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    return src, table, feeds, {l.name: l for l in table}


SEQ_PLANS = {
    "int8-int8": {"a": "int8-static", "b": "int8-static"},
    "int8-fp32": {"a": "int8-static"},
    "fp32-int8": {"b": "int8-static"},
    "int8-fp8": {"a": "int8-static", "b": "fp8"},
    "fp8-int8": {"a": "fp8", "b": "int8-static"},
    "conv-int8-into-fp32": {"c": "int8-static"},
    "all-int8": {"c": "int8-static", "a": "int8-static", "b": "int8-static"},
}


def _backend_session(path, out=None, disabled=()):
    """The options the ORT CPU backend measures with."""
    from pipeline.backends.ort.session import session_options

    opts = session_options()
    if out is not None:
        opts.optimized_model_filepath = str(out)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
    return sess, (onnx.load(str(out)).graph if out is not None else None)


@pytest.mark.parametrize("uint8", [False, True], ids=["int8", "uint8"])
@pytest.mark.parametrize("plan", list(SEQ_PLANS))
def test_fixed_shape_3d_linears_load_and_run_as_written(plan, uint8, seq, tmp_path):
    """onnxruntime 1.32 inserted Q nodes with a stale output_dtype (QDQPropagation through
    MatMulAddFusion's gemm_input_reshape / a Squeeze / Transpose after an int8 DQ, then S8->U8):
    "QuantizeLinear output_dtype INT8 does not match y_zero_point type UINT8" at session load.
    Now every such artifact loads with the backend's options, MatMulAddFusion finds nothing to
    fuse, and the run equals the written graph's."""
    _, _, feeds, _ = seq
    art = _build(seq, SEQ_PLANS[plan], tmp_path / "q.onnx", uint8)
    if uint8:
        assert _uint8_is_neutral(_build(seq, SEQ_PLANS[plan], tmp_path / "s8.onnx"), art, feeds) > 0
    default, g_default = _backend_session(art, tmp_path / "default.onnx")
    _, g_without = _backend_session(art, tmp_path / "without.onnx", ["WeightBiasQuantization", "MatMulAddFusion"])
    assert _signature(g_default) == _signature(g_without)
    assert not [n.name for n in g_default.node if "MatMulAddFusion" in n.name]
    written = _session(art, tmp_path / "plain.onnx", level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    want = written.run(None, feeds[0])[0]
    got = default.run(None, feeds[0])[0]
    # integer kernels (MatMulIntegerToFloat, QLinearConv) vs the float QDQ reference: round-off only
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_fixed_shape_int8_matmul_rewrites_are_neutral(seq, tmp_path):
    """What pre_empt_session_rewrites writes is numerically neutral: the plain (unoptimized) run of
    the artifact equals that of the same artifact with the rewrites taken out again."""
    from exporters.quant import ort_session_forms

    _, _, feeds, _ = seq
    art = _build(seq, SEQ_PLANS["conv-int8-into-fp32"], tmp_path / "q.onnx")
    m = onnx.load(str(art))
    inits = {t.name: t for t in m.graph.initializer}
    rows = [n.input[1] for n in m.graph.node if n.op_type == "Add" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    assert len(rows) == 2, "both Linear biases written [1, N]"
    pairs = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.name.endswith("_QuantizeLinear") and "_int8_q" in n.output[0]]
    assert pairs, "the int8 DQ behind the Conv is propagated through Squeeze/Transpose (into fp32 a) in the file"
    assert all(not any(a.name == "output_dtype" for a in q.attribute) for q in pairs)
    # undo: biases back to [N], the written pairs bypassed
    undone = onnx.ModelProto()
    undone.CopyFrom(m)
    for t in undone.graph.initializer:
        if t.name in rows:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).reshape(-1), t.name))
    producer = {o: n for n in undone.graph.node for o in n.output}
    for n in undone.graph.node:
        for k, i in enumerate(n.input):
            p = producer.get(i)
            if p is not None and p.op_type == "DequantizeLinear" and "_int8_dq" in i:
                n.input[k] = producer[p.input[0]].input[0]
    for n in [n for n in undone.graph.node if "_int8_q" in n.output[0] or "_int8_dq" in n.output[0]]:
        undone.graph.node.remove(n)
    undone_path = tmp_path / "undone.onnx"
    onnx.save(undone, str(undone_path))
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = _session(art, tmp_path / "a.onnx", level=level)[0].run(None, feeds[1])[0]
    b = _session(undone_path, tmp_path / "b.onnx", level=level)[0].run(None, feeds[1])[0]
    np.testing.assert_array_equal(a, b)
    # and the undone artifact is the one ORT's optimizers break: the check names the failure
    from exporters.onnx_quant import _check_loads

    with pytest.raises(RuntimeError, match="without graph optimizations but not with the default"):
        _check_loads(undone_path)
    assert ort_session_forms.block_nd_matmul_add_fusion(undone, ort_session_forms.tensor_ranks(onnx.shape_inference.infer_shapes(undone))) == 2


# ------------------------------------------------------------------ integer kernels where ORT has them
def _export(m: nn.Module, args, tmp_path):
    from pipeline.models.torch_adapter import build_layer_table, enumerate_layers

    model = torch.onnx.export(m, args, dynamo=True, opset_version=21, optimize=True).model_proto
    table = build_layer_table(model, enumerate_layers(m))
    src = tmp_path / "ref.onnx"
    onnx.save(model, str(src))
    rng = np.random.default_rng(0)
    feeds = [{i.name: rng.standard_normal(a.shape).astype(np.float32) for i, a in zip(model.graph.input, args)}
             for _ in range(3)]
    return src, table, feeds


def _all_int8(src, table, feeds, path, target="ort"):
    choices = {n: _choice("int8-static") for n in table.names}
    return quantize_model(src, table, choices, feeds, Calibration.MINMAX, path, target=target).path


def _plain_run(path, feeds, tmp_path):
    level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _session(path, tmp_path / "plain_opt.onnx", level=level)[0].run(None, feeds)


class Activations(nn.Module):
    """Linears followed by a Relu and a ReLU6 (Clip): ORT's QDQ selectors look past the layer at them."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 10)

    def forward(self, x):
        return self.c(torch.nn.functional.relu6(self.b(torch.relu(self.a(x)))))


def test_int8_gemm_followed_by_relu_or_clip_runs_qgemm(tmp_path):
    """Before: a and b ran as float FusedGemm on dequantized int8 (the selector rejects a Gemm whose
    Relu/Clip a symmetric int8 Q does not make redundant). Now all three are QGemm, and the Relu/Clip
    written as Max/Min computes the same numbers bit for bit."""
    torch.manual_seed(0)
    src, table, feeds = _export(Activations().eval(), (torch.randn(8, 16),), tmp_path)
    art = _all_int8(src, table, feeds, tmp_path / "q.onnx")
    written = onnx.load(art)
    ops = [n.op_type for n in written.graph.node]
    assert "Relu" not in ops and "Clip" not in ops and ops.count("Max") == 2 and ops.count("Min") == 1
    _, g = _backend_session(art, tmp_path / "opt.onnx")
    opt_ops = [n.op_type for n in g.node]
    assert opt_ops.count("QGemm") == 3 and not {"FusedGemm", "Gemm"} & set(opt_ops), opt_ops

    # neutral: the same artifact with Relu/Clip put back runs to the same bits (no optimizations)
    undone = onnx.ModelProto()
    undone.CopyFrom(written)
    producer = {o: n for n in undone.graph.node for o in n.output}
    for n in list(undone.graph.node):
        if n.op_type == "Min":  # Max(x, lo) -> Min(., hi) becomes Clip(x, lo, hi)
            mx = producer[n.input[0]]
            mx.op_type, mx.output[0] = "Clip", n.output[0]
            mx.input.append(n.input[1])
            undone.graph.node.remove(n)
    for n in undone.graph.node:
        if n.op_type == "Max":
            n.op_type = "Relu"
            del n.input[1:]
    assert [n.op_type for n in undone.graph.node].count("Clip") == 1
    onnx.save(undone, str(tmp_path / "undone.onnx"))
    for f in feeds:
        np.testing.assert_array_equal(_plain_run(art, f, tmp_path)[0], _plain_run(tmp_path / "undone.onnx", f, tmp_path)[0])

    # the TensorRT target keeps its Relu and Clip
    trt = [n.op_type for n in onnx.load(_all_int8(src, table, feeds, tmp_path / "trt.onnx", "tensorrt")).graph.node]
    assert "Relu" in trt and "Clip" in trt and "Max" not in trt


class Projections(nn.Module):
    """Three Linears reading one [B, T, C] tensor (an attention block's query/key/value) and one not."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q = nn.Linear(32, 32)
        self.k = nn.Linear(32, 32)
        self.v = nn.Linear(32, 32)
        self.o = nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(x)
        return self.o(torch.tanh(self.q(h) * self.k(h) + self.v(h)))


def test_int8_layers_sharing_an_input_run_integer_matmuls(tmp_path):
    """Before: q, k and v read one Q -> DQ; ORT copied the DQ per layer, the Q then had three edges,
    its S8->U8 conversion was skipped and the three ran as float MatMuls on dequantized int8. Now each
    reads its own pair of the same tensor with the same scale and zero point."""
    torch.manual_seed(0)
    src, table, feeds = _export(Projections().eval(), (torch.randn(2, 5, 32),), tmp_path)
    assert {l.onnx_op for l in table} == {"MatMul"}
    layers = {l.name: l for l in table}
    art = _all_int8(src, table, feeds, tmp_path / "q.onnx")
    written = onnx.load(art)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    producer = {o: n for n in written.graph.node for o in n.output}
    nodes = {n.name: n for n in written.graph.node}
    pairs = []
    for name in ("q", "k", "v"):
        mm = nodes[layers[name].onnx_node]
        dq = next(producer[i] for i in mm.input if i in producer and producer[i].op_type == "DequantizeLinear"
                  and producer[i].input[0] not in inits)
        q = producer[dq.input[0]]
        pairs.append((q, dq))
    assert len({dq.name for _, dq in pairs}) == 3 and len({q.name for q, _ in pairs}) == 3
    assert len({q.input[0] for q, _ in pairs}) == 1, "all three quantize the same tensor"
    assert len({q.input[2] for q, _ in pairs}) == 3, "own zero points (ORT's CSE would merge the Qs)"
    for q, dq in pairs:
        assert inits[q.input[1]] == inits[pairs[0][0].input[1]] and inits[q.input[2]] == inits[pairs[0][0].input[2]]
        assert list(dq.input[1:]) == list(q.input[1:])

    _, g = _backend_session(art, tmp_path / "opt.onnx")
    opt_ops = [n.op_type for n in g.node]
    assert opt_ops.count("MatMulIntegerToFloat") == 4 and "MatMul" not in opt_ops, opt_ops

    # neutral: every layer back on the first pair gives the same bits (no optimizations)
    undone = onnx.ModelProto()
    undone.CopyFrom(written)
    first = pairs[0][1].output[0]
    for n in undone.graph.node:
        for k, i in enumerate(n.input):
            if i in {dq.output[0] for _, dq in pairs[1:]}:
                n.input[k] = first
    for q, dq in pairs[1:]:
        for n in [n for n in undone.graph.node if n.name in (q.name, dq.name)]:
            undone.graph.node.remove(n)
    onnx.save(undone, str(tmp_path / "undone.onnx"))
    for f in feeds:
        np.testing.assert_array_equal(_plain_run(art, f, tmp_path)[0], _plain_run(tmp_path / "undone.onnx", f, tmp_path)[0])

    # the TensorRT target keeps one quantizer per tensor
    trt = onnx.load(_all_int8(src, table, feeds, tmp_path / "trt.onnx", "tensorrt"))
    norm_out = pairs[0][0].input[0]
    assert sum(1 for n in trt.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == norm_out) == 1
