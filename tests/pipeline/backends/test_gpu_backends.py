"""GPU backends: registration, clear errors without their packages, the auto fallback,
the native/emulated table, and (on GPU machines only) real sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.backends import BackendUnavailable, available_backends, get_backend, resolve_backend
from pipeline.backends import native
from pipeline.backends.gpu import GpuInfo
from pipeline.backends.ort.cuda import OrtCudaBackend, OrtGpuSession, OrtTrtBackend
from pipeline.backends.tensorrt.plugin import TensorRTBackend
from pipeline.formats import Format

ROOT = Path(__file__).resolve().parents[3]
GPU_NAMES = ("ort-cuda", "ort-trt", "tensorrt")


def test_importing_gpu_module_imports_nothing_heavy():
    code = (
        "import sys, json, pipeline.backends.gpu, pipeline.backends.ort.cuda, pipeline.backends.tensorrt.plugin, pipeline.backends.registry as r; r.plugins(); "
        "print(json.dumps([m for m in ('onnxruntime', 'tensorrt', 'torch', 'pynvml') if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


def test_gpu_backends_are_registered_and_say_why_they_are_unavailable():
    status = available_backends()
    for name in GPU_NAMES:
        assert name in status
        ok, why = status[name]
        assert ok or why, f"{name}: unavailable without a reason"


@pytest.mark.parametrize("name", GPU_NAMES)
def test_requesting_an_unavailable_gpu_backend_is_a_clear_error(name):
    ok, why = available_backends()[name]
    if ok:
        pytest.skip(f"{name} is available here")
    with pytest.raises(BackendUnavailable) as err:
        get_backend(name)
    msg = str(err.value)
    assert f"backend {name!r} is not available here" in msg
    assert why in msg
    # The reason is actionable: an install command, or what is missing on this machine.
    assert any(s in msg for s in ("pip install", "pip uninstall", "NVIDIA driver", "GPU", "CUDA", "TensorRT"))


def test_without_onnxruntime_gpu_the_error_has_the_install_command():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    from pipeline.backends.gpu import ORT_GPU_INSTALL

    ok, why = OrtCudaBackend().available()
    assert not ok
    assert ORT_GPU_INSTALL in why and "pip install -e '.[gpu]'" in ORT_GPU_INSTALL
    ok, why = OrtTrtBackend().available()
    assert not ok and "pip install -e '.[gpu]'" in why


def test_without_tensorrt_the_error_has_the_install_command():
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    ok, why = TensorRTBackend().available()
    assert not ok and why == "the TensorRT Python package is not installed: pip install -e '.[gpu]'"


def test_auto_falls_back_to_ort_cpu_and_says_what_it_skipped():
    backend, note = resolve_backend("auto")
    status = available_backends()
    gpu_ok = [n for n in GPU_NAMES if status[n][0]]
    if gpu_ok:
        assert backend.name == gpu_ok[0]  # best available first: tensorrt, ort-trt, ort-cuda
        return
    assert backend.name == "ort-cpu"
    assert note.startswith("backend auto -> ort-cpu (skipped: ")
    for name in GPU_NAMES:
        assert f"{name}: {status[name][1]}" in note


def test_gpu_backends_describe_themselves_without_a_gpu():
    for cls in (OrtCudaBackend, OrtTrtBackend, TensorRTBackend):
        b = cls()
        assert b.needs_gpu and b.install_hint == "pip install -e '.[gpu]'"
        assert isinstance(b.device(), str) and b.device()
        assert b.execution(Format.FP32, native.FP32) == "native"


def test_fp8_capability_follows_compute_capability():
    assert GpuInfo(0, "NVIDIA H200", (9, 0)).fp8_capable
    assert GpuInfo(0, "NVIDIA L4", (8, 9)).fp8_capable
    assert not GpuInfo(0, "NVIDIA A100", (8, 0)).fp8_capable
    assert GpuInfo(0, "NVIDIA A100", (8, 0)).bf16_capable and not GpuInfo(0, "Tesla T4", (7, 5)).bf16_capable


def test_ort_gpu_session_refuses_a_silent_cpu_fallback(tmp_path):
    """ORT quietly runs on the CPU when a GPU provider cannot load; the session must refuse that."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(BackendUnavailable, match="refusing to measure a CPU run as ort-cuda"):
        OrtGpuSession(path, ["CPUExecutionProvider"], 1, "CUDAExecutionProvider", "ort-cuda")


def test_provider_probe_runs_in_a_child_process_and_reports_back():
    """The probe machinery itself, exercised with the provider every build has."""
    from pipeline.backends.gpu import _probe_in_child

    assert _probe_in_child("CPUExecutionProvider") == (True, "")
    ok, why = _probe_in_child("NoSuchExecutionProvider")
    assert not ok and "NoSuchExecutionProvider" in why


