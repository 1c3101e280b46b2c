"""PyTorch and Keras give the same ONNX numbers for the same network.

One small CNN (2 conv, max-pool, 2 dense) is built in both frameworks with the
same weights (Keras layouts converted to PyTorch's: HWIO -> OIHW, and fc1's rows
permuted from NHWC to NCHW flattening order). Both adapters export their FP32
reference; on the same digit images (NCHW for PyTorch, NHWC for Keras) the two
ONNX graphs must agree to fp32 round-off, and the same plan, quantized by the
same ``exporters.onnx_quant``, must give outputs that agree within what that
plan's formats can move a value (a rounding tie broken differently can flip one
quantization step somewhere; nothing else may differ).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

pytestmark = pytest.mark.keras
pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")

from pipeline.config import parse_config  # noqa: E402
from pipeline.formats import Calibration, Format  # noqa: E402
from pipeline.plan import QuantPlan  # noqa: E402

THIS = "tests.test_cross_framework"
C1, C2, HIDDEN = 8, 16, 32


@lru_cache(maxsize=1)
def keras_weights() -> dict[str, np.ndarray]:
    """Deterministic weights in Keras layouts (He-scaled so activations stay O(1))."""
    rng = np.random.default_rng(0)

    def he(shape, fan_in):
        return (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "conv1/kernel": he((3, 3, 1, C1), 9), "conv1/bias": rng.normal(0, 0.1, C1).astype(np.float32),
        "conv2/kernel": he((3, 3, C1, C2), 9 * C1), "conv2/bias": rng.normal(0, 0.1, C2).astype(np.float32),
        "fc1/kernel": he((4 * 4 * C2, HIDDEN), 4 * 4 * C2), "fc1/bias": rng.normal(0, 0.1, HIDDEN).astype(np.float32),
        "fc2/kernel": he((HIDDEN, 10), HIDDEN), "fc2/bias": rng.normal(0, 0.1, 10).astype(np.float32),
    }


def keras_cnn():
    from pipeline.models.keras_adapter import import_tf

    _, keras = import_tf()
    L = keras.layers
    inp = keras.Input((8, 8, 1), name="input")
    h = L.Conv2D(C1, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.Conv2D(C2, 3, padding="same", activation="relu", name="conv2")(h)
    h = L.MaxPooling2D(2, name="pool")(h)
    h = L.Flatten(name="flatten")(h)
    h = L.Dense(HIDDEN, activation="relu", name="fc1")(h)
    model = keras.Model(inp, L.Dense(10, name="fc2")(h))
    w = keras_weights()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        model.get_layer(name).set_weights([w[f"{name}/kernel"], w[f"{name}/bias"]])
    return model


def torch_cnn():
    from collections import OrderedDict

    import torch
    import torch.nn as nn

    model = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, C1, 3, padding=1), act1=nn.ReLU(),
        conv2=nn.Conv2d(C1, C2, 3, padding=1), act2=nn.ReLU(),
        pool=nn.MaxPool2d(2), flatten=nn.Flatten(),
        fc1=nn.Linear(4 * 4 * C2, HIDDEN), act3=nn.ReLU(),
        fc2=nn.Linear(HIDDEN, 10),
    ))
    w = keras_weights()
    # Keras flattens (h, w, c); PyTorch flattens (c, h, w): permute fc1's input rows.
    fc1 = w["fc1/kernel"].reshape(4, 4, C2, HIDDEN).transpose(3, 2, 0, 1).reshape(HIDDEN, -1)
    state = {
        "conv1.weight": w["conv1/kernel"].transpose(3, 2, 0, 1), "conv1.bias": w["conv1/bias"],
        "conv2.weight": w["conv2/kernel"].transpose(3, 2, 0, 1), "conv2.bias": w["conv2/bias"],
        "fc1.weight": fc1, "fc1.bias": w["fc1/bias"],
        "fc2.weight": w["fc2/kernel"].T, "fc2.bias": w["fc2/bias"],
    }
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    return model.eval()


def nchw_data():
    from pipeline.examples.digits import calibration_data

    return calibration_data(image=True)


def nhwc_data():
    x, y = nchw_data()
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y


def _config(framework: str, workdir) -> object:
    factory, data = ("torch_cnn", "nchw_data") if framework == "torch" else ("keras_cnn", "nhwc_data")
    return parse_config({
        "name": f"cross-{framework}", "workdir": str(workdir),
        "model": {"framework": framework, "factory": f"{THIS}:{factory}"},
        "data": {"calibration": {"source": f"{THIS}:{data}"}, "eval": {"source": f"{THIS}:{data}"}},
    })


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    from pipeline.models import get_adapter

    work = tmp_path_factory.mktemp("cross")
    refs = {}
    for fw in ("torch", "keras"):
        refs[fw] = get_adapter(_config(fw, work / fw)).export_reference(work / fw)
    return refs, work


def _run(path, x) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_same_layer_names_in_both_frameworks(references):
    refs, _ = references
    assert refs["torch"].layer_table.names == refs["keras"].layer_table.names == ["conv1", "conv2", "fc1", "fc2"]
    for t, k in zip(refs["torch"].layer_table, refs["keras"].layer_table):
        assert t.params == k.params and t.kind == k.kind


def test_fp32_onnx_outputs_agree(references):
    refs, _ = references
    x_nchw, _ = nchw_data()
    x_nhwc, _ = nhwc_data()
    a, b = _run(refs["torch"].onnx_path, x_nchw), _run(refs["keras"].onnx_path, x_nhwc)
    assert a.shape == b.shape == (len(x_nchw), 10)
    assert np.abs(a).max() > 0.1  # a network that computes something
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


# ------------------------------------------------------------- quantized
# One quantization step of each format, relative to the largest output. The two graphs sum
# in different orders, so a value sitting on a rounding tie can round differently on each
# side; the difference stays within about one step of the coarsest format on the path.
STEP = {Format.FP32: 1e-5, Format.BF16: 2.0**-8, Format.FP8: 2.0**-3, Format.INT8: 1 / 127, Format.INT4: 1e-5}
# int4 is weight-only and both graphs hold bit-identical int4 weights: only fp32 round-off differs.
#
# Not fc1 in int4: PyTorch flattens (c, h, w) and Keras (h, w, c), so fc1's reduction axis is
# permuted between the two models and int4 blocks of 32 along it group different weights. The
# two quantized models then genuinely differ (that is block-wise quantization, not the
# quantizer); per-channel formats (int8, fp8, bf16) are blind to that permutation.

PLANS = {
    "int8-static": QuantPlan.uniform("int8"),
    "int8-dynamic": QuantPlan(layers={"*": "int8"}, int8_activations="dynamic"),
    "bf16": QuantPlan.uniform("bf16"),
    "fp8": QuantPlan.uniform("fp8"),
    "int4": QuantPlan(layers={"fc1": "fp32", "*": "int4"}, int4_block_size=32),
    "mixed": QuantPlan(layers={"conv1": "int8", "conv2": "fp8", "fc1": "bf16", "fc2": "int4"}),
}


def _quantize_both(references, label: str) -> dict[str, str]:
    from exporters import onnx_quant as quant

    refs, work = references
    plan = PLANS[label]
    cal = {"torch": nchw_data()[0][:128], "keras": nhwc_data()[0][:128]}
    paths = {}
    for fw, ref in refs.items():
        out_dir = work / f"{fw}-{label}"
        if not (out_dir / "candidate.onnx").exists():
            out_dir.mkdir(exist_ok=True)
            feeds = [{"input": cal[fw][i:i + 32]} for i in range(0, len(cal[fw]), 32)]
            quant.quantize_model(ref.onnx_path, ref.layer_table, plan.resolve(ref.layer_table.names), feeds,
                                 Calibration.MINMAX, out_dir / "candidate.onnx", workdir=out_dir)
        paths[fw] = str(out_dir / "candidate.onnx")
    return paths


def _compare(label: str, a: np.ndarray, b: np.ndarray, refs) -> None:
    plan = PLANS[label]
    scale = float(np.abs(a).max())
    coarsest = max(STEP[c.format] for c in plan.resolve(refs["torch"].layer_table.names).values())
    diff = np.abs(a - b)
    assert diff.max() <= 2 * coarsest * scale, f"{label}: max diff {diff.max():.4g} (output scale {scale:.3g})"
    assert np.mean(a.argmax(1) == b.argmax(1)) >= 0.99


@pytest.mark.parametrize("label", list(PLANS))
def test_same_plan_gives_the_same_quantized_outputs(references, label):
    """As deployed: each artifact through the ort-cpu backend (ORT's full graph optimizations)."""
    from pipeline.backends import get_backend

    refs, _ = references
    paths = _quantize_both(references, label)
    backend = get_backend("ort-cpu")
    x = {"torch": nchw_data()[0][128:], "keras": nhwc_data()[0][128:]}
    outs = {fw: backend.open(paths[fw], threads=1).run({"input": x[fw]})[0] for fw in paths}
    _compare(label, outs["torch"], outs["keras"], refs)
