"""User-facing errors shared by every layer: a config or plan problem, named by its field.

Lives at the bottom of the import order so the plan, the exporters and the backends can raise
:class:`ConfigError` without importing the config schema (``pipeline.config`` re-exports both).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says which field and how to fix it."""


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """The field names a pydantic model accepts at ``loc``'s parent (walking nested models; [] if unknown)."""
    from pydantic import BaseModel

    for part in loc[:-1]:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        model = next((a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
                     None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(n for n, f in model.model_fields.items() if not f.exclude)  # not the internal ones
    return []


def format_validation_error(exc: ValidationError, source: str = "config", model: Any = None) -> str:
    """One line per problem, each naming its field; an unknown field gets the nearest valid names (``model``:
    the pydantic class validated, to list them)."""
    lines = [f"{source}: {exc.error_count()} problem(s):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            # A check across fields (model validator) names its field itself: "search.x: ..."
            field, sep, rest = msg.partition(": ")
            if sep and " " not in field and "." in field:
                loc, msg = (f"{loc}.{field}" if loc else field), rest
        loc = loc or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, tuple(err["loc"]))
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=3, cutoff=0.6)
            msg = ("unknown field" + (f" - did you mean {' or '.join(close)}?" if close else "")
                   + (f" (valid here: {', '.join(known)})" if known else
                      " (check the spelling; every field is in pipeline/config.py, the presets in search_spaces/)"))
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)
