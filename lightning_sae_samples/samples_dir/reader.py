"""Open a samples directory without modifying it; everything read is validated, and comes from one save."""

from __future__ import annotations

import os
import stat
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, TypeVar

import torch

from lightning_sae_samples.samples_dir.commit import commit_plan, load_commit
from lightning_sae_samples.samples_dir.files import is_plain_file, json_problem, load_json, lstat_or_none
from lightning_sae_samples.samples_dir.names import (
    _FEATURE_FILE,
    COMMIT_NAME,
    DECODER_NAME,
    FULL_STATE_INDEX_NAME,
    FULL_STATE_NAME,
    HISTORY_INDEX_NAME,
    HISTORY_NAME,
    MANIFEST_NAME,
    PENDING_DIR,
    SUMMARY_NAME,
    PathLike,
    SamplesDirectoryError,
    is_writer_name,
)
from lightning_sae_samples.samples_dir.parts import load_parts
from lightning_sae_samples.state.schema import FORMAT_VERSION, check_state_version
from lightning_sae_samples.state.validate import check_state

_T = TypeVar("_T")
#: How long a reader keeps redoing a read that a commit overlapped before it gives up (``SaveChangedError``).
READ_DEADLINE_SECONDS = 10.0
#: The first pause between two reads, doubled after each overlap up to the longest: a commit takes milliseconds.
_FIRST_PAUSE_SECONDS, _LONGEST_PAUSE_SECONDS = 0.005, 0.1


class SaveChangedError(SamplesDirectoryError):
    """Saves kept being committed while reading, for the whole deadline: reading again later gets one whole save."""


def retry_pauses(seconds: float = READ_DEADLINE_SECONDS) -> Iterator[None]:
    """One turn per attempt, the next after a short pause (doubling, capped) while ``seconds`` have not passed.

    There are always two turns at least: one more after the first pause, however short ``seconds`` is.
    """
    deadline = time.monotonic() + seconds
    pause = _FIRST_PAUSE_SECONDS
    yield
    while True:
        time.sleep(pause)
        yield
        if time.monotonic() >= deadline:
            return
        pause = min(2 * pause, _LONGEST_PAUSE_SECONDS)


def file_identity(path: Path) -> Optional[tuple[int, int, int]]:
    """Inode, size and modification time of ``path`` (not followed if a link), or ``None`` if it is not there."""
    info = lstat_or_none(path)
    return None if info is None else (info.st_ino, info.st_size, info.st_mtime_ns)


def save_signature(path: PathLike) -> tuple:
    """What changes when a save is committed: the manifest's, summary's and commit record's identity.

    The commit protocol moves the manifest into place last and the commit record exists while files move, so two
    equal signatures taken before and after reading mean that no commit ran in between (``docs/format.md``).
    """
    path = Path(path)
    names = (MANIFEST_NAME, SUMMARY_NAME, f"{PENDING_DIR}/{COMMIT_NAME}")
    return tuple(file_identity(path / name) for name in names)


def read_one_save(path: PathLike, read: Callable[[], _T], seconds: float = READ_DEADLINE_SECONDS
                  ) -> tuple[_T, tuple]:
    """``read()``, redone until it ran while no save was committed; returns its result and the save's signature.

    A read counts when :func:`save_signature` is the same before and after it. An error counts the same way, but
    not while a commit record is there (its files may still be moving): it is retried, and raised only if the
    directory stays as it is (an interrupted commit whose files really are bad). Reads are redone after short
    pauses for up to ``seconds``: a training run's saves leave far longer gaps than a read takes.

    Raises:
        SaveChangedError: A save was committed during every read for ``seconds``.
        SamplesDirectoryError: What ``read`` raised on a directory that did not change meanwhile.
    """
    error: Optional[Exception] = None
    before = after = None
    reads = 0
    for _ in retry_pauses(seconds):
        reads += 1
        before = save_signature(path)
        try:
            result, error = read(), None
        except (SamplesDirectoryError, OSError) as err:
            result, error = None, err
        after = save_signature(path)
        if after == before and (error is None or before[2] is None):
            if error is not None:
                raise error
            return result, before  # type: ignore[return-value]
    if error is not None and after == before:
        raise error
    raise SaveChangedError(
        f"{path}: a save was committed while reading; retry ({reads} reads in {seconds:g} s each overlapped"
        " a commit)."
    )


def pin(path: Optional[Path]) -> Optional[IO[bytes]]:
    """``path`` opened for reading, so that a later read gets this save's file even after a commit replaced it.

    A commit replaces files by renaming over them, which leaves an open file as it was (POSIX). Elsewhere a file
    held open would make the writer's rename fail, so nothing is pinned there (``None``), nor a missing file.
    """
    if path is None or os.name != "posix":
        return None
    try:
        return open(path, "rb")  # noqa: SIM115 - held until read, or closed with its owner
    except OSError:
        return None


@dataclass
class SamplesDirectory:
    """What a samples directory holds, with an interrupted commit already resolved.

    Attributes:
        path: The directory.
        summary: Parsed ``collection_summary.json``.
        feature_files: Feature index to the file holding its samples.
        full_state_path: The full-state file (or the index of its parts), if present.
        decoder_path: The decoder directions file (``decoder_directions.pt``), if present.
    """

    path: Path
    summary: dict
    feature_files: dict[int, Path]
    full_state_path: Optional[Path]
    #: The history file (``training_history.pt``, or the index of its parts), if present.
    history_path: Optional[Path] = None
    #: The decoder directions (``decoder_directions.pt``), if present.
    decoder_path: Optional[Path] = None


