"""Commands printed for the user to run, spelled so that they run as printed in a new shell.

A new shell has not activated the virtual environment this package runs in, so a bare ``lightning-sae-samples``
is "command not found" there and a bare ``pip`` is another Python's. The commands name this environment's
scripts by path instead: ``.venv/bin/lightning-sae-samples`` (relative to the current directory when under it).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

#: The package's command (``[project.scripts]`` in pyproject.toml).
PROG = "lightning-sae-samples"


def shown_path(path: Path) -> str:
    """``path`` relative to the current directory when under it (``.venv/bin/pip``), else absolute; never bare.

    A bare name would be looked up on ``PATH``; a relative path keeps a slash (``./pip``).
    """
    absolute = Path(os.path.abspath(path))  # abspath, not resolve: a venv's python is a link out of the venv
    try:
        relative = absolute.relative_to(Path.cwd())
    except ValueError:
        return str(absolute)
    if not relative.parts:
        return "."
    return str(relative) if len(relative.parts) > 1 else f"./{relative}"


def script_command(script: str, module: str) -> str:
    """How a new shell in the current directory runs console script ``script`` of this Python environment.

    The script beside the interpreter (a virtual environment's ``bin``), else the one on ``PATH``, else
    ``python -m module`` with this interpreter's path.
    """
    beside = Path(sys.executable).parent / script
    if beside.is_file():
        return shlex.quote(shown_path(beside))
    found = shutil.which(script)
    if found:
        return shlex.quote(found)
    return f"{shlex.quote(shown_path(Path(sys.executable)))} -m {module}"


def program_command(*args: str) -> str:
    """``lightning-sae-samples ARGS...`` as a new shell runs it, e.g. ``.venv/bin/lightning-sae-samples serve DIR``."""
    return " ".join([script_command(PROG, "lightning_sae_samples"), *(shlex.quote(os.fspath(a)) for a in args)])


def pip_command(*args: str) -> str:
    """``pip ARGS...`` of this environment as a new shell runs it, e.g. ``.venv/bin/pip install ...``."""
    return " ".join([script_command("pip", "pip"), *(shlex.quote(os.fspath(a)) for a in args)])
