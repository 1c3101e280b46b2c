"""exporters.tflite selective int8: every layer the plan keeps fp32 stays float in the .tflite file.

Regression for the last layer: its output is the model's output, and the denylist key
read from an already quantized model (``StatefulPartitionedCall:01``, the final
DEQUANTIZE having taken ``:0``) matched nothing, so TFLite stored it int8.

The file is checked directly: the weight dtype of each weight-carrying op, in execution
order (for these sequential models, the layer order), read through the interpreter,
independently of how the module maps ops to layers.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from exporters.tflite import MODE_SELECTIVE_INT8, WEIGHT_OPS, _layer_ops
from pipeline.backends.tflite import keras_tools
from pipeline.plan import QuantPlan

NAMES = ["conv1", "conv2", "conv3", "fc1", "fc2"]
HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed: pip install -e '.[keras]'")


def _weight_dtypes(path: str) -> list[str]:
    """Weight dtype of each weight-carrying op, in the order the interpreter runs them."""
    from exporters.tflite import _interpreter

    interp = _interpreter(model_path=path, tools=keras_tools())
    tensors = interp.get_tensor_details()
    out = []
    for op in interp._get_ops_details():  # noqa: SLF001
        pos = WEIGHT_OPS.get(op["op_name"])
        if pos is not None and len(op["inputs"]) > pos and op["inputs"][pos] >= 0:
            out.append(np.dtype(tensors[op["inputs"][pos]]["dtype"]).name)
    return out


def _check(result, choices, names):
    want = ["float32" if choices[n].format.value == "fp32" else "int8" for n in names]
    assert result.mode == MODE_SELECTIVE_INT8
    assert _weight_dtypes(result.path) == want
    assert {l.name: l.realisation for l in result.layers} == {
        n: ("fp32" if w == "float32" else "qdq-int8") for n, w in zip(names, want)}
    assert not [n for n in result.notes if "plan asked" in n], result.notes


# ------------------------------------------------------------------ no TF needed
def test_layer_ops_tells_auto_named_scopes_apart():
    # TF re-enters Keras's automatic names with a suffix: layer dense -> scope dense_1,
    # layer dense_1 -> dense_1_2; a plain prefix match gives scope dense_1 to both layers.
    weights = ["m_1/dense_1/MatMul", "m_1/dense_1_2/MatMul", "m_1/dense_2_1/MatMul"]
    assert _layer_ops(weights, ["dense", "dense_1", "dense_2"]) == {"dense": [0], "dense_1": [1], "dense_2": [2]}
    # the usual case: unique names, each scope suffixed once; fused names split on ';'
    fused = ["m_1/conv1_1/convolution", "m_1/fc1_1/MatMul;m_1/fc1_1/Relu", "m_1/fc2_1/MatMul"]
    assert _layer_ops(fused, ["conv1", "fc1", "fc2"]) == {"conv1": [0], "fc1": [1], "fc2": [2]}
    assert _layer_ops(fused, ["conv1", "fc9"])["fc9"] == []


# ------------------------------------------------------------------ with TF
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")
    from pipeline.examples.keras_digits import calibration, cnn

    x, _ = calibration()
    return cnn(), [{"input": x[i:i + 32]} for i in (0, 32)], tmp_path_factory.mktemp("tflite-sel")


@needs_tf
@pytest.mark.keras
@pytest.mark.parametrize("label, fp32", [
    ("last", ["fc2"]),
    ("first", ["conv1"]),
    ("first+last", ["conv1", "fc2"]),
    ("consecutive-to-the-end", ["conv3", "fc1", "fc2"]),
    ("all-but-one", ["conv1", "conv3", "fc1", "fc2"]),
    ("only-last-int8", ["conv1", "conv2", "conv3", "fc1"]),
])
def test_every_fp32_layer_stays_float(digits, label, fp32):
    from exporters.tflite import convert

    model, reps, out = digits
    choices = QuantPlan(layers={**{n: "fp32" for n in fp32}, "*": "int8"}).resolve(NAMES)
    r = convert(model, choices, reps, out / f"{label}.tflite", ["output"], tools=keras_tools())
    _check(r, choices, NAMES)


@needs_tf
@pytest.mark.keras
def test_last_layer_fp32_output_comes_from_the_float_layer(digits):
    """The model output is the float Dense itself (no DEQUANTIZE after it), and its logits
    stay close to the Keras model's (only the int8 layers before it add error)."""
    from exporters.tflite import _interpreter, convert

    model, reps, out = digits
    choices = QuantPlan(layers={"fc2": "fp32", "*": "int8"}).resolve(NAMES)
    r = convert(model, choices, reps, out / "last-out.tflite", ["output"], tools=keras_tools())
    interp = _interpreter(model_path=r.path, tools=keras_tools())
    out_idx = interp.get_output_details()[0]["index"]
    producer = [op["op_name"] for op in interp._get_ops_details() if out_idx in op["outputs"]]  # noqa: SLF001
    assert producer == ["FULLY_CONNECTED"]
    x = reps[0]["input"]
    got = interp.get_signature_runner()(input=x)["output"]
    ref = np.asarray(model(x, training=False))
    assert got.dtype == np.float32
    assert (got.argmax(1) == ref.argmax(1)).mean() > 0.9


@needs_tf
@pytest.mark.keras
def test_auto_named_dense_layers_map_to_their_own_ops(tmp_path):
    """Keras's automatic names (dense, dense_1, dense_2): the fp32 layer is the one kept float."""
    from exporters.tflite import convert
    from pipeline.models.keras_adapter import import_tf

    _, keras = import_tf()
    keras.utils.set_random_seed(0)
    inp = keras.Input((24,), name="input")
    h = keras.layers.Dense(48, activation="relu")(inp)
    h = keras.layers.Dense(40, activation="relu")(h)
    model = keras.Model(inp, keras.layers.Dense(6)(h))
    names = [l.name for l in model.layers if hasattr(l, "kernel")]
    assert len(names) == 3
    x = np.random.default_rng(0).normal(size=(64, 24)).astype(np.float32)
    reps = [{"input": x[:32]}, {"input": x[32:]}]
    for k, fp32 in enumerate(([names[1]], [names[0], names[2]])):
        choices = QuantPlan(layers={**{n: "fp32" for n in fp32}, "*": "int8"}).resolve(names)
        _check(convert(model, choices, reps, tmp_path / f"m{k}.tflite", ["output"], tools=keras_tools()), choices, names)
