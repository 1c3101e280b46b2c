"""Commands the product prints for the user to run next, spelled so they run verbatim.

Why: after ``make search`` the ``precision-search`` script lives in the project's virtualenv, which a fresh
shell does not have on its PATH; a hint that says ``precision-search front ...`` then fails. Every hint names
the executable by the path it is running from (the venv's script, or ``python -m pipeline.cli`` with that
interpreter when the CLI was started some other way), and quotes its arguments for a POSIX shell.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

SCRIPT = "precision-search"


def executable() -> list[str]:
    """How to start this CLI again from any shell: the venv's script by absolute path when it exists."""
    script = Path(sys.executable).with_name(SCRIPT)
    if script.is_file():
        return [str(script)]
    found = shutil.which(SCRIPT)
    if found and Path(found).resolve().parent == Path(sys.executable).resolve().parent:
        return [found]
    return [sys.executable, "-m", "pipeline.cli"]


def command(*args: object) -> str:
    """``command("front", "--config", cfg)`` -> ``/repo/.venv/bin/precision-search front --config cfg``."""
    return shlex.join([*executable(), *(str(a) for a in args)])
