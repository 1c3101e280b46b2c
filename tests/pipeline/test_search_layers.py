"""Imports go objectives <- search <- tracking <- promotion <- cli, and never back (ast, lazy imports included).

The circle study <-> tracking <-> report <-> registry of the old layout is what this keeps from coming back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> what it must not import (anything whose dotted name starts with one of these)
FORBIDDEN = {
    "pipeline/objectives": ("pipeline.search", "pipeline.tracking", "pipeline.promotion", "pipeline.cli",
                            "pipeline.config", "pipeline.evaluate", "mlflow", "optuna", "ray"),
    "pipeline/search": ("pipeline.tracking", "pipeline.promotion", "pipeline.cli", "pipeline.api", "mlflow"),
    "pipeline/tracking": ("pipeline.promotion", "pipeline.cli", "pipeline.api"),
    "pipeline/promotion": ("pipeline.cli", "pipeline.api"),
}
OLD = ("pipeline.study", "pipeline.trial", "pipeline.registry", "pipeline.report", "pipeline.tracking_schema")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_climbs_back_up(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package] + OLD):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_search_packages_stay_under_600_lines():
    for package in FORBIDDEN:
        for path in (ROOT / package).rglob("*.py"):
            assert len(path.read_text().splitlines()) <= 600, path
