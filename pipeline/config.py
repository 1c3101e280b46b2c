"""The search configuration (``search_spaces/*.yaml``), validated before any work.

Every error names the field path (``measure.batch_size``) and what is expected,
so a user can fix a config without reading code. Import strings
(``package.module:function``) are checked for importability at load time too,
because discovering a typo after the reference export wastes minutes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from pipeline.errors import ConfigError, format_validation_error  # noqa: F401 - re-exported
from pipeline.formats import ALL_FORMATS, INT4_BLOCK_SIZES, Calibration, Format, Int8Activations


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Where the trained model comes from.

    ``factory`` is an import string returning the model (``torch.nn.Module`` or
    ``keras.Model``); ``checkpoint`` is an optional state dict (``.pt``, loaded
    with ``weights_only=True``) applied to it. ``path`` instead loads a saved
    model file (``.pt`` full TorchScript-free module saved with torch.save is
    refused: it needs pickle; use factory + checkpoint), or ``.keras``.
    """

    framework: Literal["torch", "keras"] = "torch"
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    path: str | None = None
    output_names: list[str] | None = None
    opset: int = Field(21, ge=17, le=23)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if not self.factory and not self.path:
            raise ValueError("give either `factory: package.module:function` or `path: model.keras`")
        if self.factory and self.path:
            raise ValueError("give only one of `factory` and `path`")
        return self


class _OmitNewDefaults(_Strict):
    """Leaves fields added to the schema later out of dumps while they hold their default, so a config
    that does not use them dumps - and hashes (``study.config_hash``: resuming a study) - as before."""

    _omit_when_default: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_new_defaults(self, handler):
        data = handler(self)
        for name in self._omit_when_default:
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if name in data and getattr(self, name) == default:
                del data[name]
        return data


class DataSpec(_Strict):
    """Model inputs: an import string, or an ``.npz`` file (one array per model input).

    The function returns the inputs alone - a dict name -> array (one entry per
    model input, e.g. ``input_ids``, ``attention_mask``) or one array for a
    single-input model - so a user's ``eval_x`` / ``calib_x`` plug in as they
    are. The old form, a tuple ``(inputs, targets)`` with one target per row,
    still works (``data.train`` needs it: QAT trains on per-row targets). The
    product batches the rows; ``limit`` caps the rows used.
    """

    source: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    limit: int | None = Field(None, ge=1)


class TargetsSpec(_Strict):
    """What the metric compares the eval outputs with: any structure, not tied to input rows.

    ``source`` is an import string (a user's ``eval_y``) returning anything the
    metric understands - an array of labels, gold scores per sentence pair, a
    dict query -> relevant ids - or a ``.npy`` / ``.json`` file.
    """

    source: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_OmitNewDefaults):
    _omit_when_default: ClassVar[tuple[str, ...]] = ("targets",)

    calibration: DataSpec  # inputs only (targets, if returned, are ignored)
    eval: DataSpec  # inputs; targets from `targets`, or the old (inputs, targets) return
    targets: TargetsSpec | None = None  # the eval set's targets, when `eval` returns inputs only
    train: DataSpec | None = None  # QAT: (inputs, per-row targets) or inputs alone (self-distillation); defaults to calibration


PAIR_LAYOUTS = ("halves", "interleaved")


