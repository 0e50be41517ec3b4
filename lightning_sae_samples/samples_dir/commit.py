"""The commit protocol: pending directory, ``COMMIT`` record, manifest, and what is ours to touch."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock, Timeout

from lightning_sae_samples.samples_dir.atomic import atomic_write_json
from lightning_sae_samples.samples_dir.files import is_plain_file, load_json, lstat_or_none
from lightning_sae_samples.samples_dir.names import (
    COMMIT_NAME,
    DECODER_NAME,
    EXPLANATIONS_DIR,
    EXPLANATIONS_LOCK,
    EXPLANATIONS_NAME,
    FULL_STATE_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    PENDING_DIR,
    PENDING_MARKER,
    PENDING_STAGING_PREFIX,
    SNAPSHOTS_DIR,
    SUMMARY_NAME,
    WRITER_ID,
    PathLike,
    SamplesDirectoryError,
    _is_stale_name,
    is_writer_name,
)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _writer_names(names: Any, source: Path, field: str) -> list[str]:
    """The entries of a record read from disk that are names this writer produces; the rest is ignored."""
    if not isinstance(names, list):
        _warn(f"Ignored `{field}` in {source}: expected a list of file names, got {type(names).__name__}.")
        return []
    kept = [name for name in names if is_writer_name(name)]
    for name in names:
        if not is_writer_name(name):
            _warn(
                f"Ignored {name!r} in `{field}` of {source}: not a file name this writer produces (only"
                f" {SUMMARY_NAME}, {FULL_STATE_NAME}, {DECODER_NAME}, {MANIFEST_NAME} and feature_NNNNN_samples.json,"
                " no paths)."
            )
    return kept


def _is_empty_dir(path: Path) -> bool:
    info = lstat_or_none(path)
    return info is not None and stat.S_ISDIR(info.st_mode) and not any(path.iterdir())


#: The marker's temporary name while it is written (see :func:`~.atomic.atomic_write`).
_MARKER_TMP = f".{PENDING_MARKER}.tmp"


def _entries(path: Path) -> Optional[set[str]]:
    """The names in ``path`` if it is a real directory (not a symlink), else ``None``."""
    info = lstat_or_none(path)
    if info is None or not stat.S_ISDIR(info.st_mode):
        return None
    return set(os.listdir(path))


def _is_half_made_pending(pending: Path) -> bool:
    """A pending directory that earlier versions created, then died before its marker was complete.

    Those versions made the directory first and wrote the marker into it after, so a kill in between left
    ``.sae_samples_pending/`` holding only the marker's temporary file; it is ours and is cleared like one.
    """
    return _entries(pending) == {_MARKER_TMP} and is_plain_file(pending / _MARKER_TMP)


def _is_our_staging(path: Path) -> bool:
    """A folder where a save was making its pending directory when it died: our name, and only our marker in it."""
    if not path.name.startswith(PENDING_STAGING_PREFIX):
        return False
    names = _entries(path)
    return names is not None and names <= {PENDING_MARKER, _MARKER_TMP} and all(
        is_plain_file(path / name) for name in names
    )


def create_pending(dirpath: Path) -> Path:
    """Make the pending directory with its marker already inside, so it is never seen without one.

    The directory is made under a unique staging name, given its marker, and renamed into place (one atomic
    step). A crash before the rename leaves only the staging folder, which the next save clears.
    """
    pending = dirpath / PENDING_DIR
    staging = dirpath / f"{PENDING_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(staging)
    try:
        atomic_write_json(staging / PENDING_MARKER, {"writer": WRITER_ID})
        os.rename(staging, pending)
    except BaseException:
        _clear_staging(staging)
        raise
    return pending


def _clear_staging(staging: Path) -> None:
    """Remove a staging folder of ours (its marker files, then the folder); anything else leaves it in place."""
    if not _is_our_staging(staging):
        return
    try:
        for name in (_MARKER_TMP, PENDING_MARKER):
            (staging / name).unlink(missing_ok=True)
        staging.rmdir()
    except OSError:
        pass


def _pending_is_ours(pending: Path) -> bool:
    """A real directory (not a symlink) holding our marker file, or one an older version left without it."""
    info = lstat_or_none(pending)
    if info is None or not stat.S_ISDIR(info.st_mode):
        return False
    if _is_half_made_pending(pending):
        return True
    if not is_plain_file(pending / PENDING_MARKER):
        return False
    try:
        marker = json.loads((pending / PENDING_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(marker, dict) and marker.get("writer") == WRITER_ID


def foreign_entries(dirpath: PathLike) -> list[Path]:
    """Pending and staging directories in ``dirpath`` that this writer did not create; they are left alone."""
    dirpath = Path(dirpath)
    found = []
    for name in (PENDING_DIR, ".pending"):
        path = dirpath / name
        if lstat_or_none(path) is not None and not _pending_is_ours(path) and not _is_empty_dir(path):
            found.append(path)
    found.extend(
        path for path in sorted(dirpath.glob(f"{PENDING_STAGING_PREFIX}*")) if not _is_our_staging(path)
    )
    return found


def read_manifest(dirpath: PathLike) -> Optional[list[str]]:
    """The files the last committed save wrote into ``dirpath``, or ``None`` if it holds no manifest.

    Raises:
        SamplesDirectoryError: The manifest exists but is not one this writer wrote.
    """
    path = Path(dirpath) / MANIFEST_NAME
    if lstat_or_none(path) is None:
        return None
    record = load_json(path) if is_plain_file(path) else None
    if not isinstance(record, dict) or record.get("writer") != WRITER_ID:
        raise SamplesDirectoryError(
            f"{path} is not a manifest written by {WRITER_ID}. Remove it only if the directory is yours to"
            " overwrite, or pass another `dirpath`."
        )
    return _writer_names(record.get("files"), path, "files")


def _holds_only_snapshots(path: Path) -> bool:
    """A real directory (not a link) whose entries are all ``step_<N>`` samples directories of ours."""
    info = lstat_or_none(path)
    if info is None or not stat.S_ISDIR(info.st_mode):
        return False
    return all(
        re.fullmatch(r"step_\d+", child.name) and (read_manifest(child) is not None
                                                   or _commits_a_manifest(child / PENDING_DIR)
                                                   or (_entries(child) is not None and not _foreign_names(child)))
        for child in path.iterdir()
    )


def _holds_only_explanations(path: Path) -> bool:
    """A real directory (not a link) holding nothing but the explainer's sidecar and its lock."""
    info = lstat_or_none(path)
    if info is None or not stat.S_ISDIR(info.st_mode):
        return False
    return all(child.name in (EXPLANATIONS_NAME, EXPLANATIONS_LOCK) for child in path.iterdir())


