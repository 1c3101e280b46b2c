"""Smoke test of benchmarks/vs_peers.py: the quick CNN run builds every row and prints the table."""

from __future__ import annotations

import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    return importlib.import_module("benchmarks.vs_peers")  # the CNN factory import string uses this name too


def test_quick_cnn_table(tmp_path):
    out = tmp_path / "vs_peers.md"
    assert _module().main(["--quick", "--models", "cnn", "--rounds", "2", "--workdir", str(tmp_path / "w"),
                           "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("FP32 export", "ORT quantize_dynamic", "ORT quantize_static", "Optimum-style",
                "torch.ao quantize_dynamic", "PyTorch eager (another runtime)", "product uniform int8 dynamic",
                "product uniform int4"):
        assert row in text, row
    table = [line for line in text.splitlines() if line.startswith("| ") and "variant" not in line]
    assert len(table) == 10
    assert all("x latency" in line for line in table)
