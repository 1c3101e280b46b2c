"""User-facing errors shared by every layer: a config or plan problem, named by its field.

Lives at the bottom of the import order so the plan, the exporters and the backends can raise
:class:`ConfigError` without importing the config schema (``pipeline.config`` re-exports both).
"""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says which field and how to fix it."""


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
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
            msg = "unknown field (check the spelling; see search_spaces/README.md for the schema)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)