def _visible_files(dirpath: Path) -> dict[str, Path]:
    """Our files in ``dirpath``, overlaid by a committed but unfinished save, by the writer's rules."""
    files = {}
    for p in dirpath.iterdir():
        if not is_writer_name(p.name) or p.name == MANIFEST_NAME:
            continue
        info = lstat_or_none(p)
        if info is None:
            continue  # moved or removed by a commit since the listing: the read is redone
        if stat.S_ISREG(info.st_mode):
            files[p.name] = p
        else:  # a link (even to a regular file) or a folder: never followed, as the writer's rule
            warnings.warn(f"Ignored {p}: not a regular file (links are not followed).", UserWarning, stacklevel=3)
    pending = dirpath / PENDING_DIR
    record = load_commit(pending)
    if record is not None:
        moves, removes = commit_plan(dirpath, record)
        for name in removes:
            files.pop(name, None)
        for name in moves:
            if name != MANIFEST_NAME and is_plain_file(pending / name):
                files[name] = pending / name
    return files


def read_samples_dir(path: PathLike) -> SamplesDirectory:
    """Open a samples directory without modifying it.

    Raises:
        SamplesDirectoryError: The directory is missing, holds no samples, is corrupt, or was written
            by an incompatible version.
    """
    dirpath = Path(path)
    if dirpath.exists() and not dirpath.is_dir():
        raise SamplesDirectoryError(
            f"{dirpath} is not a directory. Pass the samples directory the callback wrote to (its `dirpath`), not a"
            " file in it."
        )
    if not dirpath.is_dir():
        raise SamplesDirectoryError(
            f"Samples directory {dirpath} does not exist. Pass the `dirpath` the callback wrote to"
            " (default: <log_dir>/activation_samples)."
        )
    files = _visible_files(dirpath)
    if SUMMARY_NAME not in files:
        raise SamplesDirectoryError(
            f"{dirpath} holds no samples: {SUMMARY_NAME} is missing. A run writes it at each checkpoint"
            " and at the end of training."
        )
    summary = load_json(files[SUMMARY_NAME])
    if not isinstance(summary, dict) or "format_version" not in summary:
        raise SamplesDirectoryError(f"{files[SUMMARY_NAME]} has no `format_version`; it is not a samples summary.")
    problem = json_problem(summary)
    if problem is not None:
        raise SamplesDirectoryError(f"{files[SUMMARY_NAME]} is not a valid samples summary: {problem}. Re-run the"
                                    " save.")
    if summary["format_version"] != FORMAT_VERSION:
        raise SamplesDirectoryError(
            f"{files[SUMMARY_NAME]} has format_version {summary['format_version']}, this version reads"
            f" {FORMAT_VERSION}. Install the lightning-sae-samples version that wrote it."
        )
    features = {int(m.group(1)): p for name, p in files.items() if (m := _FEATURE_FILE.fullmatch(name))}
    full_state = files.get(FULL_STATE_NAME) or files.get(FULL_STATE_INDEX_NAME)
    history = files.get(HISTORY_NAME) or files.get(HISTORY_INDEX_NAME)
    return SamplesDirectory(dirpath, summary, features, full_state, history, files.get(DECODER_NAME))


def part_locator(index_path: Path) -> Callable[[str], Optional[Path]]:
    """Where each file of the save an index of parts belongs to is (a commit may be in progress)."""
    dirpath = index_path.parent.parent if index_path.parent.name == PENDING_DIR else index_path.parent
    return _visible_files(dirpath).get


def load_full_state(path: PathLike, opened: Optional[IO[bytes]] = None) -> dict:
    """Load a full-state file safely (tensors only, no pickle); of a full state in parts, its index joins them.

    A single file is read from ``opened`` (``path`` held open) if given.

    Raises:
        SamplesDirectoryError: The file is corrupt, or holds a state of another format version (the dense
            layout of version 1 included).
    """
    path = Path(path)
    if path.name == FULL_STATE_INDEX_NAME:
        return load_parts(path, part_locator(path))
    try:
        if opened is not None:
            opened.seek(0)
        state = torch.load(path if opened is None else opened, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise SamplesDirectoryError(f"Cannot load {path}: {err}. The file is corrupt or unreadable.") from err
    try:
        check_state_version(state, f"full-state file {path}")
    except ValueError as err:
        raise SamplesDirectoryError(str(err)) from err
    try:
        check_state(state)
    except ValueError as err:
        raise SamplesDirectoryError(f"{path} is not a usable collector state: {err}. Re-run the save.") from err
    return state


def find_samples_dirs(
    root: PathLike, depth: int, limit: int, markers: tuple[str, ...] = (SUMMARY_NAME,)
) -> list[Path]:
    """Folders below ``root`` (at most ``depth`` levels, hidden ones skipped, links not followed) holding a marker.

    A folder that holds one is not searched further. At most ``limit`` are returned, in walk order (sorted names).
    """
    found: list[Path] = []
    start = os.path.normpath(root)
    for current, dirs, files in os.walk(start):
        level = 0 if current == start else os.path.relpath(current, start).count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level < depth else []
        if current != start and any(name in files for name in markers):
            found.append(Path(current))
            dirs[:] = []
            if len(found) >= limit:
                break
    return found
