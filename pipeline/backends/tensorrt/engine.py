"""TensorRT engines built from a prepared QDQ ONNX, and the session that times them.

The ONNX half (bf16 promotion, parser checks, per-layer precisions) is
:mod:`exporters.tensorrt`; this half needs TensorRT and torch with CUDA (device
buffers, streams, CUDA-event timing), imported only inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from exporters.tensorrt import prepare_for_tensorrt
from pipeline.backends.base import Session

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "pip install -e '.[gpu]'  (TensorRT's wheels are on PyPI: tensorrt, tensorrt-cu12, tensorrt-cu13; "
    "they need an NVIDIA GPU and driver)"
)

class TensorRTUnavailable(RuntimeError):
    """TensorRT (or a CUDA-enabled torch) is missing; the message has the install command."""


class TensorRTBuildError(RuntimeError):
    """The graph cannot become an engine; the message says which node and what to change."""


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from None
    except OSError as exc:  # libnvinfer missing or wrong CUDA
        raise TensorRTUnavailable(f"TensorRT is installed but failed to load ({exc}): {INSTALL_HINT}") from None
    return trt


def _import_torch_cuda():
    try:
        import torch
    except ImportError:
        raise TensorRTUnavailable("torch is not installed: pip install torch==2.13.0 (CUDA build)") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            f"torch {torch.__version__} has no CUDA device; TensorRT sessions use torch CUDA tensors, streams "
            "and events: install the CUDA build of torch==2.13.0 on a machine with an NVIDIA GPU"
        )
    return torch


# --------------------------------------------------------------------------------------
# Engine build
# --------------------------------------------------------------------------------------
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass
class EngineArtifact:
    engine_path: str
    meta_path: str
    onnx_path: str
    prepared_onnx: str
    onnx_sha256: str
    tensorrt_version: str
    gpu: str
    shapes: dict[str, list[list[int]]]
    allow_tf32: bool
    builder_optimization_level: int
    build_seconds: float
    bf16_promoted: list[str] = field(default_factory=list)
    precisions: dict[str, str] = field(default_factory=dict)
    layer_info_path: str | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _gpu_name(device: int = 0) -> str:
    from pipeline.backends.gpu import gpu_info  # sideways, same layer

    info = gpu_info(device)
    return f"{info.name} sm{info.sm[0]}{info.sm[1]}" if info else "unknown GPU"


def engine_key(prepared_sha: str, shapes: Shapes, trt_version: str, gpu: str, allow_tf32: bool, level: int) -> str:
    blob = json.dumps([prepared_sha, {k: [list(s) for s in v] for k, v in sorted(shapes.items())},
                       trt_version, gpu, allow_tf32, level], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def network_flags(trt: Any) -> int:
    """``create_network`` flags for a strongly typed network on TensorRT 10 and 11.

    TensorRT 10: ``STRONGLY_TYPED`` must be asked for ("pass a value of
    1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED) to create_network()");
    ``EXPLICIT_BATCH`` is "[DEPRECATED] Ignored" and left out. TensorRT 11: "Strongly
    typed mode is always enabled. This flag is retained for API compatibility but is
    ignored" (kSTRONGLY_TYPED is now bit 0, and kEXPLICIT_BATCH is gone), so setting it
    by its own value is right on both; a build without the member gets 0.
    """
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(
    onnx_path: str | Path,
    shapes: Shapes,
    engine_path: str | Path | None = None,
    *,
    allow_tf32: bool = False,
    builder_optimization_level: int = 3,
    workspace_bytes: int | None = None,
    device: int = 0,
    reuse: bool = True,
) -> EngineArtifact:
    """Build (or reuse) a serialized engine for ``onnx_path`` with one optimisation profile.

    ``shapes`` gives (min, opt, max) per dynamic input. The engine is written to
    ``engine_path`` (default: next to the ONNX, named by a key of graph, shapes,
    TensorRT version, GPU and options) with a JSON sidecar recording all of
    them, the per-layer precisions and, where TensorRT provides it, the engine
    inspector's layer report (``*.layers.json``). An engine with the same key
    is reused rather than rebuilt.
    """
    trt = import_tensorrt()
    prepared = prepare_for_tensorrt(onnx_path)
    if prepared.problems:
        raise TensorRTBuildError(
            f"TensorRT cannot build {onnx_path} as quantized:\n  - " + "\n  - ".join(prepared.problems)
        )
    sha = _sha256(prepared.path)
    gpu = _gpu_name(device)
    key = engine_key(sha, shapes, trt.__version__, gpu, allow_tf32, builder_optimization_level)
    src = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else src.with_name(f"{src.name.removesuffix('.onnx')}.{key}.engine")
    meta_path = engine_path.with_suffix(".json")
    if reuse and engine_path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            meta.pop("key", None)
            return EngineArtifact(**meta)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(prepared.path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"TensorRT's ONNX parser rejected {prepared.path}:\n  - " + "\n  - ".join(errors))

    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    # BuilderFlag.TF32: "Allow (but not require) computations on tensors of type DataType::kFLOAT
    # to use TF32 ... Enabled by default." It is a compute mode, not a tensor type, so it is not
    # among the precision flags TensorRT 11 removed (FP16, BF16, INT8, FP8, INT4, FP4,
    # OBEY/PREFER_PRECISION_CONSTRAINTS; migration guide "Removed Python APIs"): clearing it is
    # what keeps an fp32 layer fp32 in a strongly typed engine.
    if hasattr(trt.BuilderFlag, "TF32"):
        if allow_tf32:
            config.set_flag(trt.BuilderFlag.TF32)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
    elif not allow_tf32:
        log.warning("this TensorRT has no BuilderFlag.TF32: fp32 layers may run in TF32")
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(builder_optimization_level)
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    profiled = False
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        dims = tuple(inp.shape)
        if inp.name in shapes:
            mn, opt, mx = shapes[inp.name]
            profile.set_shape(inp.name, tuple(mn), tuple(opt), tuple(mx))
            profiled = True
        elif any(d < 0 for d in dims):
            raise TensorRTBuildError(
                f"input {inp.name!r} has dynamic shape {dims}: give its (min, opt, max) in `shapes`"
            )
    # A network with only static inputs needs no profile; add_optimization_profile returns -1
    # for an invalid one (e.g. min > opt), which would otherwise surface as a bare build failure.
    if profiled and config.add_optimization_profile(profile) < 0:
        raise TensorRTBuildError(f"TensorRT rejected the optimisation profile {shapes} for {prepared.path}")

    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if blob is None:
        raise TensorRTBuildError(f"TensorRT could not build an engine from {prepared.path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(blob))

    layer_info_path = None
    try:
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        layer_info_path = str(engine_path.with_suffix(".layers.json"))
        Path(layer_info_path).write_text(info)
    except Exception as exc:  # noqa: BLE001 - the inspector report is a bonus, not a requirement
        log.info("TensorRT engine inspector unavailable: %s", exc)

    artifact = EngineArtifact(
        engine_path=str(engine_path), meta_path=str(meta_path), onnx_path=str(src),
        prepared_onnx=str(prepared.path), onnx_sha256=sha, tensorrt_version=trt.__version__, gpu=gpu,
        shapes={k: [list(s) for s in v] for k, v in shapes.items()}, allow_tf32=allow_tf32,
        builder_optimization_level=int(builder_optimization_level), build_seconds=build_s,
        bf16_promoted=prepared.bf16_promoted, precisions=prepared.precisions, layer_info_path=layer_info_path,
    )
    meta_path.write_text(json.dumps({**asdict(artifact), "key": key}, indent=2))
    return artifact


# --------------------------------------------------------------------------------------
# Running and timing
# --------------------------------------------------------------------------------------
def onnx_io(onnx_path: str | Path) -> tuple[dict[str, list[int | None]], list[str]]:
    """Graph inputs (name -> dims, None where dynamic) and output names."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        inputs[vi.name] = dims
    return inputs, [o.name for o in model.graph.output]


