"""Reading untrusted files: metadata without following links, strict JSON with the path in errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Optional

from lightning_sae_samples.samples_dir.names import SamplesDirectoryError


def lstat_or_none(path: Path) -> Optional[os.stat_result]:
    """``os.lstat`` of ``path`` (links not followed), or ``None`` if nothing is there."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def is_plain_file(path: Path) -> bool:
    """A regular file, not a symlink (never followed)."""
    info = lstat_or_none(path)
    return info is not None and stat.S_ISREG(info.st_mode)


def load_json(path: Path) -> Any:
    """Read a JSON file, raising :class:`SamplesDirectoryError` naming the path if it is corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamplesDirectoryError(f"Cannot read {path}: {err}. The file is corrupt or unreadable.") from err
