"""The Python API: ``layers``, ``quantize``, ``evaluate`` and ``search`` on models that live in memory.

A model in a notebook or a training script (a ``torch.nn.Module`` or a ``keras.Model``), data as
arrays (or callables returning them) and a metric as a built-in name or a callable go straight in;
no factory module or YAML file is needed. Exported lazily from :mod:`pipeline` (``pipeline.search``
etc.), so ``import pipeline`` stays light.

How it is wired (this module is the only place that knows): each call builds an ordinary
:class:`~pipeline.config.SearchConfig` whose model, data and metric are import strings naming
objects held here, ``pipeline.api:memory.<key>``. Everything downstream - the adapters, the
:class:`~pipeline.evaluation.evaluator.Evaluator`, :func:`~pipeline.tracking.search.run_search`, the Ray workers, the
MLflow record - runs exactly as for a YAML config. Keys are content hashes, so the same model and
data give the same config (a study resumes, the FP32 reference export is reused). During
:func:`search`, Ray workers do not see the driver's memory: the objects are put in the Ray object
store and a named actor hands workers their references, so a worker on another node gets the model
and arrays through Ray, never through the driver's files.

Data follows the config's data contract (``data.calibration``/``data.eval`` are model inputs,
``data.targets`` anything the metric reads), kept thin here so it follows that contract:
``calibration`` and ``eval_data`` are model inputs - one array for a single-input model, or a dict
input name -> array - or a callable returning them (or returning ``(inputs, targets)``);
``targets`` is what the metric compares the outputs with, any structure (labels, gold pair scores,
a dict of relevant ids). A callable ``metric`` receives ``(outputs: dict[name, array], targets,
**metric_kwargs)`` over the whole eval set and returns a float (set ``higher_is_better`` when
lower is better).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import ConfigError, SearchConfig, parse_config

log = logging.getLogger(__name__)

MEMORY_PREFIX = "pipeline.api:memory."
_ACTOR_NAME = "precision-search-api-objects"
DEFAULT_WORKDIR = ".precision-search"


# --------------------------------------------------------------------------- in-memory objects
@dataclass
class _ModelFactory:
    """A config ``model.factory`` returning a copy of an in-memory model (the caller's model is
    never put in eval mode nor fine-tuned by QAT)."""

    model: Any
    framework: str

    def __call__(self, **_: Any) -> Any:
        if self.framework == "keras":
            from pipeline.models.keras_adapter import _copy_model, import_tf

            return _copy_model(self.model, import_tf()[1])
        return copy.deepcopy(self.model)


@dataclass
class _Value:
    """A config ``data.*.source`` (model inputs) or ``data.targets.source`` (anything the metric
    reads): returns the object it holds."""

    value: Any

    def __call__(self, **_: Any) -> Any:
        return self.value


@dataclass
class _Metric:
    """A config ``metric.name`` for a callable metric."""

    fn: Callable[..., float]

    def __call__(self, outputs: Any, targets: Any, **kwargs: Any) -> float:
        return float(self.fn(outputs, targets, **kwargs))


_LOCAL: dict[str, Any] = {}  # key -> object, in this process
_RAY_REFS: dict[str, Any] = {}  # key -> ObjectRef the driver owns (kept alive while the study runs)
_RAY_INDEX: list[Any] = []  # the index actor's handle: a named actor dies with its last handle


class _Memory:
    """``pipeline.api:memory.<key>``: in-memory objects, looked up by attribute so the config's
    import strings resolve. In a Ray worker an unknown key is fetched from the object store."""

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        if key in _LOCAL:
            return _LOCAL[key]
        obj = _fetch_from_ray(key)
        if obj is not None:
            _LOCAL[key] = obj
            return obj
        raise AttributeError(f"no in-memory object {key!r} in this process (pipeline.api registers them in the "
                             "process that called it and, during pipeline.search, in the Ray object store)")


memory = _Memory()


def _register(kind: str, obj: Any, digest: str) -> str:
    key = f"{kind}_{digest}"
    _LOCAL[key] = obj
    return MEMORY_PREFIX + key


def _fetch_from_ray(key: str) -> Any:
    try:
        import ray

        if not ray.is_initialized():
            return None
        actor = ray.get_actor(_ACTOR_NAME)
    except (ImportError, ValueError):
        return None
    boxed = ray.get(actor.get.remote(key))
    return ray.get(boxed[0]) if boxed and boxed[0] is not None else None


def _publish_to_ray(keys: list[str]) -> None:
    """Put ``keys``' objects in the Ray object store, reachable by name from every worker."""
    import ray

    @ray.remote(num_cpus=0)
    class _ObjectIndex:
        def __init__(self):
            self.refs: dict[str, Any] = {}

        def put(self, key: str, boxed: list) -> None:  # boxed: a bare ObjectRef would be resolved
            self.refs[key] = boxed[0]

        def get(self, key: str) -> list:
            return [self.refs.get(key)]

    index = _ObjectIndex.options(name=_ACTOR_NAME, get_if_exists=True).remote()
    _RAY_INDEX[:] = [index]
    for key in keys:
        _RAY_REFS[key] = ray.put(_LOCAL[key])
        ray.get(index.put.remote(key, [_RAY_REFS[key]]))


