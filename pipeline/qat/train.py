"""The QAT fine-tune loop: loss resolution, seeding, bf16 autocast, progress.

Kept separate from the fake quantizers (``fake_quant``) and from how they are
attached (``wrap``): this module only knows "a torch model, a dataset, a
loss, a budget". It is deliberately plain PyTorch (Adam + cosine decay, a
seeded sampler) because a QAT budget of a few hundred steps does not need a
trainer framework, and every knob here is one a reader can see.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from pipeline.config import ConfigError, SearchConfig
from pipeline.data import SINGLE_INPUT_NAME, Dataset

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], Any]  # (model output(s), targets) -> scalar tensor

# Environment override for mixed precision: "auto" (default), "bf16" or "off".
AUTOCAST_ENV = "PRECISION_SEARCH_QAT_AUTOCAST"
# bf16 autocast only pays on CPU when matmuls are big enough to amortise the casts:
# on the 2-core AVX512-BF16 machines the digits MLP (~0.1 M MACs/sample) runs
# *slower* under autocast, a 384-wide encoder faster. Below this many weight
# elements, "auto" keeps fp32.
AUTOCAST_MIN_PARAMS = 2_000_000
# Below this many weight elements the fine-tune runs on one intra-op thread: thread
# hand-offs cost more than tiny matmuls gain, and on shared cores (Ray workers, CI) an
# OpenMP barrier waiting on a descheduled thread stalls a 1 ms step for ~200 ms (measured:
# 200 digits-MLP steps took 0.2-8 s with 2 threads on a loaded 2-core machine, 0.4-0.75 s
# with 1).
SINGLE_THREAD_MAX_PARAMS = 1_000_000


# ---------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------
def select_output(out: Any, key: str | int, output_names: list[str]) -> Any:
    """The output the metric (and so the built-in losses) is about."""
    if isinstance(out, dict):
        if isinstance(key, int):
            return list(out.values())[key]
        return out[key]
    if isinstance(out, (tuple, list)):
        if isinstance(key, str):
            if key not in output_names:
                raise ConfigError(f"metric.output: {key!r} is not a model output; outputs are {output_names}")
            key = output_names.index(key)
        return out[key]
    return out


def resolve_loss(config: SearchConfig, output_names: list[str], targets: np.ndarray | None) -> tuple[str, LossFn]:
    """(name, fn) from ``config.loss``.

    ``cross_entropy`` / ``mse`` apply to the metric's output (``metric.output``).
    An import string ``pkg.mod:fn`` gets every model output as the model
    returns it, and the target batch, and returns a scalar tensor; a
    ``torch.nn.Module`` class (``torch.nn:SmoothL1Loss``) is instantiated without
    arguments and used like a built-in. With no ``loss`` set, integer targets
    mean cross-entropy and float targets mean MSE; a training set without targets
    means self-distillation: MSE to the FP32 model's own outputs.
    """
    import torch
    import torch.nn.functional as F

    key = config.metric.output
    name = config.loss
    if name is None:
        if targets is None:
            name = "mse"
        else:
            name = "cross_entropy" if np.issubdtype(np.asarray(targets).dtype, np.integer) else "mse"

    if name == "cross_entropy":
        def ce(out, y):
            logits = select_output(out, key, output_names)
            y = select_output(y, key, output_names)  # a teacher's outputs, when distilling
            flat = logits.float().reshape(-1, logits.shape[-1])
            if y.is_floating_point() and y.shape == logits.shape:  # teacher logits: soft targets
                return F.cross_entropy(flat, F.softmax(y.float().reshape(flat.shape), dim=-1))
            return F.cross_entropy(flat, y.long().reshape(-1))

        return name, ce
    if name == "mse":
        def mse(out, y):
            pred = select_output(out, key, output_names).float()
            y = select_output(y, key, output_names)
            return F.mse_loss(pred, y.float().reshape(pred.shape))

        return name, mse
    if ":" not in name:
        raise ConfigError(f"loss: {name!r} is not `cross_entropy`, `mse` or an import string `pkg.mod:fn`")
    from pipeline.importing import import_object

    try:
        obj = import_object(name)
    except Exception as exc:  # noqa: BLE001 - surface any import problem with the field name
        raise ConfigError(f"loss: cannot import {name!r} ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        module = obj()

        def wrapped(out, y):
            pred = select_output(out, key, output_names)
            return module(pred, y)

        return name, wrapped
    if not callable(obj):
        raise ConfigError(f"loss: {name!r} is not callable")
    return name, obj


# ---------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------
def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs where torch's bf16 autocast has fast kernels."""
    try:
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        return False
    if "AMX" in cap:
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_autocast(n_weight_params: int, device: str = "cpu") -> str | None:
    """``"bf16"`` or None.

    Under autocast only the matmul/conv ops run in bf16: the fake quantizers, the loss,
    the weights and the optimizer state stay fp32, and the export is fp32. The matmuls then
    see the deployed grid rounded once more to bf16 (relative error <= 2**-9), a
    training-time approximation that makes large models' steps ~1.8x faster on AVX512-BF16
    CPUs (DESIGN facts); the artifact and its numerics are unaffected. Small models stay
    fp32: there the casts cost more than they save.
    """
    mode = os.environ.get(AUTOCAST_ENV, "auto").lower()
    if mode not in ("auto", "bf16", "off"):
        raise ConfigError(f"{AUTOCAST_ENV}={mode!r}: use auto, bf16 or off")
    if mode == "off":
        return None
    if mode == "bf16":
        return "bf16"
    if device == "cpu":
        return "bf16" if cpu_has_bf16() and n_weight_params >= AUTOCAST_MIN_PARAMS else None
    return "bf16"


