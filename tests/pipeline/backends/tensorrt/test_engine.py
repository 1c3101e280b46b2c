"""pipeline.backends.tensorrt.engine: the engine build and the timed session (TensorRT and a CUDA torch),
plus what runs without them (optimisation profiles, network flags, the install message)."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest

from pipeline.backends.tensorrt.engine import TensorRTBuildError, TensorRTUnavailable, build_engine, profile_for
from tests.exporters.test_tensorrt import _static, _x, mlp


def test_profile_for_dynamic_batch_and_fixed_other_dims():
    feeds = {"ids": np.zeros((8, 64), np.int64), "x": np.zeros((8, 3), np.float32)}
    shapes = profile_for({"ids": [None, None], "x": [None, 3]}, feeds, max_batch=32)
    assert shapes["ids"] == ((1, 64), (8, 64), (32, 64))
    assert shapes["x"] == ((1, 3), (8, 3), (32, 3))
    with pytest.raises(ValueError, match="missing input 'y'"):
        profile_for({"y": [None, 2]}, feeds, 4)
    with pytest.raises(ValueError, match="expected rank 3"):
        profile_for({"x": [None, 3, 1]}, feeds, 4)


# ---------------------------------------------------------------- needs TensorRT
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here; this checks the error without it")
def test_build_without_tensorrt_says_how_to_install(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    with pytest.raises(TensorRTUnavailable, match=r"pip install -e '\.\[gpu\]'"):
        build_engine(path, {"x": ((1, 16), (4, 16), (8, 16))})


def _gpu_ready() -> tuple[bool, str]:
    if not HAS_TRT:
        return False, "TensorRT is not installed (pip install -e '.[gpu]')"
    from pipeline.backends.tensorrt.plugin import TensorRTBackend

    return TensorRTBackend().available()


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tmp_path):
    ok, why = _gpu_ready()
    if not ok:
        pytest.skip(why)
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType

    from pipeline.backends.tensorrt.engine import TrtSession

    m = _static(tmp_path, "int8trt", per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    path = tmp_path / "int8trt.onnx"
    onnx.save(m, path)
    x = _x(8)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sess = TrtSession(path)
    got = sess.run({"x": x})[0]
    assert sess.engine_path and (tmp_path / sess.engine_path).exists()
    np.testing.assert_allclose(got, ref, rtol=0.1, atol=0.1)
    times = sess.time_ms({"x": x}, runs=5, warmup=1)
    assert times.shape == (5,) and np.all(times > 0)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_refuses_dynamic_int8(tmp_path):
    ok, why = _gpu_ready()
    if not ok:
        pytest.skip(why)
    from onnxruntime.quantization import quantize_dynamic

    src, dst = tmp_path / "ref.onnx", tmp_path / "dyn.onnx"
    onnx.save(mlp(), src)
    quantize_dynamic(str(src), str(dst))
    with pytest.raises(TensorRTBuildError, match="MatMulInteger"):
        build_engine(dst, {"x": ((1, 16), (4, 16), (8, 16))})


def test_network_flags_ask_for_strong_typing_by_the_flags_own_value():
    """TensorRT 10 numbers STRONGLY_TYPED 1 (EXPLICIT_BATCH is 0); TensorRT 11 keeps only STRONGLY_TYPED, as 0."""
    from types import SimpleNamespace

    from pipeline.backends.tensorrt.engine import network_flags

    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1))
    trt11 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0))
    assert network_flags(trt10) == 0b10
    assert network_flags(trt11) == 0b01
    assert network_flags(SimpleNamespace()) == 0