class MetricSpec(_OmitNewDefaults):
    """The task metric, computed over ALL eval outputs and the targets at once.

    Built-ins (``pipeline.metrics.BUILTIN_METRICS``): ``accuracy`` (top-1),
    ``top_k_accuracy`` (``k``), ``f1`` (binary), ``macro_f1``, ``mse``, ``mae``,
    ``r2``, ``spearman``, ``pearson``. A built-in reads one output
    (``output``: name or index). ``pairs`` turns spearman/pearson into a
    pair-level score on an embedder: the cosine similarity of two output rows
    per pair (``halves``: row i with row N+i; ``interleaved``: 2i with 2i+1; or
    targets ``{pairs: (N, 2) row indices, scores: (N,)}``) against the gold scores.

    A custom metric is ``pkg.mod:fn`` with ``fn(outputs: dict[str, ndarray],
    targets, **kwargs) -> float``; it must declare ``higher_is_better``.
    """

    _omit_when_default: ClassVar[tuple[str, ...]] = ("k", "pairs", "kwargs")

    name: str = "accuracy"
    output: str | int = 0
    higher_is_better: bool | None = None
    k: int | None = Field(None, ge=1, description="top_k_accuracy: the k (default 5)")
    pairs: Literal["halves", "interleaved"] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of a custom metric")

    @model_validator(mode="after")
    def _direction(self) -> "MetricSpec":
        from pipeline.metrics import BUILTIN_METRICS, PAIR_METRICS

        builtin = self.name in BUILTIN_METRICS
        if not builtin and ":" not in self.name:
            raise ValueError(f"unknown metric {self.name!r}: use one of {sorted(BUILTIN_METRICS)}, or "
                             "`pkg.mod:fn` with `higher_is_better: true|false`")
        if self.higher_is_better is None:
            if not builtin:
                raise ValueError(
                    f"custom metric {self.name!r}: set `higher_is_better: true|false` "
                    f"(built-ins are {sorted(BUILTIN_METRICS)})"
                )
            self.higher_is_better = BUILTIN_METRICS[self.name].higher_is_better
        elif builtin and self.higher_is_better != BUILTIN_METRICS[self.name].higher_is_better:
            raise ValueError(f"metric.higher_is_better: {self.name} is "
                             f"{'higher' if BUILTIN_METRICS[self.name].higher_is_better else 'lower'}-is-better; "
                             "drop the field (it is known for built-ins)")
        if self.k is not None and self.name != "top_k_accuracy":
            raise ValueError(f"metric.k: only top_k_accuracy takes k (metric is {self.name})")
        if self.pairs is not None and self.name not in PAIR_METRICS:
            raise ValueError(f"metric.pairs: only {sorted(PAIR_METRICS)} score pairs of output rows "
                             f"(metric is {self.name})")
        if self.kwargs and builtin:
            raise ValueError(f"metric.kwargs: only a custom `pkg.mod:fn` metric takes kwargs; {self.name} is "
                             "built in (its options are metric.k and metric.pairs)")
        return self

class EnergySpec(_Strict):
    """Energy measurement settings (see pipeline/energy)."""

    meter: Literal["auto", "nvml", "rapl", "estimated"] = "auto"
    min_seconds: float = Field(1.0, gt=0)
    repeats: int = Field(3, ge=1)
    # gCO2e per kWh. Default: world average electricity carbon intensity 2024,
    # 473 g/kWh (Ember, "Global Electricity Review 2025"). Set your grid's.
    grid_intensity_g_per_kwh: float = Field(473.0, ge=0)
    # Estimated meter only: watts per busy logical CPU (default in pipeline/energy/estimate.py).
    watts_per_cpu: float | None = Field(None, gt=0)


class MeasureSpec(_OmitNewDefaults):
    _omit_when_default: ClassVar[tuple[str, ...]] = ("eval_batch_size", "remeasure_rounds")

    backend: str = "auto"
    threads: int = Field(0, ge=0, description="0 = all cores")
    batch_size: int = Field(32, ge=1, description="the deployment batch: latency, throughput and energy")
    # Rows per run when scoring the eval set. Dynamic INT8 computes activation ranges per batch, so
    # its accuracy depends on this; None = batch_size (score as deployed). Recorded in every Measurement.
    eval_batch_size: int | None = Field(None, ge=1)
    warmup: int = Field(5, ge=0)
    runs: int = Field(30, ge=1)
    # After the search, the front's candidates and the uniform baselines are timed again in one
    # process, alternating between them for this many rounds (pipeline.search.remeasure): one
    # in-search timing on a shared machine can be off several-fold. 0 = keep the in-search numbers.
    remeasure_rounds: int = Field(7, ge=0, description="interleaved re-measurement rounds after the search (0 = off)")
    energy: EnergySpec = Field(default_factory=EnergySpec)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        from pipeline.backends.registry import AUTO, backend_names  # the plugins declare their names

        allowed = {AUTO, *backend_names()}
        if v not in allowed:
            raise ValueError(f"backend must be one of {sorted(allowed)}, got {v!r}")
        return v

    @property
    def eval_batch(self) -> int:
        """The batch the eval set is scored with: ``eval_batch_size``, else the deployment batch."""
        return self.eval_batch_size or self.batch_size

OPTIMIZE_MODES = ("auto", "none", "basic", "transformer")  # exporters.optimize.OptimizeMode


