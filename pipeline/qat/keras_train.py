"""The Keras QAT loop: loss, datasets, training with periodic recalibration, and the outcome the
evaluator exports (the quantizers themselves: :mod:`pipeline.qat.keras_qat`)."""


from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError, SearchConfig
from pipeline.models.base import ReferenceModel
from pipeline.plan import QATSettings, QuantPlan, ResolvedPlan, resolved

from pipeline.qat.keras_qat import KerasQAT, _all_layers

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- loss
def resolve_loss(config: SearchConfig, model, output_names: list[str], targets: np.ndarray | None):
    """``(name, fn(outputs, y) -> scalar)`` for Keras QAT.

    Order: ``config.loss`` if set (``cross_entropy`` = sparse categorical cross-entropy
    on logits, ``mse``, or ``pkg.mod:fn`` called as ``fn(outputs, targets)`` like the
    PyTorch side, or a ``keras.losses.Loss`` class, instantiated); else the model's
    compiled loss (``model.compute_loss``); else cross-entropy for integer targets and
    MSE otherwise. Built-ins apply to ``metric.output``.
    """
    from pipeline.models.keras_adapter import import_tf
    from pipeline.qat.train import select_output

    _, keras = import_tf()
    key = config.metric.output
    name = config.loss
    if name is None and getattr(model, "compiled", False) and getattr(model, "loss", None) is not None:
        def compiled(out, y):
            return model.compute_loss(x=None, y=y, y_pred=out, training=True)

        return f"compiled: {getattr(model.loss, 'name', model.loss)}", compiled
    if name is None:
        name = "cross_entropy" if targets is not None and np.issubdtype(np.asarray(targets).dtype, np.integer) else "mse"
    if name == "cross_entropy":
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return name, lambda out, y: ce(y, select_output(out, key, output_names))
    if name == "mse":
        mse = keras.losses.MeanSquaredError()
        return name, lambda out, y: mse(y, select_output(out, key, output_names))
    if ":" not in name:
        raise ConfigError(f"loss: {name!r} is not `cross_entropy`, `mse` or an import string `pkg.mod:fn`")
    from pipeline.importing import import_object

    try:
        obj = import_object(name)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"loss: cannot import {name!r} ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, type) and issubclass(obj, keras.losses.Loss):
        inst = obj()
        return name, lambda out, y: inst(y, select_output(out, key, output_names))
    if not callable(obj):
        raise ConfigError(f"loss: {name!r} is not callable")
    return name, obj


# --------------------------------------------------------------------------- loop
@dataclass
class KerasQATReport:
    loss_curve: list[float]
    steps: int
    seconds: float
    loss_name: str
    rows: int
    recalibrations: int
    layers: dict[str, str] = field(default_factory=dict)


def _datasets(config: SearchConfig, input_names: list[str]):
    from pipeline.data import load_dataset
    from pipeline.qat import CALIBRATION_BATCH, MAX_CALIBRATION_ROWS

    train = (load_dataset(config.data.train, config, "data.train") if config.data.train is not None
             else load_dataset(config.data.calibration, config, "data.calibration"))
    missing = [k for k in input_names if k not in train.inputs]
    if missing:
        raise ConfigError(f"data.train: the training set lacks model input(s) {missing}; it has {list(train.inputs)}")
    # exactly Evaluator.calibration_feeds: the rows the quantizer calibrates on (equal batches)
    cal = load_dataset(config.data.calibration, config, "data.calibration").head(MAX_CALIBRATION_ROWS)
    bs = min(CALIBRATION_BATCH, len(cal))
    batches = [{k: v for k, v in b.items() if k in input_names} for b in cal.batches(bs, drop_last=True)]
    return train, batches