def profile_for(inputs: dict[str, list[int | None]], feeds: dict[str, np.ndarray], max_batch: int) -> Shapes:
    """One optimisation profile covering ``feeds``: a dynamic first (batch) dimension gets
    1..max(batch, max_batch); other dynamic dimensions are fixed at the fed size."""
    shapes: Shapes = {}
    for name, dims in inputs.items():
        if name not in feeds:
            raise ValueError(f"missing input {name!r} (inputs: {list(inputs)})")
        actual = tuple(int(d) for d in np.shape(feeds[name]))
        if len(actual) != len(dims):
            raise ValueError(f"input {name!r}: expected rank {len(dims)}, got shape {actual}")
        mn, mx = list(actual), list(actual)
        if dims and dims[0] is None:
            mn[0], mx[0] = 1, max(actual[0], max_batch)
        shapes[name] = (tuple(mn), actual, tuple(mx))
    return shapes


def _covers(shapes: Shapes, feeds: dict[str, np.ndarray]) -> bool:
    for name, (mn, _, mx) in shapes.items():
        s = np.shape(feeds[name])
        if len(s) != len(mn) or any(not (a <= b <= c) for a, b, c in zip(mn, s, mx)):
            return False
    return True


class _Engine:
    """A deserialized engine, its execution context and a stream."""

    def __init__(self, artifact: EngineArtifact, device: int):
        trt = import_tensorrt()
        torch = _import_torch_cuda()
        self.trt, self.torch, self.artifact = trt, torch, artifact
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(artifact.engine_path).read_bytes())
        if self.engine is None:
            raise TensorRTBuildError(f"could not deserialize {artifact.engine_path} (TensorRT/GPU mismatch?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._bound: dict[str, Any] = {}

    def _torch_dtype(self, name: str):
        t, trt = self.torch, self.trt
        dt = self.engine.get_tensor_dtype(name)
        table = {trt.DataType.FLOAT: t.float32, trt.DataType.HALF: t.float16, trt.DataType.INT8: t.int8,
                 trt.DataType.INT32: t.int32, trt.DataType.BOOL: t.bool}
        for attr, tdt in (("BF16", t.bfloat16), ("INT64", t.int64), ("UINT8", t.uint8)):
            if hasattr(trt.DataType, attr):
                table[getattr(trt.DataType, attr)] = tdt
        if dt not in table:
            raise TensorRTBuildError(f"I/O tensor {name!r} has type {dt}, which this session cannot bind")
        return table[dt]

    def bind(self, feeds: dict[str, np.ndarray]) -> None:
        """Copy inputs to the device, set shapes, allocate outputs, set all addresses."""
        torch = self.torch
        bound = {}
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                dtype = self._torch_dtype(name)
                host = torch.from_numpy(np.ascontiguousarray(feeds[name]))
                dev = host.to(device=self.device, dtype=dtype, non_blocking=False)
                if not self.context.set_input_shape(name, tuple(dev.shape)):
                    raise ValueError(f"input {name!r} shape {tuple(dev.shape)} is outside the engine's profile")
                self.context.set_tensor_address(name, dev.data_ptr())
                bound[name] = dev
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
                self.context.set_tensor_address(name, out.data_ptr())
                bound[name] = out
        self._bound = bound

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.artifact.engine_path}")

    def outputs_numpy(self, names: list[str]) -> list[np.ndarray]:
        self.stream.synchronize()
        result = []
        for n in names:
            t = self._bound[n]
            if t.dtype == self.torch.bfloat16:
                t = t.float()
            result.append(t.cpu().numpy())
        return result


