"""Crash points: run a function in a forked child that dies just before its i-th file-system operation.

In the spirit of SQLite's crash tests: rather than killing a process at random times (which misses short
windows), count the operations that change a folder (``open`` for writing, ``mkdir``, ``rename``/``replace``,
``remove``/``unlink``, ``rmdir``, ``fsync``) through Python's audit hooks, then, for each ``i``, fork a child that
calls ``os._exit`` just before operation ``i``. The parent then restarts the work and checks what the crash left.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

#: Exit codes of the child.
CRASHED, FINISHED, FAILED = 75, 0, 76

_CHANGING_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _operation(event: str, args: tuple) -> Optional[tuple[str, str]]:
    """``(kind, path)`` of an audit event that changes the file system, else ``None``."""
    if event == "open":
        path, _mode, flags = args
        if not isinstance(path, (str, bytes, os.PathLike)) or not isinstance(flags, int):
            return None
        return ("write", os.fsdecode(path)) if flags & _CHANGING_FLAGS else None
    if event in ("os.mkdir", "os.remove", "os.rmdir"):
        return event[3:], os.fsdecode(args[0])
    if event == "os.rename":
        return "rename", os.fsdecode(args[0])
    return None


def _under(path: str, root: str) -> bool:
    path = os.path.abspath(path)
    return path == root or path.startswith(root + os.sep)


def run_in_child(fn: Callable[[], None], root: Path, crash_at: Optional[int] = None) -> tuple[int, list[list[str]]]:
    """Run ``fn`` in a forked child; it dies before its ``crash_at``-th operation under ``root`` (if given).

    Returns:
        The child's exit code (:data:`CRASHED`, :data:`FINISHED` or :data:`FAILED`) and, when it finished, the
        operations it did under ``root`` in order, as ``[kind, path relative to root]``.
    """
    root_str = os.path.abspath(root)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        if "torch" in sys.modules:
            # The parent's OpenMP thread pool does not survive a fork: a parallel region would wait on it for
            # ever. One thread runs every operator inline, as in a DataLoader worker.
            sys.modules["torch"].set_num_threads(1)
        done: list[list[str]] = []

        def count(kind: str, path: str) -> None:
            if not _under(path, root_str):
                return
            if crash_at is not None and len(done) == crash_at:
                os._exit(CRASHED)
            done.append([kind, os.path.relpath(os.path.abspath(path), root_str)])

        def hook(event: str, args: tuple) -> None:
            operation = _operation(event, args)
            if operation is not None:
                count(*operation)

        real_fsync = os.fsync

        def fsync(fd) -> None:
            try:
                count("fsync", os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}"))
            except OSError:
                pass
            real_fsync(fd)  # a no-op where the test replaced it

        code = FAILED
        try:
            os.fsync = fsync
            sys.addaudithook(hook)
            fn()
            code = FINISHED
        except BaseException:  # noqa: BLE001 - reported to the parent through the exit code and stderr
            traceback.print_exc()
        finally:
            try:
                os.write(write_end, json.dumps(done).encode())
            finally:
                os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, json.loads(data) if data else []


def count_operations(fn: Callable[[], None], root: Path) -> list[list[str]]:
    """The file-system operations ``fn`` does under ``root``, run to the end in a forked child."""
    code, operations = run_in_child(fn, root)
    assert code == FINISHED, f"the uninterrupted run failed (exit {code}); see its traceback above"
    return operations


def crash_before(i: int, fn: Callable[[], None], root: Path) -> None:
    """Run ``fn`` in a forked child that dies just before its ``i``-th operation under ``root``."""
    code, _ = run_in_child(fn, root, crash_at=i)
    assert code == CRASHED, f"the child did not reach operation {i} (exit {code})"


def files_of(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every regular file below ``root`` (relative path to bytes), except names in ``skip``."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and not path.is_symlink() and path.name not in skip:
            out[str(path.relative_to(root))] = path.read_bytes()
    return out


def one_of_each_kind(operations: list[list[str]], indices) -> list[int]:
    """Of ``indices``, the first operation of each kind on each kind of file (feature files count as one name).

    A crash point that restarts a whole training run costs two runs, so those tests take one of each, while the
    collector's tests take every operation.
    """
    chosen: dict[tuple[str, str], int] = {}
    for i in indices:
        kind, path = operations[i]
        what = re.sub(r"\.new-.*", ".new", re.sub(r"feature_\d+", "feature", Path(path).name))
        chosen.setdefault((kind, what), i)
    return sorted(chosen.values())
