"""Datasets from configs: named model inputs, batched by the product, and the targets beside them.

The data contract (docs/data_contract.md):

- ``data.eval`` / ``data.calibration`` name a function returning the model's
  inputs - a dict name -> array (several inputs, e.g. ``input_ids`` and
  ``attention_mask``) or one array for a single-input model - or an ``.npz``
  file with one array per input. The product cuts the rows into batches.
- ``data.targets`` names a function (a user's ``eval_y``) or a ``.npy`` /
  ``.json`` file returning whatever the metric needs: labels, gold scores per
  pair, a dict query -> relevant ids. Nothing ties it to the input rows.
- The old form, a function returning ``(inputs, targets)`` with one target per
  row (or an ``.npz`` holding ``targets``), keeps working; ``data.train`` (QAT)
  uses it, since training needs a target per row.

Why the split: an embedder scored over sentence pairs, a ranking or a detection
metric has targets that are not one per input row; tying them to rows forced
users to wrap their model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pipeline.config import ConfigError, DataSpec, SearchConfig, TargetsSpec

SINGLE_INPUT_NAME = "input"

# The calibration set every consumer (the ONNX quantizer through the Evaluator, TFLite, QAT)
# runs: at most this many rows, in batches of this size. ORT's calibrators keep every batch's
# activations in memory, and a few hundred rows already fix per-tensor ranges.
MAX_CALIBRATION_ROWS = 512
CALIBRATION_BATCH = 32


@dataclass
class Dataset:
    """Named input arrays with equal row counts, and the targets.

    ``targets`` is None, a row-aligned array (old form; QAT's training set) or
    any structure the metric understands (``data.targets``); ``row_targets``
    says which, so only row-aligned targets are cut with the rows.
    """

    inputs: dict[str, np.ndarray]
    targets: Any = None
    row_targets: bool = True

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        n = len(self)
        for i in range(0, n, batch_size):
            if drop_last and i + batch_size > n:
                break
            yield {k: v[i : i + batch_size] for k, v in self.inputs.items()}

    def head(self, n: int) -> "Dataset":
        """The first ``n`` rows; row-aligned targets are cut with them, other targets kept whole."""
        targets = self.targets
        if self.row_targets and targets is not None:
            targets = targets[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, targets, self.row_targets)

    def take(self, rows: np.ndarray) -> "Dataset":
        """These rows' inputs, in this order (targets not carried: the caller cuts them as its metric reads them)."""
        return Dataset({k: v[rows] for k, v in self.inputs.items()}, None, False)

    def fixed_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        """A batch of exactly ``batch_size`` rows (tiled if the set is smaller), for timing."""
        n = len(self)
        idx = np.arange(batch_size) % n
        return {k: v[idx] for k, v in self.inputs.items()}

    def fingerprint(self) -> str:
        """A digest of the inputs and targets (any structure), e.g. to key a cached reference score."""
        h = hashlib.sha256()
        for k in sorted(self.inputs):
            h.update(k.encode())
            _hash_value(h, self.inputs[k])
        _hash_value(h, self.targets)
        return h.hexdigest()


def _hash_value(h, value: Any) -> None:
    if isinstance(value, np.ndarray):
        h.update(f"nd{value.dtype.str}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes() if value.dtype != object else repr(value.tolist()).encode())
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=repr):
            h.update(repr(k).encode())
            _hash_value(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _hash_value(h, v)
    else:
        h.update(repr(value).encode())


def describe_value(value: Any) -> str:
    """A short type/shape summary for error messages (never the values themselves)."""
    if isinstance(value, np.ndarray):
        return f"array {value.shape} {value.dtype}"
    if isinstance(value, dict):
        return "dict {" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in list(value.items())[:6]) + "}"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _normalise_inputs(inputs, field: str) -> dict[str, np.ndarray]:
    if isinstance(inputs, dict):
        if not inputs:
            raise ConfigError(f"{field}: returned an empty inputs dict; return name -> array, one per model input")
        out = {str(k): np.asarray(v) for k, v in inputs.items()}
    elif isinstance(inputs, (list, tuple)):
        raise ConfigError(f"{field}: inputs must be a dict name -> array (several inputs) or one array, "
                          f"not a {type(inputs).__name__} of {len(inputs)}")
    elif inputs is None:
        raise ConfigError(f"{field}: returned None; return the model inputs (a dict name -> array, or one array)")
    else:
        out = {SINGLE_INPUT_NAME: np.asarray(inputs)}
    for k, v in out.items():
        if v.ndim == 0:
            raise ConfigError(f"{field}: input {k!r} is a scalar; give an array with one row per example")
        if v.dtype == object or v.dtype.kind in "USV":
            raise ConfigError(f"{field}: input {k!r} holds {v.dtype} values; models take numbers: tokenize or "
                              "encode them in the source function")
    lengths = {k: len(v) for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ConfigError(f"{field}: inputs have different numbers of rows: {lengths}")
    if next(iter(lengths.values())) == 0:
        raise ConfigError(f"{field}: returned 0 rows; the set needs at least one example (check the source's "
                          "kwargs, file paths and filters)")
    for k, v in out.items():
        if v.dtype == np.float64:
            out[k] = v.astype(np.float32)  # models run in fp32; float64 feeds would be rejected by ORT
    return out


def _call_source(source: str, kwargs: dict, field: str) -> Any:
    from pipeline.importing import import_object

    try:
        fn = import_object(source)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's field to fix
        raise ConfigError(f"{field}: cannot import {source!r} ({type(exc).__name__}: {exc}); "
                          "give `package.module:function`") from exc
    try:
        return fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's function failed: say where
        raise ConfigError(f"{field}: calling {source!r} failed: {type(exc).__name__}: {exc}") from exc


def load_dataset(spec: DataSpec, config: SearchConfig, field: str) -> Dataset:
    """Load one input set; ``field`` (e.g. ``data.eval``) names it in errors.

    Accepts the inputs alone or the old ``(inputs, targets)`` pair (targets one per row).
    """
    targets = None
    if spec.source.endswith(".npz"):
        path = config.resolve_path(spec.source)
        if not path.is_file():
            raise ConfigError(f"{field}.source: file {spec.source!r} does not exist")
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        targets = arrays.pop("targets", None)
        inputs = arrays
    else:
        result = _call_source(spec.source, spec.kwargs, f"{field}.source")
        if isinstance(result, tuple) and len(result) == 2 and not isinstance(result[0], (tuple, list)):
            inputs, targets = result
        elif isinstance(result, tuple):
            raise ConfigError(f"{field}.source: {spec.source!r} returned a tuple of {len(result)}; return the "
                              "inputs (a dict name -> array, or one array), or the pair (inputs, targets)")
        else:
            inputs = result
    if targets is not None:
        try:
            targets = np.asarray(targets)
        except ValueError as exc:  # ragged lists: not one target per row
            raise ConfigError(f"{field}.source: the targets of (inputs, targets) are not an array ({exc}); return "
                              "the inputs alone and give structured targets in data.targets") from exc
    ds = Dataset(_normalise_inputs(inputs, f"{field}.source"), targets)
    if ds.targets is not None and (ds.targets.ndim == 0 or len(ds.targets) != len(ds)):
        got = "a scalar target" if ds.targets.ndim == 0 else f"{len(ds.targets)} targets"
        raise ConfigError(f"{field}.source: {len(ds)} input rows but {got}; the "
                          "(inputs, targets) form needs one target per row - for targets of another shape "
                          "return the inputs alone and give them in data.targets")
    if spec.limit:
        ds = ds.head(spec.limit)
    return ds


def load_targets(spec: TargetsSpec, config: SearchConfig, field: str = "data.targets") -> Any:
    """The metric's targets: whatever the function returns, or a ``.npy`` / ``.json`` file's content."""
    src = spec.source
    if src.endswith((".npy", ".json")):
        path = config.resolve_path(src)
        if not path.is_file():
            raise ConfigError(f"{field}.source: file {src!r} does not exist")
        if src.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        return json.loads(path.read_text())
    value = _call_source(src, spec.kwargs, f"{field}.source")
    if value is None:
        raise ConfigError(f"{field}.source: {src!r} returned None; return what the metric compares with "
                          "(labels, gold scores, a dict ...)")
    if isinstance(value, (list, tuple)) and value and all(np.isscalar(v) for v in value):
        value = np.asarray(value)  # a list of labels/scores behaves as the array built-ins expect
    return value


def pairs_head(ds: Dataset, limit: int, pairs: str | None) -> Dataset | None:
    """The first pairs of a pair-scored eval set, at most ``limit`` rows in all; None if it is not one.

    Why: a subset (``data.eval.limit``, the sensitivity table's ``eval_limit``, a benchmark's
    ``--eval-rows``) must keep the pairing the metric reads (:func:`pipeline.metrics.pair_scores`):
    ``halves`` keeps rows i and N+i of the first k pairs, ``interleaved`` the first 2k rows, and
    ``{"pairs": (N, 2), "scores": (N,)}`` targets keep the rows of the first pairs that fit,
    renumbered. Anything else (a ranking's dict, a detection's boxes) is not cut here.
    """
    t, n = ds.targets, len(ds)
    if isinstance(t, dict) and "pairs" in t and "scores" in t:
        idx, gold = np.asarray(t["pairs"]), np.asarray(t["scores"])
        if idx.ndim != 2 or idx.shape[1] != 2 or len(idx) != len(gold):
            return None
        k, rows = 0, []
        seen: dict[int, int] = {}
        for a, b in idx.tolist():
            new = [r for r in dict.fromkeys((a, b)) if r not in seen]
            if k and len(seen) + len(new) > limit:
                break
            for r in new:
                seen[r] = len(seen)
            k += 1
        keep = np.asarray(list(seen), dtype=np.int64)
        remap = np.vectorize(seen.__getitem__, otypes=[np.int64])(idx[:k]) if k else idx[:0]
        return Dataset({name: v[keep] for name, v in ds.inputs.items()},
                       {**t, "pairs": remap, "scores": gold[:k]}, row_targets=False)
    if pairs is None or not isinstance(t, np.ndarray) or t.ndim != 1 or n != 2 * len(t):
        return None
    k = max(1, limit // 2)
    if k >= len(t):
        return ds
    keep = np.r_[0:k, len(t):len(t) + k] if pairs == "halves" else np.arange(2 * k)
    return Dataset({name: v[keep] for name, v in ds.inputs.items()}, t[:k], row_targets=False)


def load_eval_set(config: SearchConfig) -> Dataset:
    """The eval inputs and the targets the metric compares them with.

    ``data.targets`` when given (``data.eval.limit`` cuts them with the rows when they are one
    per input row, or pairs of rows the metric scores (:func:`pairs_head`); other structures
    are never cut),
    else the targets of the old ``(inputs, targets)`` form.
    """
    data = config.data
    if data.targets is None:
        ds = load_dataset(data.eval, config, "data.eval")
    else:
        ds = load_dataset(data.eval.model_copy(update={"limit": None}), config, "data.eval")
        if ds.targets is not None:
            raise ConfigError("data.targets: data.eval.source already returns (inputs, targets); return the "
                              "inputs alone from it, or drop data.targets")
        targets = load_targets(data.targets, config)
        aligned = isinstance(targets, np.ndarray) and targets.ndim > 0 and len(targets) == len(ds)
        ds = Dataset(ds.inputs, targets, row_targets=aligned)
        if data.eval.limit and data.eval.limit < len(ds):
            if aligned:
                ds = ds.head(data.eval.limit)
            else:
                cut = pairs_head(ds, data.eval.limit, config.metric.pairs)
                if cut is None:
                    raise ConfigError("data.eval.limit: the targets are not one per input row (nor pairs of rows "
                                      "the metric names), so the product cannot cut them; pass the size to both "
                                      "functions through their kwargs instead")
                ds = cut
        return ds
    if ds.targets is None:
        raise ConfigError("data.targets: the metric needs targets; give `data.targets: {source: "
                          "pkg.module:eval_y}` (labels, gold scores, ...), or return (inputs, targets) "
                          "from data.eval.source")
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
    if input_names is not None:
        missing = [n for n in input_names if n not in ds.inputs]
        if missing:
            raise ConfigError(f"data.calibration.source: the model needs input(s) {missing} but the source "
                              f"returned {sorted(ds.inputs)}; name the arrays like the model's inputs")
    names = None if input_names is None else set(input_names)
    size = min(batch_size, len(ds))
    return [{k: v for k, v in b.items() if names is None or k in names} for b in ds.batches(size, drop_last=True)]
