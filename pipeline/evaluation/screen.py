"""Early pruning on a first share of the eval set, without changing any measured number.

Why: on a model whose eval pass dominates a trial (all-MiniLM-L6-v2: 3,000 sentences, about half
of a 34 s trial), a plan that is far outside the accuracy budget shows it on the first quarter of
the rows. The search then stops that trial there - Optuna state PRUNED, the reason saying on how
many rows and by how much - instead of finishing the eval, timing and metering a plan that cannot
be on the front (issue 15: "Optuna pruning on a partial eval set is fine if labelled").

How it stays exact: the eval set is run in the *same batches* as a full pass (``measure.eval_batch``
slices of the canonical row order; dynamic INT8 scales activations per batch, so a different
batching would change every score). The screen is a set of whole canonical batches run first; when
the trial goes on, the remaining batches run and the outputs are put back in canonical order, so
the full-set metric is bit-for-bit what an unscreened pass gives, at no extra cost.

Which rows the screen scores: the rows of its batches, with the targets cut to them the way the
metric reads them - one target per row, or pairs of rows (``metric.pairs: halves|interleaved``,
``{"pairs", "scores"}`` targets), keeping only pairs whose two rows were both run. Targets of any
other structure (a ranking's dict, detection boxes) cannot be cut: no screen, every trial runs
fully. The reference's score on the same rows is computed once per Evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data import Dataset


@dataclass(frozen=True)
class Screen:
    first: np.ndarray  # rows run first: whole canonical batches, ascending
    rest: np.ndarray  # every other row, ascending (whole batches; the short last one, if any, last)
    order: np.ndarray  # positions in ``first`` of the rows the screen's metric reads, in the metric's layout
    targets: Any  # the targets cut to those rows
    total_rows: int

    @property
    def label(self) -> str:
        return f"the first {len(self.first)} of {self.total_rows} eval rows ({len(self.first) / self.total_rows:.0%})"

    def outputs_for_metric(self, first_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.order] for k, v in first_outputs.items()}

    def merge(self, first_outputs: dict[str, np.ndarray], rest_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of all rows in canonical order (what one full pass returns)."""
        out = {}
        for k, a in first_outputs.items():
            b = rest_outputs[k]
            full = np.empty((self.total_rows, *a.shape[1:]), dtype=np.result_type(a, b))
            full[self.first], full[self.rest] = a, b
            out[k] = full
        return out


def build_screen(ds: Dataset, batch_size: int, pairs: str | None, fraction: float) -> Screen | None:
    """The screen for this eval set, or None where it cannot be cut or would not save a batch."""
    n = len(ds)
    starts = np.arange(0, n, batch_size)
    if fraction <= 0 or len(starts) < 2:
        return None
    t = ds.targets
    want_rows = max(1, int(round(fraction * n)))
    if ds.row_targets:
        wanted = np.arange(want_rows)
    elif isinstance(t, dict) and "pairs" in t and "scores" in t:
        idx = np.asarray(t["pairs"])
        k = max(1, int(round(fraction * len(idx))))
        wanted = np.unique(idx[:k].reshape(-1))
    elif pairs in ("halves", "interleaved") and isinstance(t, np.ndarray) and t.ndim == 1 and n == 2 * len(t):
        k = max(1, want_rows // 2)
        wanted = np.r_[0:k, len(t):len(t) + k] if pairs == "halves" else np.arange(2 * k)
    else:
        return None
    batches = np.unique(wanted // batch_size)
    if sum(min(batch_size, n - s) for s in starts[batches]) > n / 2:
        return None  # whole batches would make the screen most of the pass: nothing worth saving
    first = np.concatenate([np.arange(s, min(s + batch_size, n)) for s in starts[batches]])
    rest = np.setdiff1d(np.arange(n), first)
    pos = np.full(n, -1, dtype=np.int64)
    pos[first] = np.arange(len(first))
    cut = _cut_targets(ds, pos, pairs)
    if cut is None:
        return None
    order, targets = cut
    return Screen(first=first, rest=rest, order=order, targets=targets, total_rows=n)


def _cut_targets(ds: Dataset, pos: np.ndarray, pairs: str | None):
    """(positions in the first rows' outputs, in the metric's layout; targets for them)."""
    t = ds.targets
    if ds.row_targets:
        rows = np.flatnonzero(pos >= 0)
        return pos[rows], t[rows]
    if isinstance(t, dict) and "pairs" in t:
        idx = np.asarray(t["pairs"])
        keep = (pos[idx[:, 0]] >= 0) & (pos[idx[:, 1]] >= 0)
        if keep.sum() < 3:
            return None
        sub = idx[keep]
        used = np.unique(sub.reshape(-1))
        renumber = np.full(len(pos), -1, dtype=np.int64)
        renumber[used] = np.arange(len(used))
        return pos[used], {**t, "pairs": renumber[sub], "scores": np.asarray(t["scores"])[keep]}
    m = len(t)
    if pairs == "halves":
        a, b = np.arange(m), np.arange(m) + m
    else:
        a, b = 2 * np.arange(m), 2 * np.arange(m) + 1
    keep = np.flatnonzero((pos[a] >= 0) & (pos[b] >= 0))
    if len(keep) < 3:
        return None
    first_rows, second_rows = pos[a[keep]], pos[b[keep]]
    order = np.r_[first_rows, second_rows] if pairs == "halves" else np.column_stack([first_rows, second_rows]).reshape(-1)
    return order, t[keep]
