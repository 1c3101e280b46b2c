"""Keras layer discovery follows tf2onnx's folding (issue 14, section 2), Keras side.

Conv2D + BatchNormalization (folded by tf2onnx), DepthwiseConv2D, SeparableConv2D (two ONNX
Convs), a residual Add, Dense + LayerNormalization + GELU and EinsumDense: every quantizable
weight is in the layer table under its layer name, tied to a node whose weight is that kernel
(rescaled per channel where a BatchNorm was folded in), the params share is what Keras counts,
and uniform INT8 / INT4 plans quantize and run in ONNX Runtime close to Keras.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.keras
pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from pipeline.config import parse_config  # noqa: E402
from pipeline.formats import Calibration, Format  # noqa: E402
from pipeline.layers import scaled_axis  # noqa: E402
from pipeline.models.keras_adapter import KerasAdapter, import_tf  # noqa: E402
from pipeline.models.keras_layers import enumerate_layers, onnx_layouts  # noqa: E402
from pipeline.plan import LayerChoice  # noqa: E402


def _norms(model, keras, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.moving_mean.assign(rng.uniform(-0.2, 0.2, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
    return model


def conv_bn_cnn(keras):
    L = keras.layers
    keras.utils.set_random_seed(0)
    x = inp = keras.Input((8, 8, 1), name="input")
    for i, ch in enumerate((16, 32, 32), start=1):
        x = L.Conv2D(ch, 3, padding="same", use_bias=i == 3, name=f"conv{i}")(x)
        x = L.BatchNormalization(name=f"bn{i}")(x)
        x = L.ReLU(name=f"act{i}")(x)
    x = L.GlobalAveragePooling2D()(x)
    return _norms(keras.Model(inp, L.Dense(10, name="fc")(x)), keras)


def mobilenet_block(keras):
    L = keras.layers
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1), name="input")
    x = L.ReLU(6.0)(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)))
    y = L.ReLU(6.0)(L.BatchNormalization(name="dw_bn")(L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)))
    y = L.BatchNormalization(name="pw_bn")(L.Conv2D(8, 1, use_bias=False, name="pw")(y))
    x = L.Add()([x, y])  # residual
    x = L.BatchNormalization(name="sep_bn")(L.SeparableConv2D(16, 3, padding="same", name="sep")(x))
    x = L.GlobalAveragePooling2D()(L.ReLU(6.0)(x))
    return _norms(keras.Model(inp, L.Dense(10, name="head")(x)), keras)


def gelu_tanh(t):
    import keras

    return keras.activations.gelu(t, approximate=True)


def ln_gelu_mlp(keras):
    L = keras.layers
    keras.utils.set_random_seed(2)
    inp = keras.Input((64,), name="input")
    # tf2onnx 1.17 has no Erfc: the exact GELU does not convert; the tanh form does.
    x = L.Activation(gelu_tanh)(
        L.LayerNormalization(name="ln")(L.Dense(64, name="fc1")(inp)))
    x = L.Reshape((8, 8))(x)
    x = L.EinsumDense("abc,cd->abd", output_shape=(8, 16), bias_axes="d", name="proj")(x)
    x = L.Flatten()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x))


ZOO = {"conv_bn_cnn": (conv_bn_cnn, ["conv1", "conv2", "conv3", "fc"]),
       "mobilenet_block": (mobilenet_block, ["stem", "dw", "pw", "sep/depthwise", "sep/pointwise", "head"]),
       "ln_gelu_mlp": (ln_gelu_mlp, ["fc1", "proj", "head"])}
SHAPES = {"conv_bn_cnn": (8, 8, 1), "mobilenet_block": (8, 8, 1), "ln_gelu_mlp": (64,)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    _, keras = import_tf(1)
    work = tmp_path_factory.mktemp("keras-zoo")
    cfg = parse_config({"name": "kzoo", "workdir": str(work), "model": {"framework": "keras", "factory": "unused:f"},
                        "data": {"calibration": {"source": "unused:d"}, "eval": {"source": "unused:d"}}},
                       check_imports=False)
    out = {}
    for name, (build, _) in ZOO.items():
        model = build(keras)
        sample = {"input": np.random.default_rng(0).standard_normal((2, *SHAPES[name])).astype(np.float32)}
        out[name] = (model, KerasAdapter(cfg, model=model, sample_inputs=sample).export_reference(work))
    return keras, out


@pytest.mark.parametrize("name", list(ZOO))
def test_every_keras_conv_and_dense_is_found(exported, name):
    keras, models = exported
    model, ref = models[name]
    table = ref.layer_table
    assert table.names == ZOO[name][1]
    graph = onnx.load(ref.onnx_path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    klayers = {kl.name: kl for kl in enumerate_layers(model, keras)}
    for row in table:
        assert nodes[row.onnx_node].input[1 if row.onnx_op in ("Conv", "Gemm") else 1] == row.weight or \
            row.weight in nodes[row.onnx_node].input
        w = inits[row.weight]
        assert any(f.shape == w.shape and scaled_axis(w, f) is not None for f in onnx_layouts(klayers[row.name])), \
            f"{row.name}: ONNX weight is not its kernel"
    bns = {l.name for l in model.layers if isinstance(l, keras.layers.BatchNormalization)}
    folded = {l.folded for l in table if l.folded}
    assert folded <= bns
    if name == "conv_bn_cnn":
        assert folded == bns, "tf2onnx folds every BatchNorm that follows a Conv2D here"
    reasons = {m.name: m.reason for m in table.unquantized}
    assert all("folded" in reasons[b] for b in folded)
    # params share: kernels over all variables except the quantized layers' biases and BN statistics
    kernels = sum(kl.weight.size for kl in klayers.values())
    quant_types = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Conv2D,
                   keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    biases = sum(int(np.prod(l.bias.shape)) for l in model.layers
                 if isinstance(l, quant_types) and getattr(l, "bias", None) is not None)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    assert table.total_params() == kernels
    assert table.quantizable_share() == pytest.approx(kernels / (total - biases), abs=1e-9)


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("fmt,tolerance", [(Format.INT8, 0.1), (Format.INT4, 0.5)])
def test_keras_uniform_plans_quantize_and_run(exported, name, fmt, tolerance, tmp_path):
    from exporters.onnx_quant import quantize_model

    _, models = exported
    model, ref = models[name]
    rng = np.random.default_rng(0)
    calib = [{"input": rng.standard_normal((16, *SHAPES[name])).astype(np.float32)} for _ in range(4)]
    x = rng.standard_normal((32, *SHAPES[name])).astype(np.float32)
    choices = {n: LayerChoice(format=fmt) for n in ref.layer_table.names}
    q = quantize_model(ref.onnx_path, ref.layer_table, choices, calib, Calibration.MINMAX, tmp_path / "q.onnx",
                       workdir=tmp_path)
    assert [l.format for l in q.layers] == [fmt] * len(ref.layer_table)
    want = np.asarray(model(x, training=False))
    got = ort.InferenceSession(q.path, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < tolerance, f"{name} {fmt.value}: relative error {rel:.3f}"