# --------------------------------------------------------------------------- hashing and detection
def _framework(model: Any) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return "keras"
    raise ConfigError(f"model: expected a torch.nn.Module, a keras.Model or the path of an .onnx file, "
                      f"got {type(model).__name__}")


def _is_onnx(model: Any) -> bool:
    return isinstance(model, (str, Path)) and str(model).endswith(".onnx")


def _model_digest(model: Any, framework: str) -> str:
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    if framework == "torch":
        h.update(repr(model).encode())
        for k, v in model.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    else:
        for w in model.weights:
            h.update(w.path.encode())
            h.update(np.ascontiguousarray(w.numpy()).tobytes())
    return h.hexdigest()[:16]


def _data_digest(*parts: Any) -> str:
    """Content hash of inputs/targets: arrays by bytes, containers recursively, anything else by pickle."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            for v in x:
                feed(v)
        elif x is None or isinstance(x, (str, int, float, bool)):
            h.update(repr(x).encode())
        else:
            a = _as_array(x)
            if a.dtype == object:
                import cloudpickle

                h.update(cloudpickle.dumps(x))
                return
            a = np.ascontiguousarray(a)
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())

    for p in parts:
        feed(p)
    return h.hexdigest()[:16]


def _callable_digest(fn: Callable) -> str:
    try:
        import cloudpickle

        blob = cloudpickle.dumps(fn)
    except Exception:  # noqa: BLE001 - an unpicklable metric still runs in-process
        blob = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}".encode()
    name = re.sub(r"[^A-Za-z0-9_]", "_", getattr(fn, "__name__", "metric"))[:40]
    return f"{name}_{hashlib.sha256(blob).hexdigest()[:12]}"


# --------------------------------------------------------------------------- data (kept thin)
def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    elif hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # a TF tensor
        x = x.numpy()
    return np.asarray(x)


def _inputs(x: Any) -> Any:
    return {str(k): _as_array(v) for k, v in x.items()} if isinstance(x, dict) else _as_array(x)


def _split(data: Any, targets: Any, field: str) -> tuple[Any, Any]:
    """``(inputs, targets)`` from inputs (an array or a dict of arrays), ``(inputs, targets)``, or a
    callable returning either. Targets stay as given (any structure the metric reads: labels,
    gold pair scores, a dict of relevant ids); only tensors become arrays."""
    if callable(data) and not hasattr(data, "shape"):
        data = data()
    if isinstance(data, tuple) and len(data) == 2 and targets is None:
        data, targets = data
    if data is None:
        raise ConfigError(f"{field}: no data; give an array, a dict input name -> array, or a callable returning one")
    if callable(targets) and not hasattr(targets, "shape"):
        targets = targets()
    if hasattr(targets, "detach") or (hasattr(targets, "numpy") and not isinstance(targets, np.ndarray)):
        targets = _as_array(targets)
    return _inputs(data), targets


def _sample(inputs: Any) -> Any:
    return {k: v[:2] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:2]


# --------------------------------------------------------------------------- configs
def _plan(plan: Any):
    """A QuantPlan from a QuantPlan, a dict, a YAML path, or a format name (a uniform plan)."""
    from pipeline.formats import Format
    from pipeline.plan import QuantPlan

    if isinstance(plan, QuantPlan):
        return plan
    if isinstance(plan, dict):
        return QuantPlan.model_validate(plan)
    if isinstance(plan, (str, Path)):
        if str(plan) in {f.value for f in Format}:
            return QuantPlan.uniform(str(plan))
        return QuantPlan.from_yaml(plan)
    raise ConfigError(f"plan: expected a QuantPlan, a dict, a plan YAML path or a format name, got {type(plan).__name__}")


def _merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = _merge(dict(base.get(k) or {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _build_config(model: Any, calibration: tuple[Any, Any], eval_data: tuple[Any, Any], *, metric: Any,
                  higher_is_better: bool | None, metric_output: str | int, backend: str, batch_size: int,
                  workdir: str | Path | None, name: str | None, search: dict | None = None,
                  settings: dict | None = None) -> SearchConfig:
    """An ordinary SearchConfig naming the in-memory objects (see the module docstring)."""
    framework = _framework(model)
    model_ref = _register("model", _ModelFactory(model, framework), _model_digest(model, framework))
    calib_ref = _register("data", _Value(calibration[0]), _data_digest(calibration[0]))
    eval_ref = _register("data", _Value(eval_data[0]), _data_digest(eval_data[0]))
    sources: dict[str, Any] = {"calibration": {"source": calib_ref}, "eval": {"source": eval_ref}}
    if eval_data[1] is not None:
        sources["targets"] = {"source": _register("targets", _Value(eval_data[1]), _data_digest(eval_data[1]))}
    metric_spec: dict[str, Any] = {"output": metric_output}
    if callable(metric):
        metric_spec["name"] = _register("metric", _Metric(metric), _callable_digest(metric))
        metric_spec["higher_is_better"] = True if higher_is_better is None else higher_is_better
    else:
        metric_spec["name"] = str(metric)
        if higher_is_better is not None:
            metric_spec["higher_is_better"] = higher_is_better
    default_name = re.sub(r"[^A-Za-z0-9_.-]", "-", type(model).__name__.lower()) or "model"
    data: dict[str, Any] = {
        "name": name or f"api-{default_name}",
        "workdir": str(workdir or DEFAULT_WORKDIR),
        "model": {"framework": framework, "factory": model_ref},
        "data": sources,
        "metric": metric_spec,
        "measure": {"backend": backend, "batch_size": batch_size},
    }
    if search:
        data["search"] = search
    _merge(data, settings or {})
    return parse_config(data, source="pipeline.api", base_dir=Path.cwd())


def _memory_keys(cfg: SearchConfig) -> list[str]:
    refs = [cfg.model.factory, cfg.data.calibration.source, cfg.data.eval.source, cfg.metric.name,
            cfg.data.targets.source if cfg.data.targets else None]
    return [r.removeprefix(MEMORY_PREFIX) for r in refs if r and r.startswith(MEMORY_PREFIX)]


# --------------------------------------------------------------------------- the API
def layers(model_or_onnx: Any, sample_inputs: Any = None, *, calibration: Any = None,
           workdir: str | Path | None = None):
    """The layer table: one row per quantizable layer (what plans name), with the params share.

    ``model_or_onnx``: a ``torch.nn.Module``, a ``keras.Model`` or an ``.onnx`` path. A framework
    model is exported to its FP32 ONNX reference first, which needs the input signature: give
    ``sample_inputs`` (an array or a dict of arrays with a batch axis, or for torch input specs
    ``name -> (shape, dtype)``) or ``calibration`` data. Returns a :class:`~pipeline.layers.LayerTable`
    (``print(table.describe())`` for a readable listing).
    """
    from pipeline.layers import table_from_onnx

    if _is_onnx(model_or_onnx):
        import onnx

        return table_from_onnx(onnx.load(str(model_or_onnx)))
    if sample_inputs is None and calibration is None:
        raise ConfigError("sample_inputs: needed to export the model (or give calibration=...): an array with a "
                          "batch axis, a dict input name -> array, or {name: (shape, dtype)}")
    if sample_inputs is None:
        sample_inputs = _sample(_split(calibration, None, "calibration")[0])
    return _reference(model_or_onnx, sample_inputs, workdir).layer_table


def _reference(model: Any, sample_inputs: Any, workdir: str | Path | None):
    """Export ``model``'s FP32 reference from memory (the adapters' in-memory path)."""
    from pipeline.models.torch_adapter import normalise_sample

    framework = _framework(model)
    arrays = normalise_sample(_inputs(sample_inputs) if not _is_spec(sample_inputs) else sample_inputs,
                              "sample_inputs")
    cfg = _build_config(model, (arrays, None), (arrays, None), metric="accuracy", higher_is_better=None,
                        metric_output=0, backend="auto", batch_size=2, workdir=workdir, name=None)
    if framework == "torch":
        from pipeline.models.torch_adapter import TorchAdapter

        adapter = TorchAdapter(cfg, model=model, sample_inputs=arrays)
    else:
        from pipeline.models.keras_adapter import KerasAdapter

        adapter = KerasAdapter(cfg, model=model, sample_inputs=arrays)
    return adapter.export_reference(cfg.work_path)


def _is_spec(sample: Any) -> bool:
    """Input specs ``(shape, dtype)`` or ``{name: (shape, dtype)}`` rather than arrays."""
    values = sample.values() if isinstance(sample, dict) else [sample]
    return any(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], (tuple, list)) for v in values)


@dataclass
class Quantized:
    """A quantized artifact: where it is and what each layer became."""

    path: str
    layers: list  # LayerReport (framework models) or LayerQuantization (.onnx input) per layer
    calibration_used: str


def quantize(model_or_onnx: Any, plan: Any, calibration: Any = None, *, backend: str = "ort-cpu",
             out: str | Path | None = None, workdir: str | Path | None = None) -> Quantized:
    """Quantize a model (or an ``.onnx`` file) with ``plan`` for ``backend``; returns the artifact.

    ``plan``: a :class:`~pipeline.plan.QuantPlan`, a dict (``{"layers": {"fc1": "int4", "*": "int8"}}``),
    a plan YAML path, or a format name for a uniform plan (``"int8"``). ``calibration``: model inputs
    for the formats that calibrate activations (int8 static, fp8). ``out``: where to write it
    (default: under ``workdir``).
    """
    plan = _plan(plan)
    workdir = Path(workdir or DEFAULT_WORKDIR)
    if _is_onnx(model_or_onnx):
        return _quantize_onnx(Path(model_or_onnx), plan, calibration, backend, out, workdir)
    if calibration is None:
        raise ConfigError("calibration: needed to export and quantize a framework model (model inputs, a few "
                          "hundred rows; they also set the exported input signature)")
    calib = _split(calibration, None, "calibration")
    cfg = _build_config(model_or_onnx, calib, calib, metric="accuracy", higher_is_better=None, metric_output=0,
                        backend=backend, batch_size=32, workdir=workdir, name=None)
    from pipeline.evaluation.evaluator import Evaluator

    ev = Evaluator(cfg)
    plan.resolve(ev.reference.layer_table.names)
    out_dir = cfg.work_path / "quantize" / hashlib.sha256(plan.to_yaml().encode()).hexdigest()[:12]
    out_dir.mkdir(parents=True, exist_ok=True)
    path, reports, extra, _ = ev.quantize(plan, out_dir)
    return Quantized(_deliver(path, out), reports, str(extra.get("calibration_used", "")))


def _deliver(path: str | Path, out: str | Path | None) -> str:
    """Copy the artifact (and any external-data file beside it) to ``out``."""
    import shutil

    if out is None:
        return str(path)
    src, dst = Path(path), Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    for extra in src.parent.glob(src.name + ".*"):  # e.g. candidate.onnx.data
        shutil.copyfile(extra, dst.parent / (dst.name + extra.name[len(src.name):]))
    return str(dst)


def _quantize_onnx(path: Path, plan, calibration: Any, backend: str, out, workdir: Path) -> Quantized:
    import onnx

    from exporters.onnx_quant import quantize_model
    from pipeline.backends import resolve_backend
    from pipeline.data import Dataset, calibration_batches
    from pipeline.layers import table_from_onnx

    if not path.exists():
        raise ConfigError(f"model_or_onnx: {path} does not exist")
    model = onnx.load(str(path))
    table = table_from_onnx(model)
    folder = workdir / "onnx" / hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    reference = folder / "reference.onnx"
    onnx.save(model, str(reference))
    inits = {i.name for i in model.graph.initializer}
    input_names = [i.name for i in model.graph.input if i.name not in inits]
    feeds: list[dict[str, np.ndarray]] = []
    if calibration is not None:
        inputs, _ = _split(calibration, None, "calibration")
        if not isinstance(inputs, dict):
            if len(input_names) != 1:
                raise ConfigError(f"calibration: the model has inputs {input_names}; give a dict name -> array")
            inputs = {input_names[0]: inputs}
        inputs = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in inputs.items()}
        feeds = calibration_batches(Dataset(inputs, None), input_names)
    target, _ = resolve_backend(backend)
    out_path = Path(out) if out else folder / f"quantized-{hashlib.sha256(plan.to_yaml().encode()).hexdigest()[:12]}.onnx"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    q = quantize_model(reference, table, plan.resolve(table.names), feeds, plan.calibration, out_path, workdir=folder,
                       target=target.quant_target, uint8_activations=target.uint8_activations)
    return Quantized(q.path, q.layers, q.calibration_used)


def evaluate(model: Any, plan: Any, eval_data: Any, targets: Any = None, *, calibration: Any = None,
             metric: str | Callable = "accuracy", higher_is_better: bool | None = None, metric_output: str | int = 0,
             backend: str = "auto", batch_size: int = 32, energy: bool = False, workdir: str | Path | None = None,
             name: str | None = None, settings: dict | None = None):
    """Quantize ``model`` with ``plan`` and measure the artifact through its runtime -> ``TrialResult``.

    Accuracy comes from the exported artifact on ``backend`` (``auto``: the best available), next
    to the FP32 reference's on the same backend (``result.measurement``), with latency, size and
    (``energy=True``) energy. ``calibration`` defaults to the eval inputs (with a warning: calibrate
    on rows you do not score on). ``settings``: any other config fields, nested like the YAML
    (``{"measure": {"runs": 10}}``).
    """
    from pipeline.evaluation.evaluator import Evaluator

    plan = _plan(plan)
    ev_pair = _split(eval_data, targets, "eval_data")
    if ev_pair[1] is None:
        raise ConfigError("targets: the metric needs targets (give targets=..., or eval_data=(inputs, targets))")
    if calibration is None:
        log.warning("evaluate: no calibration data given; calibrating on the eval inputs")
        calib = (ev_pair[0], None)
    else:
        calib = _split(calibration, None, "calibration")
    cfg = _build_config(model, calib, ev_pair, metric=metric, higher_is_better=higher_is_better,
                        metric_output=metric_output, backend=backend, batch_size=batch_size, workdir=workdir,
                        name=name, settings=settings)
    ev = Evaluator(cfg)
    out_dir = cfg.work_path / "evaluate" / hashlib.sha256(plan.to_yaml().encode()).hexdigest()[:12]
    return ev.evaluate(plan, out_dir, energy=energy)


def search(model: Any, calibration: Any, eval_data: Any, targets: Any = None, *,
           metric: str | Callable = "accuracy", higher_is_better: bool | None = None, metric_output: str | int = 0,
           formats: list[str] | None = None, objectives: list[str] | None = None, trials: int = 20,
           max_accuracy_drop: float | None = 0.05, sampler: str = "tpe", seed: int = 0, backend: str = "auto",
           batch_size: int = 32, workdir: str | Path | None = None, tracking_uri: str | None = None,
           name: str | None = None, study: str | None = None, parallel: int | None = None,
           ray_address: str | None = None, energy: bool = True, progress: str = "off",
           settings: dict | None = None):
    """Search per-layer formats for ``model`` -> ``SearchSummary`` (``.front``: the Pareto front).

    The same study as ``precision-search search`` runs (Optuna sampler, Ray workers, MLflow record in
    ``tracking_uri``, default an SQLite file under ``workdir``); calling it again with the same
    model and data resumes the study up to ``trials`` finished trials. ``formats``/``objectives``
    default to the config defaults; ``settings`` sets any other config field (``{"search":
    {"methods": ["ptq", "qat"]}}``).
    """
    import ray

    from pipeline.search.ray_exec import ray_init
    from pipeline.search.runner import SearchOptions
    from pipeline.tracking.search import run_search

    ev_pair = _split(eval_data, targets, "eval_data")
    if ev_pair[1] is None:
        raise ConfigError("targets: the metric needs targets (give targets=..., or eval_data=(inputs, targets))")
    section: dict[str, Any] = {"trials": trials, "sampler": sampler, "seed": seed,
                               "max_accuracy_drop": max_accuracy_drop}
    if formats is not None:
        section["formats"] = list(formats)
    if objectives is not None:
        section["objectives"] = list(objectives)
    cfg = _build_config(model, _split(calibration, None, "calibration"), ev_pair, metric=metric,
                        higher_is_better=higher_is_better, metric_output=metric_output, backend=backend,
                        batch_size=batch_size, workdir=workdir, name=name, search=section, settings=settings)
    opts = SearchOptions(trials=trials, study=study, parallel=parallel, tracking_uri=tracking_uri,
                         ray_address=ray_address, progress=progress, energy=energy)
    started = ray_init(opts.ray_address, opts.verbose)  # here, not in run_search: the objects must be in Ray first
    try:
        _publish_to_ray(_memory_keys(cfg))
        return run_search(cfg, opts)
    finally:
        _RAY_REFS.clear()
        _RAY_INDEX.clear()
        if started:
            ray.shutdown()
