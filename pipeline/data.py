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
