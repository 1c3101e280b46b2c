"""KerasAdapter: FP32 ONNX export, layer table, cache, and the errors users see.

Needs the [keras] extra; skipped without TensorFlow. The digits CNN is trained
once per machine (cached .keras file) and exported once per module.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.keras
pytest.importorskip("tensorflow", reason="TensorFlow is not installed: pip install -e '.[keras]'")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from pipeline.config import ConfigError, load_config, parse_config  # noqa: E402
from pipeline.models.keras_adapter import KerasAdapter, import_tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
PRESET = ROOT / "search_spaces" / "digits_keras_cnn.yaml"
THIS = "tests.pipeline.models.test_keras_adapter"


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("keras-work")
    cfg = load_config(PRESET, overrides={"workdir": str(workdir)})
    adapter = KerasAdapter(cfg)
    ref = adapter.export_reference(workdir)
    return cfg, adapter, ref, workdir


def _kernel_as_onnx(layer_type: str, kernel: np.ndarray) -> np.ndarray:
    """Where tf2onnx puts a Keras kernel: Conv2D HWIO -> OIHW, Dense [in, out] unchanged."""
    if layer_type == "Conv2D":
        return kernel.transpose(3, 2, 0, 1)
    return kernel


def test_layer_table_maps_each_keras_layer_to_one_node_and_weight(digits):
    cfg, adapter, ref, _ = digits
    model = adapter.load_model()
    _, keras = import_tf()
    expected = [l for l in model.layers if isinstance(l, (keras.layers.Dense, keras.layers.Conv2D))]
    assert ref.layer_table.names == [l.name for l in expected]
    graph = onnx.load(ref.onnx_path).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    for row, layer in zip(ref.layer_table, expected):
        node = nodes[row.onnx_node]
        # a Dense on a 2-D input is one Gemm holding its bias (fold_dense_bias), like torch's nn.Linear
        assert node.op_type == row.onnx_op == ("Conv" if isinstance(layer, keras.layers.Conv2D) else "Gemm")
        assert row.weight in node.input
        assert len(node.input) == 3, f"{row.name}: the bias is an input of the node"
        np.testing.assert_array_equal(inits[node.input[2]], layer.bias.numpy())
        consumers = [n.name for n in graph.node if row.weight in n.input]
        assert consumers == [row.onnx_node], f"{row.name}: weight must feed exactly its own node"
        want = _kernel_as_onnx(type(layer).__name__, layer.kernel.numpy())
        np.testing.assert_array_equal(inits[row.weight], want)
        assert row.weight_shape == want.shape and row.params == want.size
        # named by the Keras layer
        assert row.onnx_node == layer.name and row.weight == f"{layer.name}/kernel"
    assert len({r.onnx_node for r in ref.layer_table}) == len(ref.layer_table)
    assert not [n.name for n in graph.node if n.op_type in ("MatMul", "Add")], "no Dense left as MatMul + Add"


def test_dense_bias_fold_only_takes_the_exact_pattern():
    """fold_dense_bias folds MatMul(2-D x, [K, N] weight) + Add([N] bias) and nothing else."""
    from onnx import TensorProto, helper

    from pipeline.models.keras_adapter import fold_dense_bias

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b")
    b2 = numpy_helper.from_array(rng.normal(size=(2, 3)).astype(np.float32), "b2")  # not a per-column bias

    def model(x_shape, bias, extra_reader=False):
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                 helper.make_node("Add", ["y", bias.name], ["z"], name="add")]
        outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, x_shape[:-1] + [3])]
        if extra_reader:
            nodes.append(helper.make_node("Relu", ["y"], ["r"], name="relu"))
            outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, x_shape[:-1] + [3]))
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], outputs,
                              [w, bias])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])

    x = rng.normal(size=(2, 4)).astype(np.float32)
    m = model(["n", 4], b)
    want = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert fold_dense_bias(m) == 1
    assert [(n.op_type, n.name, list(n.input), list(n.output)) for n in m.graph.node] == [("Gemm", "mm", ["x", "w", "b"], ["z"])]
    onnx.checker.check_model(m)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert fold_dense_bias(model(["n", 5, 4], b)) == 0  # 3-D input: Gemm is 2-D only
    assert fold_dense_bias(model(["n", 4], b2)) == 0  # [M, N] bias
    assert fold_dense_bias(model(["n", 4], b, extra_reader=True)) == 0  # MatMul output read twice


def test_reference_onnx_matches_keras_and_is_at_the_configured_opset(digits):
    cfg, adapter, ref, _ = digits
    model = adapter.load_model()
    from pipeline.examples.keras_digits import evaluation

    x, y = evaluation()
    sess = _session(ref.onnx_path)
    assert [i.name for i in sess.get_inputs()] == ref.input_names == ["input"]
    assert [o.name for o in sess.get_outputs()] == ref.output_names == ["output"]
    got = sess.run(None, {"input": x})[0]
    want = np.asarray(model(x, training=False))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # dynamic batch: one row and an odd batch give the same rows
    np.testing.assert_allclose(sess.run(None, {"input": x[:1]})[0], got[:1], rtol=1e-5, atol=1e-5)
    m = onnx.load(ref.onnx_path)
    opset = {o.domain: o.version for o in m.opset_import}[""]
    assert opset == cfg.model.opset
    assert m.ir_version >= onnx.helper.find_min_ir_version_for(list(m.opset_import), ignore_unknown=True)
    assert (got.argmax(1) == y).mean() > 0.9  # the bundled example is actually trained


def test_reference_is_cached_by_content_hash(digits):
    cfg, adapter, ref, workdir = digits
    folder = Path(ref.onnx_path).parent
    assert folder.parent == Path(workdir) / "reference" and folder.name == ref.content_hash
    from pipeline.layers import LayerTable

    assert LayerTable.load(folder / "layers.json") == ref.layer_table
    mtime = os.path.getmtime(ref.onnx_path)
    again = KerasAdapter(cfg).export_reference(workdir)
    assert again == ref and os.path.getmtime(ref.onnx_path) == mtime
    # other weights -> another hash
    model = adapter.load_model()
    w = model.get_layer("fc2").kernel
    w.assign(w.numpy() * 0.5)
    assert adapter.content_hash(model) != ref.content_hash


def test_export_model_maps_identically(digits, tmp_path):
    cfg, adapter, ref, _ = digits
    model = adapter.load_model()
    out = adapter.export_model(model, tmp_path / "again.onnx")
    assert out.layer_table == ref.layer_table
    assert out.content_hash == "" and Path(out.onnx_path).exists()


# ---------------------------------------------------------------- other layer types
def multi_model():
    """Conv1D, Dense on a sequence, EinsumDense, attention, a shared Dense and two named inputs."""
    _, keras = import_tf()
    L = keras.layers
    keras.utils.set_random_seed(1)
    seq = keras.Input((6, 4), name="seq")
    feat = keras.Input((5,), name="feat")
    h = L.Conv1D(8, 3, padding="same", activation="relu", name="c1d")(seq)
    h = L.Dense(7, name="d3", bias_initializer="ones")(h)
    h = L.EinsumDense("abc,cd->abd", output_shape=(None, 9), bias_axes="d", name="ed")(h)
    h = L.MultiHeadAttention(num_heads=3, key_dim=4, name="mha")(h, h)  # four EinsumDense inside
    h = L.GlobalAveragePooling1D(name="gap")(h)
    shared = L.Dense(9, name="shared", activation="tanh")
    g = shared(shared(L.Dense(9, name="fb")(feat)))
    return keras.Model({"seq": seq, "feat": feat}, L.Dense(3, name="head")(L.Add()([h, g])))


def multi_data():
    rng = np.random.default_rng(0)
    return {"seq": rng.normal(size=(16, 6, 4)).astype(np.float32),
            "feat": rng.normal(size=(16, 5)).astype(np.float32)}, rng.integers(0, 3, 16)


def not_a_model():
    return object()


def _cfg(tmp_path, **model):
    return parse_config({
        "name": "keras-test", "workdir": str(tmp_path),
        "model": {"framework": "keras", **model},
        "data": {"calibration": {"source": f"{THIS}:multi_data"}, "eval": {"source": f"{THIS}:multi_data"}},
        "metric": {"name": "accuracy"},
    })


def test_conv1d_einsum_shared_and_named_inputs(tmp_path):
    cfg = _cfg(tmp_path, factory=f"{THIS}:multi_model")
    ref = KerasAdapter(cfg).export_reference(tmp_path)
    table = {l.name: l for l in ref.layer_table}
    assert set(table) == {"c1d", "d3", "ed", "fb", "shared", "shared#2", "head",
                          "query", "key", "value", "attention_output"}  # MultiHeadAttention's own layers
    assert table["c1d"].onnx_op == "Conv" and table["c1d"].weight_shape == (8, 4, 1, 3)
    assert table["ed"].module_type == "EinsumDense" and table["ed"].onnx_op in ("MatMul", "Einsum")
    # Dense on a sequence (3-D) stays MatMul (+ Add): Gemm is 2-D only. (fb/shared/head have all-zero
    # biases, which tf2onnx drops: a bare MatMul, nothing to fold; the digits test covers the fold.)
    assert table["d3"].onnx_op == "MatMul"
    # the shared layer's two calls are two rows, each owning a copy of the weight
    assert table["shared"].weight != table["shared#2"].weight
    graph = onnx.load(ref.onnx_path).graph
    for row in ref.layer_table:
        assert [n.name for n in graph.node if row.weight in n.input] == [row.onnx_node]
    # a sequence Dense does 7*8 MACs at each of 6 positions
    assert table["d3"].macs == 8 * 7 * 6
    inputs, _ = multi_data()
    sess = _session(ref.onnx_path)
    assert sorted(i.name for i in sess.get_inputs()) == ["feat", "seq"]
    model = KerasAdapter(cfg).load_model()
    want = np.asarray(model(inputs, training=False))
    np.testing.assert_allclose(sess.run(None, inputs)[0], want, rtol=1e-4, atol=1e-5)


def two_heads():
    """A functional model returning a dict of two heads (named like the keys, in unsorted order)."""
    _, keras = import_tf()
    L = keras.layers
    keras.utils.set_random_seed(2)
    feat = keras.Input((5,), name="feat")
    h = L.Dense(8, activation="relu", name="trunk")(feat)
    return keras.Model(feat, {"parity": L.Dense(2, name="parity")(h), "digit": L.Dense(10, name="digit")(h)})


def feat_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 5)).astype(np.float32)


def test_a_model_returning_a_dict_names_its_outputs_by_key(tmp_path):
    """metric.output can name a head ("parity") as with a PyTorch model returning a dict (not output_1)."""
    cfg = parse_config({"name": "keras-heads", "workdir": str(tmp_path),
                        "model": {"framework": "keras", "factory": f"{THIS}:two_heads"},
                        "data": {"calibration": {"source": f"{THIS}:feat_data"}, "eval": {"source": f"{THIS}:feat_data"}},
                        "metric": {"name": "mse", "output": "parity"}})
    ref = KerasAdapter(cfg).export_reference(tmp_path)
    assert ref.output_names == ["digit", "parity"]
    x = feat_data()
    want = KerasAdapter(cfg).load_model()(x, training=False)
    sess = _session(ref.onnx_path)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))  # one array: "input"
    for name in ("digit", "parity"):  # each ONNX output holds the head of its name
        np.testing.assert_allclose(got[name], np.asarray(want[name]), rtol=1e-4, atol=1e-5)


def test_saved_keras_file_loads_via_model_path(tmp_path):
    model = multi_model()
    model(multi_data()[0])
    path = tmp_path / "m.keras"
    model.save(path)
    ref = KerasAdapter(_cfg(tmp_path, path=str(path))).export_reference(tmp_path / "w")
    assert "shared#2" in ref.layer_table.names


def test_unused_built_layer_is_refused(tmp_path):
    _, keras = import_tf()

    class WithSpare(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.Dense(3, name="used")
            self.spare = keras.layers.Dense(3, name="spare")
            self.spare.build((None, 5))

        def call(self, inputs):
            return self.used(inputs["feat"]) + keras.ops.mean(inputs["seq"])

    cfg = _cfg(tmp_path, factory=f"{THIS}:multi_model")
    adapter = KerasAdapter(cfg)
    with pytest.raises(RuntimeError, match="spare"):
        adapter.export_model(WithSpare(), tmp_path / "x.onnx")


def test_bad_model_sources_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.factory.*not a keras\.Model"):
        KerasAdapter(_cfg(tmp_path, factory=f"{THIS}:not_a_model")).load_model()
    h5 = tmp_path / "m.h5"
    h5.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"model\.path.*\.keras"):
        KerasAdapter(_cfg(tmp_path, path=str(h5))).load_model()


def test_keras_layers_left_in_fp32_are_listed_with_their_parameters():
    from pipeline.models.keras_adapter import enumerate_unquantized

    _, keras = import_tf()
    inp = keras.Input((6, 4), name="x")
    h = keras.layers.LSTM(8, name="lstm")(inp)
    h = keras.layers.LayerNormalization(name="norm")(h)
    out = keras.layers.Dense(3, name="fc")(h)
    model = keras.Model(inp, out)
    got = {u.name: u for u in enumerate_unquantized(model, keras)}
    assert set(got) == {"lstm", "norm"}  # the Dense is quantizable, the Input holds nothing
    assert got["lstm"].params == model.get_layer("lstm").count_params() and "recurrent" in got["lstm"].reason
    assert got["norm"].params == 16 and "normalisation" in got["norm"].reason