def _foreign_names(dirpath: Path) -> list[str]:
    """The entries of a directory without a save of ours that are not what our runs leave there, sorted."""
    return sorted(
        p.name
        for p in dirpath.iterdir()
        if p.name != LOCK_NAME
        and not (p.name == PENDING_DIR and (_pending_is_ours(p) or _is_empty_dir(p)))
        and not _is_our_staging(p)
        and not p.name.startswith(".write_probe_")
        and not (p.name == SNAPSHOTS_DIR and _holds_only_snapshots(p))
        and not (p.name == EXPLANATIONS_DIR and _holds_only_explanations(p))
    )


def claim_samples_dir(dirpath: PathLike) -> bool:
    """Check that ``dirpath`` is ours to write.

    Returns:
        ``True`` if it holds an earlier save of ours (its manifest), ``False`` if it is empty (ignoring our
        lock file and a pending directory of ours).

    Raises:
        SamplesDirectoryError: The directory is not empty and holds no manifest of ours.
    """
    dirpath = Path(dirpath)
    if read_manifest(dirpath) is not None or _commits_a_manifest(dirpath / PENDING_DIR):
        return True
    others = _foreign_names(dirpath)
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise SamplesDirectoryError(
            f"Samples directory {dirpath} is not empty ({shown}) and holds no {MANIFEST_NAME} of an earlier"
            f" {WRITER_ID} save, so its files are not ours to overwrite or delete. Pass an empty or new"
            " `dirpath`, or move its contents away."
        )
    return False


def load_commit(pending: Path) -> Optional[dict]:
    """The commit record of our pending directory, or ``None`` when there is none (or it is not ours)."""
    commit = pending / COMMIT_NAME
    if not _pending_is_ours(pending) or not is_plain_file(commit):
        return None
    try:
        record = load_json(commit)
    except SamplesDirectoryError as err:
        _warn(f"Ignored the commit record: {err}")
        return None
    if not isinstance(record, dict):
        _warn(f"Ignored {commit}: not a commit record.")
        return None
    return record


def _commits_a_manifest(pending: Path) -> bool:
    """Whether our pending directory holds a commit (interrupted while moving) that brings a manifest."""
    record = load_commit(pending)
    files = record.get("files") if record is not None else None
    return isinstance(files, list) and MANIFEST_NAME in files and is_plain_file(pending / MANIFEST_NAME)


