"""Throwaway virtual environments for the install tests, which see this environment's packages less some.

Installing torch, lightning and transformers into a fresh environment takes minutes; an overlay environment has
them already (its site-packages lists this one's distributions through a ``.pth`` line), so an install command run
in it installs only what it is about: the project itself and the distributions ``hide`` leaves out.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path

#: This project: the install commands under test install it (its editable hook here points at another checkout).
PROJECT = "lightning-sae-samples"


def _top_level_entries(distribution: str) -> set[str]:
    """The names in site-packages that ``distribution`` owns: its packages, modules, .pth files and dist-info."""
    dist = importlib.metadata.distribution(distribution)
    names = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
    return names | {Path(dist._path).name}  # type: ignore[attr-defined]


def overlay_venv(path: Path, hide: Iterable[str] = ()) -> Path:
    """A virtual environment with pip at ``path`` that also sees this one's distributions, less ``hide`` and this
    project; returns its ``bin`` folder."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(path)], check=True, capture_output=True, timeout=300)
    hidden = set().union(*(_top_level_entries(name) for name in [PROJECT, *hide]))
    hidden |= {name for name in _site_entries() if PROJECT.replace("-", "_") in name}  # editable hooks
    shared = path / "parent-site-packages"
    shared.mkdir()
    for name in _site_entries():
        if name not in hidden:
            (shared / name).symlink_to(Path(sysconfig.get_paths()["purelib"]) / name)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (path / "lib" / version / "site-packages" / "parent.pth").write_text(f"{shared}\n")
    ruff = Path(sys.executable).parent / "ruff"  # a binary, not a script: scripts/test.sh calls it
    if ruff.is_file():
        (path / "bin" / "ruff").symlink_to(ruff)
    return path / "bin"


def _site_entries() -> list[str]:
    return sorted(p.name for p in Path(sysconfig.get_paths()["purelib"]).iterdir())