# ---------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------
class _Progress:
    """Adapts whatever the caller passed as ``progress``.

    None: a transient rich bar of our own on stderr, only when stderr is a terminal
    and no other rich live display (e.g. the search panel) is active; otherwise
    nothing, so Ray workers and CI logs stay quiet.
    A ``rich.progress.Progress``: a task is added to it (the CLI's live display).
    A callable: called as ``fn(step, total, loss)``. False: nothing.
    """

    def __init__(self, progress: Any, total: int, description: str):
        self.total = total
        self._own = None
        self._rich = None
        self._fn = None
        self._task = None
        if progress is False:
            return
        try:
            from rich.progress import Progress as RichProgress
        except ImportError:  # pragma: no cover - rich is a core dependency
            RichProgress = None  # noqa: N806
        if progress is None and RichProgress is not None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

            self._own = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                     console=Console(stderr=True), transient=True)
            self._rich = self._own
        elif RichProgress is not None and isinstance(progress, RichProgress):
            self._rich = progress
        elif callable(progress):
            self._fn = progress
        if self._rich is not None:
            self._task = self._rich.add_task(description, total=total, loss="-")

    def __enter__(self) -> "_Progress":
        if self._own is not None:
            try:
                if not self._own.console.is_terminal:
                    raise RuntimeError("stderr is not a terminal")
                self._own.start()
            except Exception:  # noqa: BLE001 - not a terminal, or another rich Live owns it (a search panel)
                self._own = self._rich = self._task = None
        return self

    def update(self, step: int, loss: float) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=step, loss=f"{loss:.4f}")
        elif self._fn is not None:
            self._fn(step, self.total, loss)

    def __exit__(self, *exc) -> None:
        if self._own is not None:
            self._own.stop()
        elif self._rich is not None and self._task is not None:
            self._rich.remove_task(self._task)


