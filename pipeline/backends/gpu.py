"""GPU facts and probes shared by the GPU backends (ORT CUDA EP, ORT TensorRT EP, native TensorRT).

The plugins themselves live in :mod:`pipeline.backends.ort.cuda` and
:mod:`pipeline.backends.tensorrt.plugin`; this module holds the GPU itself (name, sm,
FP8 capability), the ORT provider probes and :class:`GpuBackend`, their shared base.
Imported whenever the registry lists its plugins, so this module imports nothing heavy
and nothing GPU-only at import time: ``onnxruntime``, ``tensorrt`` and
``torch`` are imported inside the methods that need them. Without the GPU
packages every backend here reports ``available() == (False, reason + install
command)``, ``get_backend(name)`` raises that message, and ``auto`` moves on to
``ort-cpu`` and says what it skipped.

Packages: ``pip install -e '.[gpu]'`` (onnxruntime-gpu, nvidia-ml-py, tensorrt).
onnxruntime-gpu installs the same ``onnxruntime`` module as the CPU wheel (a base
dependency), so it must be installed last: see :data:`ORT_GPU_INSTALL`.

Honesty rules implemented here:
- ONNX Runtime silently falls back to the CPU when a GPU provider cannot load
  (missing CUDA/cuDNN/TensorRT libraries). Every ORT GPU session checks which
  providers it actually got and refuses to measure a CPU run under a GPU name.
- TF32 is disabled for fp32 work (``use_tf32=0`` on the CUDA EP, the TF32 flag
  cleared in the native TensorRT build), so a layer reported fp32 computes in
  fp32. The TensorRT EP exposes no TF32 switch: its fp32 layers may use TF32.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.backends.base import Backend, BackendUnavailable

log = logging.getLogger(__name__)

GPU_EXTRA = "pip install -e '.[gpu]'"
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module and the CPU wheel is a base
# dependency, so the GPU wheel has to be (re)installed last, over it.
ORT_GPU_INSTALL = "pip install -e '.[gpu]' && pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1"


# --------------------------------------------------------------------------------------
# The GPU itself, through the CUDA driver API (libcuda ships with the driver: no Python deps)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    sm: tuple[int, int]

    @property
    def fp8_capable(self) -> bool:
        """FP8 tensor cores: Ada (sm 8.9) and Hopper (sm 9.0) and newer."""
        return self.sm >= (8, 9)

    @property
    def bf16_capable(self) -> bool:
        return self.sm >= (8, 0)


# Queried in a child process: a process that has called cuInit cannot use CUDA in children it
# forks afterwards, and asking "is there a GPU?" must not change what the caller can do later.
_CUDA_PROBE = r"""
import ctypes, json, sys
index = int(sys.argv[1])
try:
    lib = ctypes.CDLL("libcuda.so.1")
except OSError:
    print(json.dumps({"why": "no NVIDIA driver here (libcuda.so.1 not found)"})); sys.exit()
rc = lib.cuInit(0)
if rc != 0:
    print(json.dumps({"why": f"the NVIDIA driver is present but cuInit failed (CUresult {rc}): no usable GPU"})); sys.exit()
count = ctypes.c_int(0)
lib.cuDeviceGetCount(ctypes.byref(count))
if index >= count.value:
    print(json.dumps({"why": f"no CUDA device {index} ({count.value} visible)"})); sys.exit()
