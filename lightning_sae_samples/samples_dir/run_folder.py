"""The writing side of a run folder of many SAEs: ``DIR/<name>/`` samples directories and the run index.

One lock (``DIR/sae_samples.lock``) covers the run; each SAE's folder is committed by the one-SAE writer (a crash
leaves each SAE's last whole save), and the run index ``DIR/sae_samples_run.json`` is written last, atomically
(``run_index.write_run_index``, the index's one home beside its reader).
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from filelock import FileLock

from lightning_sae_samples.samples_dir.commit import hold_lock
from lightning_sae_samples.samples_dir.files import is_plain_file, load_json, lstat_or_none
from lightning_sae_samples.samples_dir.names import (
    LOCK_NAME,
    MANIFEST_NAME,
    RUN_INDEX_NAME,
    SUMMARY_NAME,
    WRITER_ID,
    SamplesDirectoryError,
)
from lightning_sae_samples.samples_dir.run_index import _checked_names, write_run_index

__all__ = ["check_sae_names", "claim_run_dir", "lock_run_dir", "write_run_index"]


def check_sae_names(names: Sequence[str]) -> list[str]:
    """``names`` as a list, each a valid SAE name and none twice (``ValueError`` otherwise)."""
    return _checked_names(names)


def _indexed_names(dirpath: Path) -> Optional[list[str]]:
    """The names an earlier run index of ours lists, or ``None`` when there is none (or it is not ours)."""
    path = dirpath / RUN_INDEX_NAME
    try:
        record = load_json(path) if is_plain_file(path) else None
    except SamplesDirectoryError:
        return None
    if not isinstance(record, dict) or record.get("writer") != WRITER_ID or not isinstance(record.get("saes"), list):
        return None
    return [entry["name"] for entry in record["saes"] if isinstance(entry, dict) and isinstance(entry.get("name"), str)]


def claim_run_dir(dirpath: Path, names: Sequence[str]) -> bool:
    """Check that ``dirpath`` is ours to write a run of SAEs ``names`` into.

    It may hold our lock, our run index and folders named after SAEs (of this run, or of the one its index
    lists); each SAE's folder is then claimed by the one-SAE rules when it is written.

    Returns:
        Whether it holds an earlier run of ours (its index).

    Raises:
        SamplesDirectoryError: It holds one SAE's samples directory, or entries that are not ours.
    """
    if any(lstat_or_none(dirpath / name) is not None for name in (MANIFEST_NAME, SUMMARY_NAME)):
        raise SamplesDirectoryError(
            f"{dirpath} is the samples directory of one SAE, not a run folder of many; pass another `dirpath` (each"
            " SAE of a run gets its own folder inside it)."
        )
    indexed = _indexed_names(dirpath)
    known = set(names) | set(indexed or ())
    others = sorted(
        entry.name for entry in dirpath.iterdir()
        if entry.name not in (LOCK_NAME, RUN_INDEX_NAME, f".{RUN_INDEX_NAME}.tmp")
        and not entry.name.startswith(".write_probe_")
        and not (entry.name in known and stat.S_ISDIR(entry.lstat().st_mode))
    )
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise SamplesDirectoryError(
            f"Run folder {dirpath} is not empty ({shown}) and these are not its SAEs' folders ({', '.join(names)}) or"
            f" its {RUN_INDEX_NAME}, so they are not ours to write among. Pass an empty or new `dirpath`."
        )
    return indexed is not None


def lock_run_dir(dirpath: Path, names: Sequence[str]) -> FileLock:
    """Create ``dirpath``, check it is ours (:func:`claim_run_dir`) and take its lock (held until released).

    Raises:
        SamplesDirectoryError: Another writer holds the lock, or the folder is not ours.
    """
    return hold_lock(
        dirpath, lambda path: claim_run_dir(path, names),
        "Give each run its own `dirpath`, or wait for the other run to end (a lock of a process that died is"
        " released with it).",
    )
