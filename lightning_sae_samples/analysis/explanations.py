"""The explanations sidecar: ``DIR/explanations/explanations.jsonl``, one record per line, appended under a lock.

The sidecar is the explainer's own file, beside the collection and outside what a save rewrites: a later save of
the same run keeps it. Records are only ever appended; the latest record per latent and kind is what counts, so
a newer explanation or a label typed on a page replaces an older one without rewriting the file. A crash in the
middle of an append leaves at most a torn last line, which readers ignore (with a warning) and the next append
cuts off before writing.
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from filelock import FileLock

from lightning_sae_samples.samples_dir.files import lstat_or_none
from lightning_sae_samples.samples_dir.names import (
    EXPLANATIONS_DIR,
    EXPLANATIONS_LOCK,
    EXPLANATIONS_NAME,
    PathLike,
    SamplesDirectoryError,
)

KINDS = ("explanation", "label")
SOURCES = ("explain", "label", "delphi", "neuronpedia")
#: Longest text a record may hold; longer text in a file is refused (a page shows explanations whole).
MAX_TEXT_CHARS = 10_000
_MAX_NAME_CHARS = 1_000


def utc_now() -> str:
    """The current time as ISO 8601 UTC, second precision (``2026-12-03T13:45:00+00:00``)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


class InvalidRecordError(ValueError):
    """An explanation record with a field of the wrong kind; :attr:`problem` names it."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"Invalid explanation record: {problem}.")
        self.problem = problem


@dataclass(frozen=True)
class ExplanationRecord:
    """One explanation or label of one latent.

    Attributes:
        latent: Feature index.
        text: The explanation, or the label a person typed.
        kind: ``"explanation"`` (from a model or an import) or ``"label"`` (typed by a person).
        score: Detection score (balanced accuracy in ``[0, 1]``), or ``None`` if not scored.
        score_contexts: How many contexts the score was computed on.
        random_score: The same scorer's result for a random explanation of this latent (the noise baseline).
        model: The model that wrote the explanation (``""`` for a label).
        prompt_version: Version of the explainer's prompt (``""`` for a label or an import without one).
        samples_step: The ``global_step`` of the save whose samples the explanation was written from.
        source: ``"explain"``, ``"label"``, ``"delphi"`` or ``"neuronpedia"``.
        time: When the record was written, ISO 8601 UTC.
        embedding_score: Embedding AUROC in ``[0, 1]``: how well the cosine similarity of the explanation's sentence
            embedding separates held-out activating contexts from non-activating ones; ``None`` if not scored.
        embedding_contexts: How many contexts the embedding AUROC was computed on.
        embedding_random_score: The embedding AUROC of the random explanation (the noise baseline).
    """

    latent: int
    text: str
    kind: str = "explanation"
    score: Optional[float] = None
    score_contexts: Optional[int] = None
    random_score: Optional[float] = None
    model: str = ""
    prompt_version: str = ""
    samples_step: int = 0
    source: str = "explain"
    time: str = field(default_factory=utc_now)
    embedding_score: Optional[float] = None
    embedding_contexts: Optional[int] = None
    embedding_random_score: Optional[float] = None

    def __post_init__(self) -> None:
        problem = _record_problem(self.to_json())
        if problem is not None:
            raise InvalidRecordError(problem)

    def to_json(self) -> dict:
        """The record as the JSON object written on one line of the sidecar."""
        # Every field is a str, int, float or None: no deep copy (``asdict``) needed, which a million records feel.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_score(value: Any) -> bool:
    return value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
    )


#: Fields added after the first version of the sidecar: a line without them reads them as ``None``.
OPTIONAL_FIELDS = ("embedding_score", "embedding_contexts", "embedding_random_score")


def _missing_field(obj: dict) -> Optional[str]:
    missing = sorted(set(ExplanationRecord.__dataclass_fields__) - set(obj) - set(OPTIONAL_FIELDS))
    return f"missing field `{missing[0]}`" if missing else None


def _record_problem(obj: dict) -> Optional[str]:
    """What is wrong with a record's fields (``"field `x`: ..."``), or ``None``."""
    missing = _missing_field(obj)
    if missing:
        return missing
    checks = (
        ("latent", _is_int(obj["latent"]) and obj["latent"] >= 0, "a non-negative integer"),
        ("text", isinstance(obj["text"], str) and len(obj["text"]) <= MAX_TEXT_CHARS,
         f"a string of at most {MAX_TEXT_CHARS} characters"),
        ("kind", obj["kind"] in KINDS, f"one of {', '.join(KINDS)}"),
        ("score", _is_score(obj["score"]), "null or a number in [0, 1]"),
        ("score_contexts", obj["score_contexts"] is None or (_is_int(obj["score_contexts"])
                                                             and obj["score_contexts"] >= 0),
         "null or a non-negative integer"),
        ("random_score", _is_score(obj["random_score"]), "null or a number in [0, 1]"),
        ("model", isinstance(obj["model"], str) and len(obj["model"]) <= _MAX_NAME_CHARS, "a short string"),
        ("prompt_version", isinstance(obj["prompt_version"], str) and len(obj["prompt_version"]) <= _MAX_NAME_CHARS,
         "a short string"),
        ("samples_step", _is_int(obj["samples_step"]) and obj["samples_step"] >= 0, "a non-negative integer"),
        ("source", obj["source"] in SOURCES, f"one of {', '.join(SOURCES)}"),
        ("time", isinstance(obj["time"], str) and _is_iso_time(obj["time"]), "an ISO 8601 time string"),
        ("embedding_score", _is_score(obj.get("embedding_score")), "null or a number in [0, 1]"),
        ("embedding_contexts", obj.get("embedding_contexts") is None or (
            _is_int(obj["embedding_contexts"]) and obj["embedding_contexts"] >= 0), "null or a non-negative integer"),
        ("embedding_random_score", _is_score(obj.get("embedding_random_score")), "null or a number in [0, 1]"),
    )
    for name, ok, what in checks:
        if not ok:
            return f"field `{name}` must be {what}, got {_shown(obj[name])}"
    return None