class ExportSpec(_Strict):
    """How the FP32 reference graph is prepared before candidates are built from it.

    ``optimize`` (see ``exporters/optimize.py``): ``auto`` (ORT's BASIC graph optimizations -
    constant folding, Conv/BatchNorm and MatMul/Add fusions - for backends running ORT's kernels,
    the export as is for TensorRT/TFLite), ``none``, ``basic``, or ``transformer`` (adds
    SkipLayerNorm/BiasGelu/MultiHeadAttention fusions). The FP32 reference's accuracy is measured
    on the same optimized graph.
    """

    optimize: str = "auto"

    @field_validator("optimize")
    @classmethod
    def _optimize(cls, v: str) -> str:
        if v not in OPTIMIZE_MODES:
            raise ValueError(f"optimize must be one of {list(OPTIMIZE_MODES)}, got {v!r} "
                             "(auto is the default; none keeps the export as is)")
        return v



class SensitivitySpec(_Strict):
    """Per-layer sensitivity (``precision-search sensitivity``; ``pipeline.sensitivity``).

    ``eval_limit`` caps the eval rows each single-layer candidate is measured on (the report
    labels the drops as measured on that subset); ``seed``: seed the search with the solver's
    plans and prune per-layer formats whose single-layer drop exceeds ``search.max_accuracy_drop``
    (``true``: always, measuring the table first if it is not cached; ``auto``: when the table
    is cached, or costs no more single-layer candidates than the search has trials, or - with
    ``search --time-budget`` - fits in a third of that budget, which it is then charged to;
    see :func:`pipeline.sensitivity.seeding.seed_decision`); ``bits_budgets``: average weight
    bits per quantizable weight the solver plans for; ``latency_budgets``: once the uniform
    baselines have measured how fast each format runs here, the solver also seeds the fastest plan
    predicted within the accuracy budget and, per budget b, the smallest and the least-drop plan at
    most b x that plan's predicted latency (:func:`pipeline.sensitivity.solver.speed_plans`;
    ``[]`` keeps only the fastest).
    """

    seed: bool | Literal["auto"] = "auto"
    eval_limit: int | None = Field(512, ge=1)
    bits_budgets: list[float] = Field(default_factory=lambda: [4.5, 6.0, 8.0, 12.0])
    greedy_plans: int = Field(3, ge=0)
    latency_budgets: list[float] = Field(default_factory=lambda: [1.1, 1.3])

    @field_validator("latency_budgets")
    @classmethod
    def _latency(cls, v: list[float]) -> list[float]:
        bad = [b for b in v if not 1 <= b <= 10]
        if bad:
            raise ValueError(f"latency budgets are multiples (1 to 10) of the fastest seed's predicted latency, "
                             f"e.g. [1.1, 1.3]; got {bad}")
        return v

    @field_validator("bits_budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        bad = [b for b in v if not 1 <= b <= 32]
        if bad:
            raise ValueError(f"bits budgets are average bits per weight between 1 and 32, got {bad}")
        return v


class ScreenSpec(_Strict):
    """Early pruning of proposals on a first share of the eval set (:mod:`pipeline.evaluation.screen`).

    A proposed plan (not a baseline, seed or retry) is scored first on ``fraction`` of the eval rows
    (whole eval batches, so every number a finished trial reports is unchanged); if its drop there
    exceeds ``margin`` x ``search.max_accuracy_drop`` the trial ends PRUNED, with that reason, before
    the rest of the eval, timing and energy. Only where the eval set has at least ``min_rows`` rows
    (a small set's first quarter is too noisy to judge on); ``fraction: 0`` turns it off.
    """

    fraction: float = Field(0.25, ge=0, lt=1)
    margin: float = Field(2.0, ge=1)
    min_rows: int = Field(1000, ge=1)


class SearchSpec(_OmitNewDefaults):
    """The search space and the study's settings."""

    _omit_when_default: ClassVar[tuple[str, ...]] = ("include_emulated", "group_layers", "sensitivity", "screen")

    formats: list[Format] = Field(default_factory=lambda: list(ALL_FORMATS))
    pin: dict[str, Format] = Field(default_factory=dict)  # glob -> fixed format
    exclude: list[str] = Field(default_factory=list)  # globs kept FP32 and not searched
    methods: list[Literal["ptq", "qat"]] = Field(default_factory=lambda: ["ptq"])
    calibrations: list[Calibration] = Field(default_factory=lambda: [Calibration.MINMAX, Calibration.PERCENTILE])
    int8_activations: list[Int8Activations] = Field(
        default_factory=lambda: [Int8Activations.STATIC, Int8Activations.DYNAMIC]
    )
    int4_block_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128])
    qat_steps: list[int] = Field(default_factory=lambda: [100, 300])
    qat_learning_rates: tuple[float, float] = (1e-5, 1e-3)
    objectives: list[str] = Field(default_factory=lambda: ["accuracy", "energy", "size"])
    max_accuracy_drop: float | None = Field(0.05, ge=0)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    trials: int = Field(30, ge=1)
    baselines: bool = True
    # Formats the backend only emulates (bf16/fp8 on ORT CPU: stored, computed in fp32) are left
    # out of the searched choices unless this is true (search_spaces/space.py says which, once).
    include_emulated: bool = False
    # Search one format per group of layers: "layer" (none), "block" (same name up to the last
    # numeric index, e.g. encoder.layer.3.*), "role" (same name with indices wildcarded), or "auto":
    # "role" when more than 24 layers are searched and roles at least halve the choices (a 36-layer
    # encoder: 9 choices, which a few dozen trials can learn; TPE over 36 independent layers is
    # barely better than random at that budget), else "layer" (search_spaces.pruning.group_mode).
    group_layers: Literal["auto", "layer", "block", "role"] = "auto"
    sensitivity: SensitivitySpec = Field(default_factory=SensitivitySpec)
    screen: ScreenSpec = Field(default_factory=ScreenSpec)

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[Format]) -> list[Format]:
        if not v:
            raise ValueError("at least one format is needed, e.g. [fp32, int8]")
        return v

    @field_validator("int4_block_sizes")
    @classmethod
    def _blocks(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b not in INT4_BLOCK_SIZES]
        if bad or not v:
            raise ValueError(f"int4 block sizes must be a non-empty subset of {list(INT4_BLOCK_SIZES)}, got {v}")
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        from pipeline.objectives import names

        unknown = [n for n in v if n not in names()]
        if unknown:
            raise ValueError(f"unknown objective(s) {unknown}: use names from {names()}")
        if "accuracy" not in v:
            raise ValueError("objectives must include `accuracy`")
        if len(set(v)) != len(v):
            raise ValueError("objectives must not repeat")
        return v


