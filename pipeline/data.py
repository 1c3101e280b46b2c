"""Datasets from configs: ``(inputs, targets)`` with named inputs, batched.

A data source is an import string returning ``(inputs, targets)`` or an
``.npz`` file holding ``targets`` plus one array per input (named like the
model's inputs). ``inputs`` may be a dict name -> array (several inputs, e.g.
``input_ids`` and ``attention_mask``) or one array for single-input models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline.config import ConfigError, DataSpec, SearchConfig

SINGLE_INPUT_NAME = "input"

# The calibration set every consumer (the ONNX quantizer through the Evaluator, TFLite, QAT)
# runs: at most this many rows, in batches of this size. ORT's calibrators keep every batch's
# activations in memory, and a few hundred rows already fix per-tensor ranges.
MAX_CALIBRATION_ROWS = 512
CALIBRATION_BATCH = 32


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    targets: np.ndarray | None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        n = len(self)
        for i in range(0, n, batch_size):
            if drop_last and i + batch_size > n:
                break
            yield {k: v[i : i + batch_size] for k, v in self.inputs.items()}

    def head(self, n: int) -> "Dataset":
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, None if self.targets is None else self.targets[:n])

    def fixed_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of exactly ``batch_size`` rows (tiled if the set is smaller), for timing."""
        n = len(self)
        idx = np.arange(batch_size) % n
        return {k: v[idx] for k, v in self.inputs.items()}


def _normalise_inputs(inputs, field: str) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        if not inputs:
            raise ConfigError(f"{field}: returned an empty inputs dict")
        out = {str(k): np.asarray(v) for k, v in inputs.items()}
    elif isinstance(inputs, (list, tuple)):
        raise ConfigError(f"{field}: inputs must be a dict name -> array (several inputs) or one array, not a {type(inputs).__name__}")
    else:
        out = {SINGLE_INPUT_NAME: np.asarray(inputs)}
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"{field}: inputs have different numbers of rows: {lengths}")
    for k, v in out.items():
        if v.dtype == np.float64:
            out[k] = v.astype(np.float32)  # models run in fp32; float64 feeds would be rejected by ORT
    return out


def load_dataset(spec: DataSpec, config: SearchConfig, field: str) -> Dataset:
    """Load one dataset; ``field`` (e.g. ``data.eval``) names it in errors."""
    if spec.source.endswith(".npz"):
        path = config.resolve_path(spec.source)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        targets = arrays.pop("targets", None)
        inputs = arrays
    else:
        from pipeline.importing import import_object

        try:
            result = import_object(spec.source)(**spec.kwargs)
        except Exception as exc:
            raise ConfigError(f"{field}.source: calling {spec.source!r} failed: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(result, tuple) and len(result) == 2):
            raise ConfigError(f"{field}.source: {spec.source!r} must return (inputs, targets), got {type(result).__name__}")
        inputs, targets = result
    ds = Dataset(_normalise_inputs(inputs, f"{field}.source"), None if targets is None else np.asarray(targets))
    if ds.targets is not None and len(ds.targets) != len(ds):
        raise ConfigError(f"{field}.source: {len(ds)} input rows but {len(ds.targets)} targets")
    if spec.limit:
        ds = ds.head(spec.limit)
    return ds


def calibration_batches(
    dataset: Dataset,
    input_names: list[str] | None = None,
    batch_size: int = CALIBRATION_BATCH,
    max_rows: int = MAX_CALIBRATION_ROWS,
) -> list[dict[str, np.ndarray]]:
    """The calibration feeds: the first ``max_rows`` rows in equal batches of ``batch_size``.

    A short last batch is dropped, because ORT's histogram calibrators stack batches (so they
    must be equal); a set smaller than one batch is one batch of all its rows. Only the
    ``input_names`` columns are kept (all when None). One function, so the quantizer and QAT
    calibrate on exactly the same rows: a single extra row moves a calibrated scale.
    """
    ds = dataset.head(max_rows)
    if len(ds) == 0:
        raise ConfigError("data.calibration: the calibration set has no rows; give at least one batch")
    names = None if input_names is None else set(input_names)
    size = min(batch_size, len(ds))
    return [{k: v for k, v in b.items() if names is None or k in names} for b in ds.batches(size, drop_last=True)]
