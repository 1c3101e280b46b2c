"""Resolve ``package.module:attribute`` import strings from configs."""

from __future__ import annotations

import importlib
from typing import Any


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