class TrackingSpec(_Strict):
    experiment: str | None = None  # default: the config's name
    registry_name: str | None = None  # default: the config's name
    alias: str = "champion"


class SearchConfig(_OmitNewDefaults):
    """A whole ``search_spaces/*.yaml`` file."""

    _omit_when_default: ClassVar[tuple[str, ...]] = ("export",)

    name: str
    model: ModelSpec
    data: DataConfig
    metric: MetricSpec = Field(default_factory=MetricSpec)
    measure: MeasureSpec = Field(default_factory=MeasureSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    loss: str | None = None  # QAT loss: "cross_entropy", "mse" or import string
    workdir: str = ".precision-search"  # relative: under the config's project root (see `work_root`)

    # Set by load_config: the folder the YAML lives in, for relative paths.
    base_dir: Path = Field(default=Path("."), exclude=True)
    # Set by load_config: the YAML file itself (absolute); None for configs built in memory.
    config_file: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("name must be letters, digits, '_', '-' or '.', e.g. digits-mlp")
        return v

    @model_validator(mode="after")
    def _backend_fits_model(self) -> "SearchConfig":
        """The chosen backend plugin checks what it cannot build (``Backend.check_config``)."""
        from pipeline.backends.registry import plugins

        plugin = plugins().get(self.measure.backend)
        if plugin is not None:
            plugin.check_config(self)
        return self

    def resolve_path(self, p: str) -> Path:
        """Paths in a config are relative to the project root the command runs in,
        falling back to the config file's folder."""
        path = Path(os.path.expandvars(os.path.expanduser(p)))
        if path.is_absolute() or path.exists():
            return path
        alt = self.base_dir / path
        return alt if alt.exists() else path

    @property
    def work_root(self) -> Path:
        """The workdir as an absolute path: THE place every store (``optuna.db``, ``mlflow.db``,
        artifacts, caches) lives. A relative ``workdir`` is anchored to the config's project root
        (:func:`project_root`), so ``promote --config /abs/my.yaml`` run from any folder finds the
        store ``search`` wrote; a config built in memory (``pipeline.api``) keeps the current folder."""
        path = Path(os.path.expandvars(os.path.expanduser(self.workdir)))
        if path.is_absolute():
            return path
        anchor = project_root(self.config_file.parent, path) if self.config_file is not None else Path.cwd()
        return (anchor / path).resolve()

    @property
    def work_where(self) -> str:
        """Where ``work_root`` came from, in words, for messages that name a store."""
        if Path(os.path.expanduser(self.workdir)).is_absolute():
            return f"workdir {self.workdir!r}"
        origin = f"config {self.config_file}" if self.config_file is not None else "the current folder"
        return f"workdir {self.workdir!r} of {origin}"

    @property
    def work_path(self) -> Path:
        return self.work_root / self.name


PROJECT_MARKERS = ("pyproject.toml", ".git")


def project_root(folder: Path, workdir: Path = Path(".precision-search")) -> Path:
    """The nearest folder at or above ``folder`` holding ``pyproject.toml``, ``.git`` or an existing
    ``workdir`` folder (the repo a preset lives in, or a project already searched), else ``folder``."""
    folder = Path(folder).resolve()
    for d in (folder, *folder.parents):
        if any((d / m).exists() for m in PROJECT_MARKERS) or (d / workdir).is_dir():
            return d
    return folder


def _check_import_strings(cfg: SearchConfig) -> list[str]:
    from pipeline.importing import check_import_string

    problems = []
    fields = [("model.factory", cfg.model.factory), ("data.calibration.source", cfg.data.calibration.source),
              ("data.eval.source", cfg.data.eval.source)]
    if cfg.data.train:
        fields.append(("data.train.source", cfg.data.train.source))
    if cfg.data.targets:
        fields.append(("data.targets.source", cfg.data.targets.source))
    if ":" in cfg.metric.name:
        fields.append(("metric.name", cfg.metric.name))
    if cfg.loss and ":" in cfg.loss:
        fields.append(("loss", cfg.loss))
    from pipeline.importing import add_config_folder

    add_config_folder(cfg.base_dir, [v for _, v in fields if v and ":" in v])  # `mymodel:build` beside the YAML
    for field, value in fields:
        if not value:
            continue
        if ":" not in value:
            if field.startswith("data.") and value.endswith((".npz", ".npy", ".json")):
                if not cfg.resolve_path(value).exists():
                    problems.append(f"  - {field}: file {value!r} does not exist")
                continue
            problems.append(f"  - {field}: expected `package.module:function` (or a .npz file for data, .npy/.json for data.targets), got {value!r}")
            continue
        err = check_import_string(value)
        if err:
            problems.append(f"  - {field}: {err}")
    if cfg.model.checkpoint and not cfg.resolve_path(cfg.model.checkpoint).exists():
        # a checkpoint the factory will create on first use is fine; only warn-worthy if no factory
        if not cfg.model.factory:
            problems.append(f"  - model.checkpoint: file {cfg.model.checkpoint!r} does not exist")
    if cfg.model.path and not cfg.resolve_path(cfg.model.path).exists():
        problems.append(f"  - model.path: file {cfg.model.path!r} does not exist")
    return problems


def _check_framework(cfg: SearchConfig) -> list[str]:
    import importlib.util

    if cfg.model.framework == "keras":
        missing = [m for m in ("tensorflow", "keras", "tf2onnx") if importlib.util.find_spec(m) is None]
        if missing:
            return [
                f"  - model.framework: keras needs {', '.join(missing)}; install the extra: "
                "pip install -e '.[keras]'   (or: make venv EXTRAS=keras)"
            ]
    else:
        if importlib.util.find_spec("torch") is None:
            return ["  - model.framework: torch is not installed: pip install torch==2.13.0"]
    return []


def parse_config(data: dict[str, Any], source: str = "config", base_dir: Path | None = None,
                 check_imports: bool = True) -> SearchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source, SearchConfig)) from None
    cfg.base_dir = base_dir or Path(".")
    problems = _check_framework(cfg)
    if check_imports and not problems:
        problems += _check_import_strings(cfg)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s):\n" + "\n".join(problems))
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, check_imports: bool = True) -> SearchConfig:
    """Read, merge dotted ``overrides`` (``{"search.trials": 12}``) and validate."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (presets live in search_spaces/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    cfg = parse_config(data, source=str(path), base_dir=path.parent, check_imports=check_imports)
    cfg.config_file = path.resolve()
    return cfg
