"""The layer rule of docs/architecture.md, checked on the code's own imports (parsed with ast).

Imports point down only: a module may import its own layer (sideways) or any layer below it,
never one above; and no two modules import each other through any chain (no circles). Function-
level (lazy) imports count: they are imports all the same. What other engineers' areas still break
is listed in ALLOWED with the reason; an entry that no longer occurs fails the test, so the list
only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "exporters", "search_spaces")

# Lowest layer first. A module belongs to the longest prefix that matches it ("pipeline": the package
# __init__ only, so a new module must be placed here explicitly).
LAYERS: list[tuple[str, ...]] = [
    ("pipeline", "pipeline.formats", "pipeline.layers", "pipeline.plan", "pipeline.results", "pipeline.errors",
     "pipeline.importing", "pipeline.hints"),
    ("exporters", "pipeline.objectives", "pipeline.config", "pipeline.data", "pipeline.data_check", "pipeline.metrics",
     "pipeline.pareto", "pipeline.urls"),
    ("search_spaces",),
    ("pipeline.backends", "pipeline.qat", "pipeline.energy", "pipeline.models", "pipeline.sources",
     "pipeline.measure"),
    ("pipeline.evaluation", "pipeline.evaluate", "pipeline.examples"),
    ("pipeline.search", "pipeline.study", "pipeline.progress", "pipeline.sensitivity"),
    ("pipeline.tracking",),
    ("pipeline.promotion", "pipeline.api"),
    ("pipeline.cli",),
]

# (importer, imported) pairs allowed to break the rule for now, with why. Owners are removing them.
ALLOWED: dict[tuple[str, str], str] = {
    # config validation asks the backend plugins for their names and checks (lazy, inside validators;
    # the registry imports no config, so this is no circle).
    ("pipeline.config", "pipeline.backends.registry"): "backend names/checks come from the plugins",
}
# Circles allowed for now (sets of modules), same rule: each must still exist.
ALLOWED_CIRCLES: list[set[str]] = []


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            out[_module_name(path)] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or is inside of (``a.b.c`` -> ``a.b`` if known)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:  # annotations only: never imported at run time
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                hit = _resolve(t, known)
                if hit and hit != mod and not mod.startswith(hit + "."):
                    graph[mod].add(hit)
    return graph


def layer_of(mod: str) -> int:
    best, rank = -1, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            inside = mod == prefix or (prefix != "pipeline" and mod.startswith(prefix + "."))  # the package face only
            if inside and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{mod} is in no layer: add it to LAYERS in tests/test_layers.py and docs/architecture.md"
    return rank


def _breaks(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, t) for m, ts in graph.items() for t in ts
            if layer_of(t) > layer_of(m) and not t.startswith(m + ".")}


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    import sys

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_imports_point_down_only():
    graph = imports()
    breaks = _breaks(graph)
    new = sorted(b for b in breaks if b not in ALLOWED)
    assert not new, "imports that climb the layer rule (docs/architecture.md): " + ", ".join(f"{a} -> {b}" for a, b in new)
    stale = sorted(b for b in ALLOWED if b not in breaks)
    assert not stale, f"allow-list entries that no longer occur, delete them: {stale}"


def test_no_import_circles():
    circles = _circles(imports())
    new = [c for c in circles if not any(c <= allowed for allowed in ALLOWED_CIRCLES)]
    assert not new, "import circles: " + "; ".join(" <-> ".join(sorted(c)) for c in new)


def test_exporters_import_only_the_vocabulary():
    """exporters/ writes model files from pipeline.formats/plan/layers/errors only (not backends, models, config)."""
    vocabulary = ("pipeline.formats", "pipeline.plan", "pipeline.layers", "pipeline.errors")
    graph = imports()
    bad = sorted((m, t) for m, ts in graph.items() if m.startswith("exporters") for t in ts
                 if t.startswith("pipeline") and not t.startswith(vocabulary) and (m, t) not in ALLOWED)
    assert not bad, f"exporters import beyond the vocabulary: {bad}"


def test_no_module_over_600_lines():
    long = sorted((str(p.relative_to(ROOT)), n) for p in list((ROOT / "pipeline").rglob("*.py"))
                  + list((ROOT / "exporters").rglob("*.py")) if (n := len(p.read_text().splitlines())) > 600)
    allowed = {"pipeline/study.py", "pipeline/registry.py", "pipeline/models/keras_adapter.py",
               "exporters/quant/ort_passes.py"}  # other engineers' splits in progress
    assert not [x for x in long if x[0] not in allowed], long


# Beyond the layer order: the objective vocabulary stays pure (no config, no services), and the search
# loop never talks to MLflow itself (the tracker, an observer handed in by pipeline.tracking, does).
SERVICE_FREE: dict[str, tuple[str, ...]] = {
    "pipeline/objectives": ("pipeline.config", "mlflow", "optuna", "ray"),
    "pipeline/search": ("mlflow",),
}


def _all_imported(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def test_objectives_and_the_search_loop_import_no_services():
    bad = [f"{path.relative_to(ROOT)} imports {name}"
           for package, forbidden in SERVICE_FREE.items()
           for path in sorted((ROOT / package).rglob("*.py"))
           for name in _all_imported(path)
           if any(name == f or name.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)
