"""Files written through a temporary file and a rename: a crash leaves the old file or the new one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

import torch

from lightning_sae_samples.samples_dir.files import samples_dir_of
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file next to ``path``, flush it to disk, then rename it to ``path``.

    On failure the temporary file is removed at once (a full disk gets its space back), and an error whose cause
    is an ``OSError`` (``torch.save`` reports a full disk as ``RuntimeError: ... unexpected pos``, the
    ``OSError`` chained to it) is raised as that ``OSError``, naming ``path``.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = _os_error_behind(err)
        if cause is None or cause is err:
            raise
        raise OSError(cause.errno, f"Cannot write {path}: {cause.strerror or cause} ({type(err).__name__}:"
                                   f" {' '.join(str(err).split())[:200]})") from err


def _os_error_behind(err: BaseException) -> Optional[OSError]:
    """The first ``OSError`` along ``err``'s chain of causes and contexts (``err`` itself included)."""
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, payload: Any) -> bytes:
    """Write strict JSON (no NaN/Infinity) atomically; returns the bytes written."""
    data = json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False).encode("utf-8")
    atomic_write_bytes(path, data)
    return data


def atomic_torch_save(path: Path, payload: dict) -> None:
    """``torch.save`` a dict of tensors atomically."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def write_text_file(output_path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` as UTF-8 to ``output_path`` atomically, in a folder that must exist.

    Raises:
        SamplesDirectoryError: ``output_path`` is a file of a samples directory (see
            :func:`~lightning_sae_samples.samples_dir.files.samples_dir_of`): a report never replaces the run's files.
        FileNotFoundError: The folder does not exist.
    """
    path = Path(output_path)
    refuse_samples_dir_file(path, "a report")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Cannot write {path}: the folder {path.parent} does not exist. Create it first.")
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def refuse_samples_dir_file(path: Path, what: str) -> None:
    """Raise :class:`SamplesDirectoryError` if ``path`` is a file of a samples directory, naming it and the fix."""
    samples_dir = samples_dir_of(path)
    if samples_dir is not None:
        raise SamplesDirectoryError(
            f"Will not write {what} to {path}: it is a file of the samples directory {samples_dir}, which only the"
            " run writes. Choose a path outside it, e.g. report.html."
        )