def commit_plan(dirpath: Path, record: dict) -> tuple[list[str], list[str]]:
    """The names a commit record may move into place and remove, by the rules for untrusted records.

    A file may be removed only if it is a feature file or the full-state file that the manifest on disk lists
    (what the previous save wrote) and the commit does not write it again.
    """
    source = dirpath / PENDING_DIR / COMMIT_NAME
    moves = _writer_names(record.get("files", []), source, "files")
    previous = set(read_manifest(dirpath) or ())
    removes = []
    for name in _writer_names(record.get("remove", []), source, "remove"):
        if _is_stale_name(name) and name in previous and name not in moves:
            removes.append(name)
        elif _is_stale_name(name) and name not in moves and lstat_or_none(dirpath / name) is None:
            pass  # removed already: this commit moved its manifest in, or an interrupted one got this far
        else:
            _warn(f"Ignored {name!r} in `remove` of {source}: not a stale file of the last save's manifest.")
    return moves, removes


def _move_in(pending: Path, dirpath: Path, name: str) -> None:
    source = pending / name
    info = lstat_or_none(source)
    if info is None:
        return  # moved already, before an interruption
    if not stat.S_ISREG(info.st_mode):
        _warn(f"Did not move {source} into place: not a regular file.")
        return
    os.replace(source, dirpath / name)


def _apply_commit(dirpath: Path, record: dict) -> None:
    """Move the new files into place, remove the stale ones, then move the manifest (last: it is the proof)."""
    pending = dirpath / PENDING_DIR
    moves, removes = commit_plan(dirpath, record)
    for name in moves:
        if name != MANIFEST_NAME:
            _move_in(pending, dirpath, name)
    for name in removes:
        try:
            os.unlink(dirpath / name)  # unlinks a symlink itself, never its target
        except FileNotFoundError:
            pass
    if MANIFEST_NAME in moves:
        _move_in(pending, dirpath, MANIFEST_NAME)
    (pending / COMMIT_NAME).unlink(missing_ok=True)


def _is_pending_name(name: str) -> bool:
    """A name the writer creates in its pending directory: its files, the record, the marker, their temp files."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-4]
    return name in (COMMIT_NAME, PENDING_MARKER) or is_writer_name(name)


def _clear_pending(pending: Path) -> None:
    """Remove our pending directory: only the names we write in it; anything else stays, with a warning."""
    if _is_empty_dir(pending):
        pending.rmdir()
        return
    if not _pending_is_ours(pending):
        return
    for name in os.listdir(pending):
        if _is_pending_name(name) and name != PENDING_MARKER:
            try:
                os.unlink(pending / name)  # a symlink is unlinked itself, never followed
            except IsADirectoryError:
                pass
    left = sorted(name for name in os.listdir(pending) if name != PENDING_MARKER)
    if left:
        _warn(f"Left {pending} in place: it holds entries this writer did not write ({', '.join(left[:5])}).")
        return
    (pending / PENDING_MARKER).unlink(missing_ok=True)
    pending.rmdir()


def _recover(dirpath: Path) -> None:
    """Finish an interrupted commit of ours and clear our pending directory; a foreign one is left alone."""
    pending = dirpath / PENDING_DIR
    record = load_commit(pending)
    if record is not None:
        _apply_commit(dirpath, record)
    _clear_pending(pending)
    for staging in sorted(dirpath.glob(f"{PENDING_STAGING_PREFIX}*")):
        _clear_staging(staging)


def hold_lock(dirpath: Path, claim: Callable[[Path], Any], busy_fix: str) -> FileLock:
    """Create ``dirpath``, check with ``claim`` that it is ours, and take its lock (held until released).

    Where a lock file is there already, the lock comes first: another writer's half-written save is no reason to
    call the directory foreign. ``claim`` runs again under the lock either way.

    Raises:
        SamplesDirectoryError: Another writer holds the lock (the message ends with ``busy_fix``), or ``claim``
            refused the directory.
    """
    dirpath.mkdir(parents=True, exist_ok=True)
    if lstat_or_none(dirpath / LOCK_NAME) is None:
        claim(dirpath)  # before creating a lock file in a directory that may not be ours
    lock = FileLock(dirpath / LOCK_NAME)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SamplesDirectoryError(
            f"Another run is writing samples to {str(dirpath)!r}: it holds the lock {dirpath / LOCK_NAME}. {busy_fix}"
        ) from None
    try:
        claim(dirpath)  # again under the lock
    except BaseException:
        lock.release()
        raise
    return lock