def train_qat(config: SearchConfig, adapter, plan: QuantPlan | ResolvedPlan, reference: ReferenceModel,
              progress: Any = None) -> tuple[Any, KerasQATReport]:
    """Load the model, fine-tune it with fake quantization per ``plan``; quantizers removed after."""
    from pipeline.models.keras_adapter import structure_inputs
    from pipeline.qat import RECALIBRATE_EVERY
    from pipeline.qat.train import _Progress

    tf, keras = adapter.tf()
    settings = plan.qat or QATSettings()
    choices = resolved(plan, reference.layer_table.names)  # as is when the evaluator resolved it
    keras.utils.set_random_seed(settings.seed)
    model = adapter.load_model()
    names = reference.input_names
    train_set, calib = _datasets(config, names)
    inputs = {k: train_set.inputs[k] for k in names}
    targets = train_set.targets
    if targets is None:  # self-distillation: the FP32 model's own (metric) output
        from pipeline.qat.train import select_output

        outs = [select_output(adapter.predict(model, b), config.metric.output, reference.output_names)
                for b in train_set.batches(256)]
        targets = np.concatenate([np.asarray(o) for o in outs])
    loss_name, loss_fn = resolve_loss(config, model, reference.output_names,
                                      train_set.targets if train_set.targets is not None else targets)

    def call(m, feeds):
        return m(structure_inputs(m, feeds), training=False)

    frozen = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
    for l in frozen:  # BN in inference mode: a few hundred small batches must not rewrite its statistics
        l.trainable = False
    qm = KerasQAT(model, choices, reference, plan.calibration)
    recal = 0
    curve: list[float] = []
    try:
        if qm.calibrate(calib, call):
            recal += 1
        qm.set_mode("qat")
        steps, bs = settings.steps, min(settings.batch_size, len(train_set))
        schedule = keras.optimizers.schedules.CosineDecay(settings.learning_rate, decay_steps=steps)
        opt = keras.optimizers.Adam(learning_rate=schedule)
        variables = model.trainable_variables
        if not variables:
            raise ValueError("QAT: the model has no trainable variables")

        @tf.function(reduce_retracing=True)
        def step_fn(batch, y):
            with tf.GradientTape() as tape:
                out = model(structure_inputs(model, batch), training=True)
                value = loss_fn(out, y)
            grads = tape.gradient(value, variables)
            opt.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            return value

        rng = np.random.default_rng(settings.seed)
        n = len(train_set)
        order = rng.permutation(n)
        pos = 0
        t0 = time.perf_counter()
        with _Progress(progress, steps, f"QAT {config.name}") as bar:
            for step in range(1, steps + 1):
                if pos + bs > n:
                    order, pos = rng.permutation(n), 0
                idx = order[pos:pos + bs]
                pos += bs
                value = float(step_fn({k: tf.constant(v[idx]) for k, v in inputs.items()}, tf.constant(targets[idx])))
                if not math.isfinite(value):
                    raise FloatingPointError(f"QAT loss became {value} at step {step}; lower plan.qat.learning_rate "
                                             f"(now {settings.learning_rate:g})")
                curve.append(value)
                if step % RECALIBRATE_EVERY == 0 and step < steps and qm.calibrate(calib, call):
                    recal += 1
                bar.update(step, value)
        seconds = time.perf_counter() - t0
        layers = qm.describe()
    finally:
        qm.detach()
        for l in frozen:
            l.trainable = True
    return model, KerasQATReport(curve, len(curve), seconds, loss_name, len(train_set), recal, layers)


def keras_qat(config: SearchConfig, adapter, plan: QuantPlan | ResolvedPlan, reference: ReferenceModel,
              workdir: str | Path | None = None, progress: Any = None) -> tuple[Any, list[float]]:
    """The fine-tuned Keras model (quantizers removed, FP32 weights) and its loss per step."""
    model, report = train_qat(config, adapter, plan, reference, progress=progress)
    return model, report.loss_curve


def run_keras_qat(config: SearchConfig, adapter, plan: QuantPlan | ResolvedPlan, reference: ReferenceModel,
                  out_dir: str | Path, progress: Any = None):
    """:func:`pipeline.qat.run_qat` for Keras: fine-tune, export like the reference, return a QATOutcome."""
    from pipeline.qat import QATOutcome

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, report = train_qat(config, adapter, plan, reference, progress=progress)
    exported = adapter.export_model(model, out_dir / "qat_fp32.onnx")
    if sorted(exported.layer_table.names) != sorted(reference.layer_table.names):
        raise RuntimeError("QAT export: the fine-tuned Keras model's layer table differs from the reference's "
                           f"({sorted(exported.layer_table.names)} vs {sorted(reference.layer_table.names)})")
    settings = plan.qat or QATSettings()
    return QATOutcome(reference=exported, loss_curve=report.loss_curve, steps=report.steps, seconds=report.seconds,
                      budget=settings.model_dump(), loss=report.loss_name, autocast=None, train_rows=report.rows,
                      recalibrations=report.recalibrations, layers=report.layers)
