"""Reading untrusted files: metadata without following links, strict JSON with the path in errors."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Optional

from lightning_sae_samples.samples_dir.names import (
    LOCK_NAME,
    MANIFEST_NAME,
    PENDING_DIR,
    REPORT_NAME,
    SUMMARY_NAME,
    SamplesDirectoryError,
    is_writer_name,
)


def lstat_or_none(path: Path) -> Optional[os.stat_result]:
    """``os.lstat`` of ``path`` (links not followed), or ``None`` if nothing is there (or a parent is a file)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def is_plain_file(path: Path) -> bool:
    """A regular file, not a symlink (never followed)."""
    info = lstat_or_none(path)
    return info is not None and stat.S_ISREG(info.st_mode)


#: Deepest nesting a file read as plain JSON (the summary) may have; the writer's files are at most 5 deep.
MAX_JSON_DEPTH = 32
_INT64 = 2**63


def load_json(path: Path) -> Any:
    """Read a JSON file, raising :class:`SamplesDirectoryError` naming the path if it is corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except RecursionError as err:
        raise SamplesDirectoryError(f"Cannot read {path}: it is nested too deeply to be one this writer wrote."
                                    " The file is corrupt.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamplesDirectoryError(f"Cannot read {path}: {err}. The file is corrupt or unreadable.") from err


def json_problem(value: Any) -> Optional[str]:
    """The first field of a JSON value that the strict JSON the writer writes cannot hold, in words; else ``None``.

    That is: nesting deeper than :data:`MAX_JSON_DEPTH`, a NaN or infinite number (``NaN``, ``1e400``), or an
    integer beyond 64 bits. Fields are named as ``config.x[2]``.
    """
    nodes: list[tuple[Any, str, int]] = [(value, "", 0)]
    while nodes:
        node, where, depth = nodes.pop()
        if depth > MAX_JSON_DEPTH:
            return f"`{where}` is nested more than {MAX_JSON_DEPTH} levels deep"
        if isinstance(node, dict):
            nodes.extend((v, f"{where}.{k}" if where else str(k), depth + 1) for k, v in node.items())
        elif isinstance(node, list):
            nodes.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, float) and not math.isfinite(node):
            return f"`{where}` is {node}, not a finite number"
        elif isinstance(node, int) and not isinstance(node, bool) and not -_INT64 <= node < _INT64:
            return f"`{where}` is an integer beyond 64 bits"
    return None


def samples_dir_of(path: Path) -> Optional[Path]:
    """The samples directory ``path`` is (or would be) a file of, else ``None``.

    A file of a samples directory is one of the names the writer or the callback puts there (summary, full
    state, manifest, feature files, lock; not the Markdown report, which reports may rewrite) in a folder holding
    a summary or a manifest, or anything in a pending directory. Links on the way (and a link at ``path``) are
    followed, so no other name reaches them.
    """
    for candidate in {Path(os.path.abspath(path)), Path(path).resolve()}:
        if PENDING_DIR in candidate.parts:
            return Path(*candidate.parts[: candidate.parts.index(PENDING_DIR)])
        folder = candidate.parent
        ours = (is_writer_name(candidate.name) and candidate.name != REPORT_NAME) or candidate.name == LOCK_NAME
        if ours and any(lstat_or_none(folder / name) is not None for name in (SUMMARY_NAME, MANIFEST_NAME)):
            return folder
    return None
