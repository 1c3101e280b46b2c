"""Resolve ``package.module:attribute`` import strings from configs."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def add_config_folder(folder: str | Path, specs: Iterable[str]) -> bool:
    """Put a config file's folder - else the current directory, where ``python`` itself would look but the
    installed ``precision-search`` command does not - on ``sys.path`` when a top-level module one of its
    import strings names lives there and is not importable otherwise, so ``factory: mymodel:build`` next to
    the YAML or in the folder the command runs from works without PYTHONPATH (the search then ships that
    module to Ray workers: pipeline.search.payload). True if a folder was added."""
    added = False
    for spec in specs:
        top = spec.partition(":")[0].split(".")[0]
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            continue
        for base in (Path(folder).resolve(), Path.cwd().resolve()):
            if (base / top).is_dir() or (base / f"{top}.py").is_file():
                if str(base) not in sys.path:
                    sys.path.insert(0, str(base))
                importlib.invalidate_caches()
                added = True
                break
    return added


def import_object(spec: str) -> Any:
    if ":" not in spec:
        raise ValueError(f"expected `package.module:attribute`, got {spec!r}")
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_import_string(spec: str) -> str | None:
    """None if ``spec`` resolves, else a one-line reason."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.split(".")[0] == exc.name.split(".")[0]:  # the user's module itself, not a dependency
            return (f"cannot import module {module_name!r}: no such module beside the config file, in the current "
                    "directory or on PYTHONPATH (put it in one of them, or pip install its package)")
        return f"cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - report any import failure to the user
        return f"cannot import module {module_name!r} ({type(exc).__name__}: {exc})"
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            return f"module {module_name!r} has no attribute {attr!r}"
        obj = getattr(obj, part)
    if not callable(obj):
        return f"{spec!r} is not callable"
    return None
