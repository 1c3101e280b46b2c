"""benchmarks/gpu_check.py: on a machine without a GPU it must end cleanly and say what it skipped
and why; its TF32 switch must use torch's current API and put the previous state back."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", mod)  # dataclasses look their module up while being defined
    spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def test_tf32_switch_sets_and_restores_with_the_new_api():
    import torch

    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} predates fp32_precision")
    before = matmul.fp32_precision
    set_tf32, restore = _module().tf32_switch(torch)
    try:
        set_tf32(True)
        assert matmul.fp32_precision == "tf32"
        set_tf32(False)
        assert matmul.fp32_precision == "ieee"
        assert matmul.allow_tf32 is False  # "ieee" through the new API leaves the legacy flag readable
    finally:
        restore()
    assert matmul.fp32_precision == before


def test_without_a_gpu_every_part_is_skipped_with_a_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the GPU-machine run is `make gpu-check`")
    out = tmp_path / "gpu-check.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["digits"] == [] and result["gemm"] == []  # nothing measured, so nothing printed as measured
    skipped = dict((what, why) for what, why in result["skipped"])
    for name in ("tensorrt", "ort-trt", "ort-cuda"):
        assert skipped[f"(a) {name}"], f"(a) {name} skipped without a reason"
    assert "sees no CUDA GPU" in skipped["(b) GEMM benchmark"]
    assert "Skipped:" in run.stdout and "NVML unavailable" in run.stdout


def test_gemm_size_is_checked_against_the_kernels_constraints():
    run = subprocess.run([sys.executable, str(SCRIPT), "--gemm-n", "100"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 2 and "--gemm-n must be a multiple of 16" in run.stderr