dev = ctypes.c_int(0)
lib.cuDeviceGet(ctypes.byref(dev), index)
name = ctypes.create_string_buffer(256)
lib.cuDeviceGetName(name, 256, dev)
major, minor = ctypes.c_int(0), ctypes.c_int(0)
lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
print(json.dumps({"name": name.value.decode(errors="replace"), "sm": [major.value, minor.value]}))
"""


def _query_nvml(index: int) -> dict | None:
    """Name and compute capability through NVML (no CUDA context), when nvidia-ml-py works."""
    try:
        import pynvml

        from pipeline.energy.nvml import _handle_for_cuda_device, _text
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: let the CUDA probe give the reason
        return None
    try:
        handle, _ = _handle_for_cuda_device(pynvml, index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return {"name": _text(pynvml.nvmlDeviceGetName(handle)), "sm": [major, minor]}
    except Exception as exc:  # noqa: BLE001
        return {"why": f"NVML: {exc}"}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


@lru_cache(maxsize=8)
def _query_gpu(index: int) -> dict:
    found = _query_nvml(index)
    if found is not None and "name" in found:
        return found
    import json
    import subprocess

    try:
        out = subprocess.run([sys.executable, "-c", _CUDA_PROBE, str(index)], capture_output=True, text=True,
                             timeout=60)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001
        return {"why": f"could not query the CUDA driver: {type(exc).__name__}: {exc}"}


def gpu_info(index: int = 0) -> GpuInfo | None:
    """Name and compute capability of CUDA device ``index``, or None without a GPU."""
    found = _query_gpu(index)
    if "name" not in found:
        return None
    return GpuInfo(index, found["name"], (int(found["sm"][0]), int(found["sm"][1])))


def gpu_status(index: int = 0) -> tuple[bool, str]:
    found = _query_gpu(index)
    return ("name" in found), found.get("why", "")


# --------------------------------------------------------------------------------------
# ONNX Runtime GPU providers
# --------------------------------------------------------------------------------------
def _preload_ort_dlls() -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN from the nvidia-* wheels or torch (ORT >= 1.21)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - best effort; the probe session tells the truth
            log.debug("onnxruntime.preload_dlls failed: %s", exc)


def _tensorrt_lib_dirs() -> list[Path]:
    dirs = []
    for entry in sys.path:
        p = Path(entry)
        if p.is_dir():
            dirs.extend(d for d in p.glob("tensorrt*") if d.is_dir())
    return dirs


@lru_cache(maxsize=1)
def _preload_tensorrt_for_ort() -> tuple[bool, str]:
    """Load the TensorRT libraries ORT's TensorRT EP was linked against (RTLD_GLOBAL).

    The EP is a separate shared library that dlopens ``libnvinfer.so.N`` by soname;
    pip-installed TensorRT lives in site-packages, off the loader path. Loading it
    here first makes the soname resolve. The major version N is read from the EP
    library itself, so a TensorRT of another major version is reported, not guessed.
    """
    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    ep_lib = capi / "libonnxruntime_providers_tensorrt.so"
    if not ep_lib.exists():
        return False, f"this onnxruntime build has no TensorRT EP library ({ep_lib.name} missing)"
    with open(ep_lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        majors = sorted(set(re.findall(rb"libnvinfer\.so\.(\d+)", mm)))
    if not majors:
        return True, ""  # linked some other way; let the probe session decide
    major = majors[0].decode()
    wanted = [f"libnvinfer.so.{major}", f"libnvinfer_plugin.so.{major}", f"libnvonnxparser.so.{major}"]
    loaded = []
    for soname in wanted:
        try:
            ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL)
            loaded.append(soname)
            continue
        except OSError:
            pass
        for d in _tensorrt_lib_dirs():
            cand = d / soname
            if cand.exists():
                try:
                    ctypes.CDLL(str(cand), mode=ctypes.RTLD_GLOBAL)
                    loaded.append(soname)
                    break
                except OSError:
                    continue
    if f"libnvinfer.so.{major}" in loaded:
        return True, ""
    installed = ""
    try:
        from importlib.metadata import version

        installed = f"; installed tensorrt is {version('tensorrt')}"
    except Exception:  # noqa: BLE001
        pass
    return False, (
        f"onnxruntime {ort.__version__}'s TensorRT EP needs libnvinfer.so.{major} (TensorRT {major}.x), "
        f"which cannot be loaded{installed}. Install TensorRT {major}.x for it "
        f"(e.g. pip install 'tensorrt-cu12=={major}.*' in a separate environment) or use the native "
        f"backend `tensorrt`"
    )


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _prepare_ort_process(provider: str) -> None:
    """Make the provider's libraries loadable in this process (before a session is created)."""
    _preload_ort_dlls()
    if provider == "TensorrtExecutionProvider":
        ok, why = _preload_tensorrt_for_ort()
        if not ok:
            raise BackendUnavailable(why)


def _probe_in_process(provider: str) -> tuple[bool, str]:
    """Create a one-node session on ``provider`` here and check ORT really used it."""
    import onnxruntime as ort

    try:
        _prepare_ort_process(provider)
    except BackendUnavailable as exc:
        return False, str(exc)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(_probe_model(), sess_options=opts, providers=[provider, "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure means the provider is unusable here
        return False, f"{provider} failed to start: {type(exc).__name__}: {exc}"
    if sess.get_providers()[0] != provider:
        return False, (
            f"onnxruntime could not load {provider} (it fell back to {sess.get_providers()}); "
            "usually missing CUDA/cuDNN libraries: see https://onnxruntime.ai/docs/execution-providers/"
        )
    return True, ""


@lru_cache(maxsize=4)
def _ort_provider_status(provider: str) -> tuple[bool, str]:
    """Whether ``provider`` works here. The session probe runs in a child process so that
    asking does not initialise CUDA in the caller (a process that has cannot fork CUDA users)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False, f"onnxruntime is not installed: {ORT_GPU_INSTALL}"
    have = ort.get_available_providers()
    if provider not in have:
        return False, (
            f"onnxruntime {ort.__version__} is a build without {provider} (it has {', '.join(have)}); "
            f"install the GPU build: {ORT_GPU_INSTALL}"
        )
    ok, why = gpu_status(0)
    if not ok:
        return False, why
    return _probe_in_child(provider)


def _probe_in_child(provider: str) -> tuple[bool, str]:
    import json
    import subprocess

    code = ("import json, sys; from pipeline.backends.gpu import _probe_in_process as p; "
            "print(json.dumps(p(sys.argv[1])))")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    try:
        out = subprocess.run([sys.executable, "-c", code, provider], capture_output=True, text=True, timeout=300,
                             env=env)
    except subprocess.TimeoutExpired:
        return False, f"probing {provider} timed out after 300 s"
    try:
        ok, why = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = " ".join(out.stderr.strip().splitlines()[-3:])
        return False, f"probing {provider} crashed (exit code {out.returncode}): {tail}"
    return bool(ok), str(why)


class GpuBackend(Backend):
    needs_gpu = True
    install_hint = GPU_EXTRA
    device_id = 0

    def device(self) -> str:
        info = gpu_info(self.device_id)
        if info is None:
            return "no GPU"
        return f"{info.name} (GPU {info.index}, sm {info.sm[0]}.{info.sm[1]})"

    def fp8_capable(self) -> bool:
        info = gpu_info(self.device_id)
        return bool(info and info.fp8_capable)