# ---------------------------------------------------------------------------
# loop
# ---------------------------------------------------------------------------
@dataclass
class TrainReport:
    loss_curve: list[float]
    steps: int
    seconds: float
    autocast: str | None
    loss_name: str
    rows: int
    recalibrations: int = 0
    extra: dict = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_tensors(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def call_model(model, inputs: dict[str, Any]):
    """Call the model the way the adapter's export does: one positional input or keywords."""
    if list(inputs) == [SINGLE_INPUT_NAME]:
        return model(inputs[SINGLE_INPUT_NAME])
    return model(**inputs)


def _freeze_batchnorm(model) -> None:
    """BatchNorm in eval mode during QAT: a few hundred small batches would
    otherwise overwrite running statistics learned on the full training run."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train(
    model,
    dataset: Dataset,
    input_names: list[str],
    loss: tuple[str, LossFn],
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    autocast: str | None = None,
    threads: int | None = None,
    teacher=None,
    on_step: Callable[[int], None] | None = None,
    progress: Any = None,
    description: str = "QAT",
) -> TrainReport:
    """Fine-tune ``model`` in place for ``steps`` optimizer steps; returns the loss curve.

    Batches are drawn from ``dataset`` with a seeded permutation, reshuffled per
    epoch; a set smaller than ``batch_size`` is used whole. ``teacher`` (a frozen
    FP32 copy) supplies targets when the dataset has none. ``on_step(step)``
    runs after each optimizer step (the caller re-calibrates activation ranges
    there). ``threads`` sets torch's intra-op threads for the loop (restored after).
    """
    import torch

    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(model, dataset, input_names, loss, steps=steps, learning_rate=learning_rate,
                      batch_size=batch_size, seed=seed, autocast=autocast, teacher=teacher, on_step=on_step,
                      progress=progress, description=description)
    finally:
        torch.set_num_threads(saved_threads)


def choose_threads(n_weight_params: int) -> int | None:
    """1 for small models (see :data:`SINGLE_THREAD_MAX_PARAMS`), else torch's default."""
    return 1 if n_weight_params < SINGLE_THREAD_MAX_PARAMS else None


def _train(model, dataset, input_names, loss, *, steps, learning_rate, batch_size, seed, autocast, teacher,
           on_step, progress, description) -> TrainReport:
    import torch

    seed_everything(seed)
    loss_name, loss_fn = loss
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("QAT: the model has no trainable parameters")
    opt = torch.optim.Adam(params, lr=learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    n = len(dataset)
    bs = min(batch_size, n)
    inputs = {k: v for k, v in dataset.inputs.items() if k in input_names}
    missing = [k for k in input_names if k not in inputs]
    if missing:
        raise ConfigError(f"data.train: the training set lacks model input(s) {missing}; it has {list(dataset.inputs)}")
    targets = dataset.targets
    if targets is None and teacher is None:
        raise ValueError("QAT: the training set has no targets and no teacher model was given")

    model.train()
    _freeze_batchnorm(model)
    curve: list[float] = []
    order = torch.randperm(n, generator=gen)
    pos = 0
    ac = torch.autocast("cpu", dtype=torch.bfloat16) if autocast == "bf16" else None
    t0 = time.perf_counter()
    with _Progress(progress, steps, description) as bar:
        for step in range(1, steps + 1):
            if pos + bs > n:
                order = torch.randperm(n, generator=gen)
                pos = 0
            idx = order[pos : pos + bs].numpy()
            pos += bs
            batch = to_tensors({k: v[idx] for k, v in inputs.items()})
            if targets is not None:
                y = torch.from_numpy(np.ascontiguousarray(targets[idx]))
            else:
                with torch.no_grad():
                    y = call_model(teacher, batch)  # all outputs; the loss selects metric.output
            opt.zero_grad(set_to_none=True)
            if ac is not None:
                with ac:
                    out = call_model(model, batch)
            else:
                out = call_model(model, batch)
            value = loss_fn(out, y)
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"QAT loss became {value.item()} at step {step}; lower plan.qat.learning_rate "
                    f"(now {learning_rate:g})"
                )
            value.backward()
            opt.step()
            sched.step()
            v = float(value.detach())
            curve.append(v)
            if on_step is not None:
                on_step(step)
            bar.update(step, v)
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainReport(loss_curve=curve, steps=steps, seconds=seconds, autocast=autocast, loss_name=loss_name, rows=n)