# ---------------------------------------------------------------- the native/emulated table
def test_table_cells():
    ex = native.execution
    # FP32 is native everywhere.
    for b in ("ort-cpu", "ort-cuda", "ort-trt", "tensorrt"):
        assert ex(b, Format.FP32, native.FP32) == "native"
    # FP8: native only on TensorRT with an FP8-capable GPU; emulated on CPU and the CUDA EP.
    assert ex("tensorrt", Format.FP8, native.QDQ_FP8, fp8_capable_gpu=True) == "native"
    assert ex("ort-trt", Format.FP8, native.QDQ_FP8, fp8_capable_gpu=True) == "native"
    assert ex("tensorrt", Format.FP8, native.QDQ_FP8, fp8_capable_gpu=False) == "emulated"
    assert ex("ort-cpu", Format.FP8, native.QDQ_FP8, fp8_capable_gpu=True) == "emulated"
    assert ex("ort-cuda", Format.FP8, native.QDQ_FP8, fp8_capable_gpu=True) == "emulated"
    # BF16 as Cast round-trips: emulated on ORT (CPU and CUDA), native on TensorRT (promoted to bf16 GEMMs).
    assert ex("ort-cpu", Format.BF16, native.CAST_BF16) == "emulated"
    assert ex("ort-cuda", Format.BF16, native.CAST_BF16) == "emulated"
    assert ex("tensorrt", Format.BF16, native.CAST_BF16) == "native"
    # INT8: static QDQ is native on ORT CPU and TensorRT, emulated (DQ + float GEMM) on the CUDA EP.
    assert ex("ort-cpu", Format.INT8, native.QDQ_INT8) == "native"
    assert ex("tensorrt", Format.INT8, native.QDQ_INT8) == "native"
    assert ex("ort-cuda", Format.INT8, native.QDQ_INT8) == "emulated"
    # INT4: MatMulNBits on ORT, blocked DQ on TensorRT.
    assert ex("ort-cpu", Format.INT4, native.MATMULNBITS_INT4) == "native"
    assert ex("ort-cpu", Format.INT4, native.QDQ_INT4) == "emulated"
    assert ex("tensorrt", Format.INT4, native.QDQ_INT4) == "native"


def test_table_marks_what_tensorrt_cannot_run():
    assert native.describe("tensorrt", native.DYNAMIC_INT8) == "unsupported"
    assert native.describe("tensorrt", native.MATMULNBITS_INT4) == "unsupported"
    assert native.describe("tensorrt", native.GATHER_INT8) == "unsupported"  # GatherBlockQuantized
    assert native.describe("tensorrt", native.QDQ_FP8, fp8_capable_gpu=False) == "unsupported"
    assert native.describe("tensorrt", native.QDQ_FP8, fp8_capable_gpu=True) == "native"
    assert not TensorRTBackend().supports(native.MATMULNBITS_INT4)
    assert TensorRTBackend().supports(native.QDQ_INT8)


def test_table_covers_every_realisation_and_backend():
    md = native.native_table_markdown()
    rows = md.splitlines()[2:]
    assert len(rows) == len(native.REALISATIONS)
    for realisation, fmt in native.REALISATIONS.items():
        row = next(r for r in rows if f"| {realisation} |" in r)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == fmt.value and len(cells) == 6
        assert all(c.startswith(("native", "emulated", "unsupported")) for c in cells[2:])
    assert "native on sm>=89 (Ada/Hopper), else emulated" in md  # ort-trt: the CUDA EP takes over
    assert "native on sm>=89 (Ada/Hopper), else unsupported" in md  # tensorrt: no FP8 kernels before Ada


# ---------------------------------------------------------------- GPU machines only
def _tiny(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [w])
    path = tmp_path / "tiny.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)
    return path, {"x": rng.standard_normal((4, 16)).astype(np.float32)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_backend_matches_ort_cpu(name, tmp_path):
    ok, why = available_backends()[name]
    if not ok:
        pytest.skip(f"{name} unavailable: {why}")
    path, feeds = _tiny(tmp_path)
    ref = get_backend("ort-cpu").open(path).run(feeds)[0]
    session = get_backend(name).open(path)
    got = session.run(feeds)[0]
    session.synchronize()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)  # TF32 is off: fp32 means fp32


@pytest.mark.gpu
def test_nvml_energy_on_gpu_work(tmp_path):
    from pipeline.config import EnergySpec
    from pipeline.energy import measure_energy, nvml_status, select_meter

    ok, why = available_backends()["ort-cuda"]
    if not ok:
        pytest.skip(f"ort-cuda unavailable: {why}")
    if not nvml_status()[0]:
        pytest.skip(f"NVML unavailable: {nvml_status()[1]}")
    backend = get_backend("ort-cuda")
    path, feeds = _tiny(tmp_path)
    session = backend.open(path)
    spec = EnergySpec(meter="nvml", min_seconds=1.0, repeats=2)
    r = measure_energy(select_meter(spec, backend), lambda: session.run(feeds), 4, spec, session.synchronize)
    assert r.source == "nvml" and r.average_power_w > 1.0 and r.idle_power_w is not None


def test_readme_shows_the_current_native_table():
    """The README's table is the code's table (regenerate it from native_table_markdown() when this fails)."""
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- native-table:start")
    block = readme[readme.index("\n", start) + 1: readme.index("<!-- native-table:end")]
    assert block.strip() == native.native_table_markdown().strip()


def _ort_bool(value: str) -> bool:
    """ORT's provider-option boolean rule (core/common/parse_string.h): exactly these six spellings."""
    table = {"0": False, "False": False, "false": False, "1": True, "True": True, "true": True}
    assert value in table, f"ORT would reject {value!r} as a boolean provider option"
    return table[value]


def test_ort_trt_options_keep_the_network_strongly_typed(tmp_path):
    """fp16/int8 switch the TensorRT EP to a weakly typed network (which TensorRT 11 no longer has):
    they must be off, explicitly; TF32 stays off on the CUDA EP fallback."""
    opts = OrtTrtBackend().provider_options(tmp_path)
    assert _ort_bool(opts["trt_fp16_enable"]) is False and _ort_bool(opts["trt_int8_enable"]) is False
    assert _ort_bool(opts["trt_engine_cache_enable"]) and _ort_bool(opts["trt_timing_cache_enable"])
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    assert 0 <= int(opts["trt_builder_optimization_level"]) <= 5
    assert all(isinstance(v, str) for v in opts.values())  # ORT takes provider options as strings
    assert _ort_bool(OrtCudaBackend().provider_options()["use_tf32"]) is False
