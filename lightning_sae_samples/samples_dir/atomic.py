"""Files written through a temporary file and a rename: a crash leaves the old file or the new one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Callable, Union

import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file next to ``path``, flush it to disk, then rename it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write strict JSON (no NaN/Infinity) atomically."""
    text = json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False)
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(path: Path, payload: dict) -> None:
    """``torch.save`` a dict of tensors atomically."""
    atomic_write(path, lambda handle: torch.save(payload, handle))


def write_text_file(output_path: Union[str, os.PathLike], text: str) -> Path:
    """Write ``text`` as UTF-8 to ``output_path`` atomically, in a folder that must exist."""
    path = Path(output_path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Cannot write {path}: the folder {path.parent} does not exist. Create it first.")
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
