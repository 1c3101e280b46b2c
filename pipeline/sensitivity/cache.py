"""On-disk cache of sensitivity tables, so a second run (or the search that seeds from it) is instant.

Keyed by everything that changes a number: the FP32 reference file's bytes, the eval rows and
targets, the metric, the backend, the format set, the single-layer plans' knobs and the mode.
Cells are also appended to a ``.partial.jsonl`` file as they are measured, so an interrupted run
resumes where it stopped instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from pipeline.sensitivity.table import Cell, SensitivityTable

CACHE_VERSION = "2"  # 2: the proxy counts activation rounding


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    path = Path(path)
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    data = path.with_name(path.name + ".data")  # external weights, where the export wrote them
    if data.exists():
        h.update(file_digest(data).encode())
    return h.hexdigest()


def _update(h, value, path: str) -> None:
    """Hash arrays by bytes, containers by structure (targets may be a dict of arrays, a list, ...)."""
    if isinstance(value, np.ndarray) or np.isscalar(value):
        a = np.ascontiguousarray(value)
        h.update(f"{path}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _update(h, value[k], f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _update(h, v, f"{path}[{i}]")
    else:
        h.update(f"{path}:{value!r}".encode())


def data_digest(inputs: dict[str, np.ndarray], targets) -> str:
    h = hashlib.sha256()
    _update(h, dict(inputs), "inputs")
    _update(h, targets, "targets")
    return h.hexdigest()


def cache_key(*, reference: str, data: str, metric: str, backend: str, formats: list[str], knobs: str,
              layers: list[str], mode: str) -> str:
    payload = json.dumps({"v": CACHE_VERSION, "reference": reference, "data": data, "metric": metric,
                          "backend": backend, "formats": sorted(formats), "knobs": knobs,
                          "layers": layers, "mode": mode}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class SensitivityCache:
    def __init__(self, directory: str | Path, key: str):
        self.dir = Path(directory)
        self.key = key
        self.path = self.dir / f"sensitivity-{key}.json"
        self.partial = self.dir / f"sensitivity-{key}.partial.jsonl"

    def load(self) -> SensitivityTable | None:
        if not self.path.exists():
            return None
        try:
            table = SensitivityTable.model_validate_json(self.path.read_text())
        except ValueError:
            return None  # written by an incompatible version: measure again
        return table.model_copy(update={"from_cache": True})

    def save(self, table: SensitivityTable) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(table.model_dump_json(indent=1))
        tmp.replace(self.path)
        self.partial.unlink(missing_ok=True)

    def done_cells(self) -> dict[tuple[str, str], Cell]:
        out: dict[tuple[str, str], Cell] = {}
        if self.partial.exists():
            for line in self.partial.read_text().splitlines():
                try:
                    c = Cell.model_validate_json(line)
                except ValueError:
                    continue  # a line cut short by an interruption
                out[(c.layer, c.format.value)] = c
        return out

    def append(self, cell: Cell) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.partial.open("a") as f:
            f.write(cell.model_dump_json() + "\n")