class TrtSession(Session):
    """A :class:`pipeline.backends.base.Session` over TensorRT engines built from one ONNX file.

    The engine is built on the first ``run`` from the fed shapes (see
    :func:`profile_for`) and rebuilt only for feeds outside every profile built
    so far. ``run`` copies host inputs to the GPU and outputs back (like the ORT
    backends); :meth:`time_ms` times device execution alone with CUDA events,
    on inputs bound once.
    """

    def __init__(self, onnx_path: str | Path, device: int = 0, max_batch: int = 256, allow_tf32: bool = False,
                 builder_optimization_level: int = 3, shapes: Shapes | None = None):
        import_tensorrt()
        _import_torch_cuda()
        self.onnx_path = Path(onnx_path)
        self.device = device
        self.max_batch = max_batch
        self.allow_tf32 = allow_tf32
        self.builder_optimization_level = builder_optimization_level
        self._inputs, self.output_names = onnx_io(onnx_path)
        self.input_names = list(self._inputs)
        self._engines: list[tuple[Shapes, _Engine]] = []
        self.engine_path: str | None = None
        self.artifacts: list[EngineArtifact] = []
        if shapes:
            self._build(shapes)

    def _build(self, shapes: Shapes) -> _Engine:
        artifact = build_engine(self.onnx_path, shapes, allow_tf32=self.allow_tf32,
                                builder_optimization_level=self.builder_optimization_level, device=self.device)
        engine = _Engine(artifact, self.device)
        self._engines.append((shapes, engine))
        self.artifacts.append(artifact)
        self.engine_path = self.engine_path or artifact.engine_path
        return engine

    def _engine_for(self, feeds: dict[str, np.ndarray]) -> _Engine:
        for shapes, engine in self._engines:
            if _covers(shapes, feeds):
                return engine
        return self._build(profile_for(self._inputs, feeds, self.max_batch))

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        engine = self._engine_for(feeds)
        engine.bind(feeds)
        engine.enqueue()
        return engine.outputs_numpy(self.output_names)

    def synchronize(self) -> None:
        for _, engine in self._engines:
            engine.stream.synchronize()

    def time_ms(self, feeds: dict[str, np.ndarray], runs: int = 30, warmup: int = 5) -> np.ndarray:
        """Per-run device execution time (ms) from CUDA events around each enqueue."""
        torch = _import_torch_cuda()
        engine = self._engine_for(feeds)
        engine.bind(feeds)
        for _ in range(warmup):
            engine.enqueue()
        engine.stream.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
        for s, e in zip(starts, ends):
            s.record(engine.stream)
            engine.enqueue()
            e.record(engine.stream)
        engine.stream.synchronize()
        return np.array([s.elapsed_time(e) for s, e in zip(starts, ends)])

    def run_bound(self, feeds: dict[str, np.ndarray]):
        """A zero-copy batch runner for energy windows: binds ``feeds`` once and returns
        ``(run_batch, sync)`` that enqueue the engine and wait for it."""
        engine = self._engine_for(feeds)
        engine.bind(feeds)
        return engine.enqueue, engine.stream.synchronize