def _is_iso_time(text: str) -> bool:
    if len(text) > 64:
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def explanations_path(samples_dir: PathLike) -> Path:
    """Where the sidecar of ``samples_dir`` lives (it may not exist yet)."""
    return Path(samples_dir) / EXPLANATIONS_DIR / EXPLANATIONS_NAME


def _checked_folder(samples_dir: PathLike, create: bool) -> Optional[Path]:
    """The sidecar's folder, a real directory (never a link); ``None`` if absent and not created."""
    folder = Path(samples_dir) / EXPLANATIONS_DIR
    info = lstat_or_none(folder)
    if info is None:
        if not create:
            return None
        if not Path(samples_dir).is_dir():
            raise SamplesDirectoryError(f"Samples directory {samples_dir} does not exist.")
        folder.mkdir(exist_ok=True)
        info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise SamplesDirectoryError(
            f"{folder} is not a directory (a link or a file); explanations live in a real `{EXPLANATIONS_DIR}/`"
            " folder of the samples directory. Move it away."
        )
    return folder


def _checked_file(folder: Path) -> Optional[Path]:
    path = folder / EXPLANATIONS_NAME
    info = lstat_or_none(path)
    if info is None:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise SamplesDirectoryError(f"{path} is not a regular file (a link is never followed). Move it away.")
    return path


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _decoded(raw: bytes) -> Any:
    """One line's JSON value; a ``ValueError`` for anything that is not strict JSON a writer could have written."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply to be an explanation record") from None


def _record_of(obj: Any, where: str) -> ExplanationRecord:
    """The record a decoded line holds; ``SamplesDirectoryError`` naming ``where`` and the field if it is not one."""
    if not isinstance(obj, dict):
        raise SamplesDirectoryError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    problem = _missing_field(obj)
    if problem is None:
        try:  # the record checks its fields, once
            return ExplanationRecord(**{name: obj.get(name) for name in ExplanationRecord.__dataclass_fields__})
        except InvalidRecordError as err:
            problem = err.problem
    raise SamplesDirectoryError(f"{where}: {problem}.")


def iter_explanation_records(samples_dir: PathLike) -> Iterator[ExplanationRecord]:
    """Every record of the sidecar in file order, read line by line (nothing if there is none).

    A torn last line (a crash in the middle of an append) is skipped with a warning.

    Raises:
        SamplesDirectoryError: A line is not a valid record (the error names the file, the line and the field),
            or the sidecar is a link.
    """
    folder = _checked_folder(samples_dir, create=False)
    path = _checked_file(folder) if folder is not None else None
    if path is None:
        return
    with open(path, "rb") as handle:
        number = 0
        for raw in handle:
            number += 1
            torn = not raw.endswith(b"\n")
            if not raw.strip():
                continue
            try:
                obj = _decoded(raw)
            except (UnicodeDecodeError, ValueError) as err:
                if torn:
                    warnings.warn(
                        f"Ignored the last line ({number}) of {path}: it is incomplete (an append was"
                        " interrupted); the next append removes it.",
                        UserWarning,
                        stacklevel=2,
                    )
                    return
                raise SamplesDirectoryError(f"{path}, line {number}: not a JSON object ({err}).") from err
            yield _record_of(obj, f"{path}, line {number}")


def read_explanations(samples_dir: PathLike, kind: str = "explanation") -> dict[int, ExplanationRecord]:
    """The latest record of ``kind`` per latent (``{}`` without a sidecar).

    Raises:
        SamplesDirectoryError: As :func:`iter_explanation_records`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    latest: dict[int, ExplanationRecord] = {}
    for record in iter_explanation_records(samples_dir):
        if record.kind == kind:
            latest[record.latent] = record
    return latest


