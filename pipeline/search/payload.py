"""What travels from the search driver to the Ray workers: the shared reference bundle and the user's code.

Why a bundle through Ray's object store: a worker on another machine cannot read
the driver's disk (``reference.onnx``, ``.npz`` data files, checkpoints, a data
folder) and must not rebuild the reference itself (retraining an example's
weights, re-exporting ONNX, reloading data on every node). The driver builds the
FP32 reference, its layer table and the calibration and eval datasets once
(:func:`build_shared`), puts them in the object store once (``ray.put``), and
every trial task receives that one object reference. A worker materialises the
ONNX bytes into a node-local cache folder the first time (:func:`materialize`);
later trials on the same worker process reuse it without fetching the object again.

What is *not* in the bundle, and so must be reachable on the workers: the
framework model for QAT trials (``model.factory``/``checkpoint``, ``data.train``)
and the Keras model for the TFLite backend; those still load on the worker.

Why the user's code is shipped: a config names functions as
``package.module:function``. The top-level package (or single-file module) of
each name is shipped with Ray's ``runtime_env`` ``py_modules`` unless it is
installed (site-packages) or part of this project (shipped anyway). A package
not importable as is is looked up in the config file's folder, which is also put
on the driver's ``sys.path``, so ``factory: mymodel:build`` next to the YAML works
on the driver and on every node (:func:`user_code`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, SearchConfig

# Files never uploaded with a shipped package (Ray's runtime_env "excludes", gitignore syntax).
SHIP_EXCLUDES = ["__pycache__", "*.pyc", ".git", ".precision-search", "*.onnx", "*.engine", "mlruns", "mlartifacts"]


@dataclass
class SharedReference:
    """The FP32 reference and the datasets, as built once on the driver (plain data: any node can use it)."""

    key: str  # content digest of the reference files: names the node-local cache folder
    reference: Any  # pipeline.models.ReferenceModel, its onnx_path naming a file in ``files``
    files: dict[str, bytes] = field(default_factory=dict)  # reference.onnx (+ external data), by name
    calibration: Any = None  # pipeline.data.Dataset
    eval_set: Any = None  # pipeline.data.Dataset


def build_shared(config: SearchConfig, reference) -> SharedReference:
    """Read the driver's reference files and load the datasets once (the user's data functions run here only)."""
    from pipeline.data import load_dataset, load_eval_set

    onnx = Path(reference.onnx_path)
    files: dict[str, bytes] = {}
    for p in sorted(onnx.parent.glob(onnx.name + "*")):  # reference.onnx and its external data, if any
        if p.is_file() and ".tmp" not in p.name:
            files[p.name] = p.read_bytes()
    h = hashlib.sha256()
    for name, blob in files.items():
        h.update(name.encode())
        h.update(hashlib.sha256(blob).digest())
    h.update(reference.layer_table.model_dump_json().encode())
    calibration = load_dataset(config.data.calibration, config, "data.calibration")
    return SharedReference(key=h.hexdigest()[:20], reference=reference, files=files,
                           calibration=calibration, eval_set=load_eval_set(config))


def node_cache_dir(workdir: str | Path | None = None) -> Path:
    """Where a node keeps materialised references (one folder per content key, shared by its workers):
    ``$PRECISION_SEARCH_NODE_CACHE``, else ``<workdir>/node-cache`` where this node can create it (the
    config's workdir: the disk the user gave the project), else the system temp folder."""
    base = os.environ.get("PRECISION_SEARCH_NODE_CACHE")
    if base:
        return Path(base)
    if workdir is not None:
        folder = Path(workdir) / "node-cache"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return folder
        except OSError:  # another machine's path: fall back to this node's temp folder
            pass
    return Path(tempfile.gettempdir()) / f"precision-search-{os.getuid()}" / "reference"


def node_workdir(workdir: str | Path) -> Path:
    """The config's work folder where this node can create it (one machine, or a shared filesystem), else a
    node-local one: a worker given the driver's bundle needs no file of the driver's folder."""
    try:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return Path(workdir)
    except OSError:  # another machine's path (not there, not writable, or a file in the way)
        return Path(tempfile.gettempdir()) / f"precision-search-{os.getuid()}" / "work" / Path(workdir).name


def materialize(shared: SharedReference, workdir: str | Path | None = None):
    """The reference with its ``onnx_path`` on this node's disk, written once per node (atomically: several
    workers of one node may race; each writes a temp file and renames it). Results cached beside it (the
    reference's accuracy on this node's backend) are this node's own."""
    folder = node_cache_dir(workdir) / shared.key
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in shared.files.items():
        target = folder / name
        if target.is_file() and target.stat().st_size == len(blob):
            continue
        tmp = folder / f".{name}.{os.getpid()}.part"
        tmp.write_bytes(blob)
        os.replace(tmp, target)
    local = Path(shared.reference.onnx_path).name
    return shared.reference.model_copy(update={"onnx_path": str(folder / local)})


# -- the user's code ------------------------------------------------------------------------------
_PROJECT = ("pipeline", "exporters", "search_spaces")


def _import_strings(cfg: SearchConfig) -> list[tuple[str, str]]:
    fields = [("model.factory", cfg.model.factory), ("data.calibration.source", cfg.data.calibration.source),
              ("data.eval.source", cfg.data.eval.source),
              ("data.train.source", cfg.data.train.source if cfg.data.train else None),
              ("data.targets.source", cfg.data.targets.source if cfg.data.targets else None),
              ("metric.name", cfg.metric.name), ("loss", cfg.loss)]
    return [(f, v) for f, v in fields if v and ":" in v]


def _installed(origin: Path) -> bool:
    roots = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib", "stdlib")}
    return any(origin.is_relative_to(r) for r in roots)


def user_code(cfg: SearchConfig) -> list[str]:
    """Folders (packages) or ``.py`` files holding the config's own functions, to ship to the workers.

    Installed packages and this project's packages are not listed (Ray ships the
    project separately; installed ones must be installed on every node). A
    top-level module that is not importable is looked for in the config file's
    folder, which is then added to the driver's ``sys.path``.
    """
    base = Path(cfg.base_dir).resolve()
    out: list[str] = []
    for field_name, spec in _import_strings(cfg):
        top = spec.partition(":")[0].split(".")[0]
        if top in _PROJECT:
            continue
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            found = None
        if found is None:
            local = [p for p in (base / top, base / f"{top}.py") if p.exists()]
            if not local:
                continue  # config validation already named the field; nothing to ship
            if str(base) not in sys.path:
                sys.path.insert(0, str(base))
            found = importlib.util.find_spec(top)
            if found is None:
                raise ConfigError(f"{field_name}: {top!r} is in {base} but cannot be imported from there")
        if found.submodule_search_locations:  # a package: ship its folder
            paths = [Path(p) for p in found.submodule_search_locations if Path(p).is_dir()]
            path = paths[0] if paths else None
        else:
            path = Path(found.origin) if found.origin and found.origin.endswith(".py") else None
        if path is None or _installed(path.resolve()):
            continue
        if str(path.resolve()) not in out:
            out.append(str(path.resolve()))
    return out


def project_code() -> list[str]:
    """This checkout's packages (folders, not module objects: an editable install can give packages a
    multi-entry ``__path__``), shipped so workers run what the driver runs."""
    import exporters
    import pipeline
    import search_spaces

    return [next(str(Path(p).resolve()) for p in m.__path__ if Path(p).is_dir())
            for m in (pipeline, exporters, search_spaces)]
