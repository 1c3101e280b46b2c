"""Check a config's data cheaply, before a study starts workers: one clear error, not a trial per failure.

:func:`check_data` loads the calibration set, the eval set and the targets the
way the Evaluator will, and - given the model's inputs (:func:`onnx_input_specs`
of the FP32 reference, a graph read without weights) - checks ONE batch of each
against them: every model input present, ranks, fixed dimensions and dtypes.
Nothing runs a model, so it costs the data loading only. Callers: the search
driver before it starts Ray, ``evaluate``, anyone with a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError, SearchConfig
from pipeline.data import CALIBRATION_BATCH, describe_value, load_dataset, load_eval_set


@dataclass(frozen=True)
class InputSpec:
    """One model input: its name, shape (None for a dynamic dimension) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...] | None  # None when the graph gives no shape
    dtype: np.dtype


@dataclass
class DataSummary:
    """What :func:`check_data` found, for logs and reports."""

    calibration_rows: int
    eval_rows: int
    eval_batch_size: int
    inputs: dict[str, str]  # name -> "shape dtype" of one eval row set
    targets: str  # describe_value of the targets
    notes: list[str] = field(default_factory=list)


def onnx_input_specs(onnx_path: str | Path) -> dict[str, InputSpec]:
    """The graph inputs of an ONNX file (initializers excluded), read without loading weights."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    specs = {}
    for vi in graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        specs[vi.name] = InputSpec(vi.name, shape, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    return specs


def check_feeds(feeds: dict[str, np.ndarray], specs: dict[str, InputSpec]) -> list[str]:
    """Problems of one batch against the model's inputs, each naming the input and the fix."""
    problems = []
    missing = [n for n in specs if n not in feeds]
    if missing:
        problems.append(f"missing model input(s) {missing}; the source returned {sorted(feeds)} "
                        "(name the arrays like the model's inputs)")
    for name, spec in specs.items():
        if name not in feeds:
            continue
        a = feeds[name]
        if spec.shape is not None:
            if a.ndim != len(spec.shape):
                problems.append(f"input {name!r}: {a.ndim}-D array {a.shape}, the model takes "
                                f"{len(spec.shape)}-D {_shape_str(spec.shape)}")
            else:
                bad = [i for i, (d, s) in enumerate(zip(a.shape, spec.shape)) if i > 0 and s and d != s]
                if bad:
                    problems.append(f"input {name!r}: shape {a.shape}, the model takes {_shape_str(spec.shape)} "
                                    f"(axis {bad[0]} differs; pad/resize in the source)")
        if a.dtype != spec.dtype:
            problems.append(f"input {name!r}: dtype {a.dtype}, the model takes {spec.dtype}; return "
                            f"np.asarray(x, dtype=np.{spec.dtype.name})")
    return problems


def _shape_str(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def check_data(config: SearchConfig, model_inputs: dict[str, InputSpec] | str | Path | None = None) -> DataSummary:
    """Load the config's data and check one batch of each set; raise one :class:`ConfigError` listing problems.

    ``model_inputs``: the model's input specs, or the path of its ONNX file; without
    them only what the data says about itself is checked (rows, names, agreement of
    calibration and eval dtypes, targets present).
    """
    if isinstance(model_inputs, (str, Path)):
        model_inputs = onnx_input_specs(model_inputs)
    cal = load_dataset(config.data.calibration, config, "data.calibration")
    ev = load_eval_set(config)
    eval_batch = config.measure.eval_batch
    problems: list[str] = []
    notes: list[str] = []
    for field_name, ds, bs in (("data.calibration", cal, CALIBRATION_BATCH), ("data.eval", ev, eval_batch)):
        batch = next(ds.batches(min(bs, len(ds))))
        if model_inputs:
            problems += [f"{field_name}.source: {p}" for p in check_feeds(batch, model_inputs)]
            extra = sorted(set(batch) - set(model_inputs))
            if extra:
                notes.append(f"{field_name}: array(s) {extra} are not model inputs and are not fed")
    for name in sorted(set(cal.inputs) & set(ev.inputs)):
        a, b = cal.inputs[name], ev.inputs[name]
        if a.dtype != b.dtype or a.shape[1:] != b.shape[1:]:
            problems.append(f"data.calibration.source / data.eval.source: input {name!r} is {a.shape[1:]} "
                            f"{a.dtype} in calibration but {b.shape[1:]} {b.dtype} in eval; make them agree")
    only = sorted(set(cal.inputs) ^ set(ev.inputs))
    if only and not model_inputs:
        notes.append(f"calibration and eval name different arrays: {only}")
    if len(ev) < eval_batch:
        notes.append(f"the eval set has {len(ev)} rows, fewer than one eval batch ({eval_batch})")
    if problems:
        raise ConfigError(f"data: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return DataSummary(
        calibration_rows=len(cal), eval_rows=len(ev), eval_batch_size=eval_batch,
        inputs={k: f"{v.shape} {v.dtype}" for k, v in ev.inputs.items()},
        targets=describe_value(ev.targets), notes=notes,
    )