def read_labels(samples_dir: PathLike) -> dict[int, ExplanationRecord]:
    """The latest label a person gave each latent (``{}`` without a sidecar)."""
    return read_explanations(samples_dir, kind="label")


def _cut_torn_tail(handle: Any) -> None:
    """Truncate a last line that has no newline (an interrupted append), so the next record starts a line."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return
    end = size
    block = 1 << 16
    while end > 0:
        start = max(0, end - block)
        handle.seek(start)
        chunk = handle.read(end - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            handle.truncate(start + cut + 1)
            return
        end = start
    handle.truncate(0)


def append_explanations(samples_dir: PathLike, records: Iterable[ExplanationRecord]) -> int:
    """Append records to the sidecar of ``samples_dir`` under its lock, flushed to disk before returning.

    Returns:
        How many records were appended.

    Raises:
        SamplesDirectoryError: The samples directory is missing, or the sidecar's folder or file is a link.
    """
    lines = [json.dumps(r.to_json(), ensure_ascii=False, allow_nan=False) + "\n" for r in records]
    if not lines:
        return 0
    folder = _checked_folder(samples_dir, create=True)
    assert folder is not None
    with FileLock(folder / EXPLANATIONS_LOCK):
        _checked_file(folder)
        path = folder / EXPLANATIONS_NAME
        created = lstat_or_none(path) is None
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(path, flags, 0o644), "r+b") as handle:
            _cut_torn_tail(handle)
            handle.seek(0, os.SEEK_END)
            handle.write("".join(lines).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            _fsync_dir(folder)
    return len(lines)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_new_records(samples_dir: PathLike, offset: int = 0) -> tuple[list[ExplanationRecord], int]:
    """The records of the complete lines after byte ``offset`` of the sidecar, and the offset after them.

    The sidecar only grows (records are appended), so a reader that keeps the offset reads each line once: `serve`
    follows an explainer's appends this way. An incomplete last line is left for the next call.

    Raises:
        SamplesDirectoryError: A line is not a valid record (naming the file and the line's byte offset), or the
            sidecar is a link.
    """
    folder = _checked_folder(samples_dir, create=False)
    path = _checked_file(folder) if folder is not None else None
    if path is None:
        return [], 0
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    records = []
    at = offset
    for raw in data[:end].splitlines(keepends=True):
        where, at = at, at + len(raw)
        if not raw.strip():
            continue
        try:
            obj = _decoded(raw)
        except (UnicodeDecodeError, ValueError) as err:
            raise SamplesDirectoryError(f"{path}, line at byte {where}: not a JSON object ({err}).") from err
        records.append(_record_of(obj, f"{path}, line at byte {where}"))
    return records, offset + end
