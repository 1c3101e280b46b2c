"""Quantization-aware training: fine-tune with the deployed numerics, then hand back an FP32 export.

:func:`run_qat` is what ``Evaluator.quantize`` calls for ``method: qat``:

1. load the user's model (the same factory/checkpoint as the reference), resolve the plan
   against the reference's layer table;
2. attach fake quantizers per layer (:mod:`pipeline.qat.wrap`) that reproduce what
   ``exporters.onnx_quant`` deploys (:mod:`pipeline.qat.fake_quant` mirrors
   ``exporters.numerics``);
3. calibrate static activation ranges on the calibration set the way the quantizer does
   (ORT's collectors and settings, FP32 model; fp8 MinMax ``amax/448`` behind the int8-static layers), and
   again every :data:`RECALIBRATE_EVERY` steps since the weights - and so the ranges -
   move (Entropy: once, its KL search is slow);
4. fine-tune (:mod:`pipeline.qat.train`) with the config's loss on ``data.train``
   (default: the calibration set) for ``plan.qat.steps`` steps;
5. take the quantizers off and export the trained FP32 weights with the adapter, so the
   layer table maps identically.

The Evaluator then applies the *same* ONNX quantizer as PTQ to that export. Scales are
not trained parameters here: every deployed weight scale is a function of the weight
(absmax/127, std/100.06, v/-8), so the quantizer recomputes exactly the scales the model
was trained with from the learned weights. Activation scales are re-calibrated by the
quantizer on the fine-tuned model, as during training (same calibrator, same data).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import ConfigError, SearchConfig
from pipeline.data import CALIBRATION_BATCH, MAX_CALIBRATION_ROWS  # noqa: F401 - re-exported (keras_qat)
from pipeline.formats import Calibration
from pipeline.models.base import ModelAdapter, ReferenceModel
from pipeline.plan import QATSettings, QuantPlan, ResolvedPlan, resolved

log = logging.getLogger(__name__)

# Static activation ranges are re-observed this often (steps) during training.
RECALIBRATE_EVERY = 50


class QATOutcome(BaseModel):
    """What one QAT fine-tune produced."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    reference: ReferenceModel  # FP32 export of the fine-tuned model (same layer names)
    loss_curve: list[float]  # training loss per optimizer step
    steps: int
    seconds: float  # wall time of the training loop
    budget: dict[str, Any] = Field(default_factory=dict)  # steps, learning_rate, batch_size, seed
    loss: str = ""  # the loss that was used
    autocast: str | None = None  # "bf16" when matmuls ran under bf16 autocast
    train_rows: int = 0
    recalibrations: int = 0
    layers: dict[str, str] = Field(default_factory=dict)  # layer -> fake-quant description


def _train_dataset(config: SearchConfig):
    from pipeline.data import load_dataset

    if config.data.train is not None:
        return load_dataset(config.data.train, config, "data.train")
    return load_dataset(config.data.calibration, config, "data.calibration")


def _calibration_batches(config: SearchConfig, input_names: list[str]) -> list[dict]:
    """Exactly the feeds the quantizer calibrates on (``Evaluator.calibration_feeds``: the same
    :func:`pipeline.data.calibration_batches`, short last batch dropped), as tensors."""
    from pipeline.data import calibration_batches, load_dataset
    from pipeline.qat.train import to_tensors

    ds = load_dataset(config.data.calibration, config, "data.calibration")
    return [to_tensors(b) for b in calibration_batches(ds, input_names)]


def run_qat(
    config: SearchConfig,
    adapter: ModelAdapter,
    plan: QuantPlan | ResolvedPlan,
    reference: ReferenceModel,
    out_dir: str | Path,
    progress: Any = None,
) -> QATOutcome:
    """Fine-tune the model with fake quantization per ``plan`` and export it (see module doc)."""
    from pipeline.qat.train import call_model, choose_autocast, choose_threads, resolve_loss, train
    from pipeline.qat.wrap import QATModel

    if adapter.framework == "keras":
        # Keras 3 has its own fake quantizers (same numerics, TensorFlow ops): pipeline.qat.keras_qat.
        from pipeline.qat.keras_train import run_keras_qat

        return run_keras_qat(config, adapter, plan, reference, out_dir, progress=progress)
    if adapter.framework != "torch":
        raise ConfigError(
            f"plan.method: qat is implemented for PyTorch and Keras models; model.framework is "
            f"{adapter.framework!r} (use method: ptq for it)"
        )
    settings = plan.qat or QATSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = reference.layer_table
    choices = resolved(plan, table.names)  # as is when the evaluator resolved it
    onnx_ops = {l.name: l.onnx_op for l in table}

    from pipeline.qat.train import seed_everything

    seed_everything(settings.seed)
    model = adapter.load_model()
    train_set = _train_dataset(config)
    teacher = None
    if train_set.targets is None:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    loss = resolve_loss(config, reference.output_names, train_set.targets)
    calib = _calibration_batches(config, reference.input_names)
    n_params = sum(l.params for l in table)

    qm = QATModel(model, choices, plan.calibration, onnx_ops)
    recal = 0
    try:
        if qm.calibrate(calib, call_model):
            recal += 1
        qm.set_mode("qat")

        # Entropy's KL threshold search costs ~1 s per tensor (2048 bins): it runs once, before
        # training; MinMax / Percentile and fp8's MinMax (amax/448) refresh cheaply as weights move.
        periodic = plan.calibration is not Calibration.ENTROPY

        def on_step(step: int) -> None:
            nonlocal recal
            if (periodic and step % RECALIBRATE_EVERY == 0 and step < settings.steps
                    and qm.calibrate(calib, call_model)):
                recal += 1

        report = train(
            model, train_set, reference.input_names, loss,
            steps=settings.steps, learning_rate=settings.learning_rate, batch_size=settings.batch_size,
            seed=settings.seed, autocast=choose_autocast(n_params), threads=choose_threads(n_params), teacher=teacher, on_step=on_step,
            progress=progress, description=f"QAT {config.name}",
        )
        layers = qm.describe()
    finally:
        qm.detach()

    exported = adapter.export_model(model, out_dir / "qat_fp32.onnx")
    if sorted(exported.layer_table.names) != sorted(table.names):
        raise RuntimeError(
            "QAT export: the fine-tuned model's layer table differs from the reference's "
            f"(missing {sorted(set(table.names) - set(exported.layer_table.names))}, "
            f"extra {sorted(set(exported.layer_table.names) - set(table.names))}); please report this model"
        )
    log.info("QAT: %d steps in %.2fs, loss %.4f -> %.4f", report.steps, report.seconds,
             report.loss_curve[0], report.loss_curve[-1])
    return QATOutcome(
        reference=exported,
        loss_curve=report.loss_curve,
        steps=report.steps,
        seconds=report.seconds,
        budget=settings.model_dump(),
        loss=report.loss_name,
        autocast=report.autocast,
        train_rows=report.rows,
        recalibrations=recal,
        layers=layers,
    )


__all__ = ["QATOutcome", "run_qat", "RECALIBRATE_EVERY"]
