"""The samples directory: the seed tool's JSON layout plus a full-state file, written atomically.

A save writes every new file into its pending directory first, then an atomic ``COMMIT`` record, then moves
the files into place. A crash before ``COMMIT`` leaves the previous save untouched; a crash after it
leaves a complete new save that :func:`read_samples_dir` (and the next writer) picks up.

The directory is not ours alone: everything read from it is untrusted. Only the plain names the writer
itself produces (:func:`is_writer_name`) are ever moved or removed, a save removes only stale files listed in
the manifest of the previous save, and a non-empty directory without a manifest of ours is refused. See
``docs/format.md``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from lightning_sae_samples.state_format import (
    FORMAT_VERSION,
    check_state_version,
    dense_counts,
    merge_tables,
    row_samples,
    rows_index,
)
from lightning_sae_samples.statistics import feature_statistics, rank_features, run_summary
from lightning_sae_samples.tokens import TokenDecoder

SUMMARY_NAME = "collection_summary.json"
FULL_STATE_NAME = "full_state.pt"
REPORT_NAME = "interpretability_report.md"
MANIFEST_NAME = "sae_samples_manifest.json"
LOCK_NAME = "sae_samples.lock"
PENDING_DIR = ".sae_samples_pending"
PENDING_MARKER = "WRITER"
COMMIT_NAME = "COMMIT"
WRITER_ID = "lightning-sae-samples"
_FEATURE_FILE = re.compile(r"^feature_(\d+)_samples\.json$")
_FIXED_NAMES = frozenset({SUMMARY_NAME, FULL_STATE_NAME, REPORT_NAME, MANIFEST_NAME})

PathLike = Union[str, os.PathLike]


class SamplesDirectoryError(ValueError):
    """A samples directory is missing, empty, corrupt, of an unknown format version, or not ours to write."""


def feature_filename(feature_idx: int) -> str:
    """File name of one feature's samples."""
    return f"feature_{int(feature_idx):05d}_samples.json"


def _is_feature_name(name: str) -> bool:
    match = _FEATURE_FILE.fullmatch(name)
    return match is not None and feature_filename(int(match.group(1))) == name


def _is_stale_name(name: str) -> bool:
    """A file a later save may remove when it does not write it again: a feature file or the full state."""
    return name == FULL_STATE_NAME or _is_feature_name(name)


def is_writer_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name the writer produces (no separator, no ``..``, nothing else)."""
    return isinstance(name, str) and (name in _FIXED_NAMES or _is_feature_name(name))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write strict JSON (no NaN/Infinity) atomically."""
    text = json.dumps(payload, indent=2, allow_nan=False, ensure_ascii=False)
    atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_torch_save(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def sample_records(
    state: dict,
    feature_idx: int,
    limit: int,
    decoder: TokenDecoder,
    prefix: str = "top",
    interval: Optional[int] = None,
) -> list[dict]:
    """Up to ``limit`` kept samples of one latent as JSON records (``decoder`` must be prepared).

    Args:
        state: A collector state dict.
        feature_idx: The latent.
        limit: Most samples to return, best first.
        decoder: Prepared with every token id of the windows returned.
        prefix: Which table: ``"top"``, ``"recent"`` or ``"interval"``.
        interval: The activation interval, for ``prefix="interval"``.
    """
    row = feature_idx if interval is None else feature_idx * int(state["num_intervals"]) + interval
    samples = row_samples(state[prefix], row, limit)
    half = int(state["half_window"])
    columns = zip(
        samples["values"].tolist(),
        samples["context_tokens"].tolist(),
        samples["context_acts"].tolist(),
        samples["step"].tolist(),
        samples["position"].tolist(),
    )
    records = []
    for value, window, act, step, position in columns:
        start = next(i for i, t in enumerate(window) if t >= 0)
        stop = max(i for i, t in enumerate(window) if t >= 0) + 1
        context = window[start:stop]
        centre = half - start
        records.append(
            {
                "feature_idx": int(feature_idx),
                "activation_value": value,
                "step": step,
                "position": position,
                "tokens": context[max(0, centre - 1) : centre + 1],
                "text": decoder.token_str(context[centre]),
                "context_tokens": context,
                "context_text": decoder.context_text(context),
                "context_token_strs": [decoder.token_str(t) for t in context],
                "context_activations": act[start:stop],
                "context_position": centre,
            }
        )
    return records


def with_recent_view(state: dict) -> dict:
    """A shallow copy of ``state`` whose ``recent`` table is the top over the current and previous block."""
    if "recent" not in state:
        return state
    view = dict(state)
    view["recent"] = merge_tables(state["recent"], state["recent_prev"])
    return view


def _activating_tokens(records: list[dict]) -> set[int]:
    return {r["context_tokens"][r["context_position"]] for r in records}


def sample_groups(state: dict, feature_idx: int, limit: int, decoder: TokenDecoder) -> dict[str, Any]:
    """The optional sample groups of one latent for its feature file: interval and recent samples.

    ``state`` must come through :func:`with_recent_view`. ``recent_overlap`` is the Jaccard overlap of the
    activating tokens of the recent and the all-time top samples (low: the latent's meaning moved).
    """
    groups: dict[str, Any] = {}
    if "interval" in state:
        edges = [float(e) for e in state["interval_edges"]]
        counts = dense_counts(state["interval_count"], slice(feature_idx, feature_idx + 1))[0].tolist()
        groups["interval_samples"] = [
            {
                "interval": [
                    edges[i] if i else float(state["threshold"]),
                    edges[i + 1] if i + 2 < len(edges) else None,
                ],
                "count": counts[i],
                "samples": sample_records(state, feature_idx, limit, decoder, "interval", i),
            }
            for i in range(len(counts))
        ]
    if "recent" in state:
        recent = sample_records(state, feature_idx, limit, decoder, "recent")
        top = sample_records(state, feature_idx, limit, decoder, "top")
        union = _activating_tokens(recent) | _activating_tokens(top)
        overlap = len(_activating_tokens(recent) & _activating_tokens(top)) / len(union) if union else 1.0
        groups["recent_samples"] = recent
        groups["recent_overlap"] = overlap
    return groups


def window_token_ids(state: dict, prefix: str, latents: list[int], limit: int) -> torch.Tensor:
    """Distinct token ids in the windows of the first ``limit`` samples of ``latents`` in one table.

    For ``"interval"``, of every interval of those latents.
    """
    table = state[prefix]
    rows = torch.tensor(latents, dtype=torch.int64)
    if prefix == "interval":
        intervals = int(state["num_intervals"])
        rows = (rows.unsqueeze(1) * intervals + torch.arange(intervals)).reshape(-1)
    windows = table["context_tokens"][rows_index(table, rows, limit)]
    return windows[windows >= 0].unique()


def _window_token_ids(state: dict, ranked: list[int], limit: int) -> list[int]:
    prefixes = [prefix for prefix in ("top", "interval", "recent") if prefix in state]
    ids = [window_token_ids(state, prefix, ranked, limit) for prefix in prefixes]
    return torch.cat(ids).unique().tolist()


def _lstat(path: Path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _is_plain_file(path: Path) -> bool:
    """A regular file, not a symlink (never followed)."""
    info = _lstat(path)
    return info is not None and stat.S_ISREG(info.st_mode)


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
                f" {SUMMARY_NAME}, {FULL_STATE_NAME}, {MANIFEST_NAME} and feature_NNNNN_samples.json, no paths)."
            )
    return kept


def _is_empty_dir(path: Path) -> bool:
    info = _lstat(path)
    return info is not None and stat.S_ISDIR(info.st_mode) and not any(path.iterdir())


def _pending_is_ours(pending: Path) -> bool:
    """A real directory (not a symlink) holding our marker file."""
    info = _lstat(pending)
    if info is None or not stat.S_ISDIR(info.st_mode) or not _is_plain_file(pending / PENDING_MARKER):
        return False
    try:
        marker = json.loads((pending / PENDING_MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(marker, dict) and marker.get("writer") == WRITER_ID


def foreign_entries(dirpath: PathLike) -> list[Path]:
    """Pending directories in ``dirpath`` that this writer did not create; they are left alone."""
    dirpath = Path(dirpath)
    found = []
    for name in (PENDING_DIR, ".pending"):
        path = dirpath / name
        if _lstat(path) is not None and not _pending_is_ours(path) and not _is_empty_dir(path):
            found.append(path)
    return found


def read_manifest(dirpath: PathLike) -> Optional[list[str]]:
    """The files the last committed save wrote into ``dirpath``, or ``None`` if it holds no manifest.

    Raises:
        SamplesDirectoryError: The manifest exists but is not one this writer wrote.
    """
    path = Path(dirpath) / MANIFEST_NAME
    if _lstat(path) is None:
        return None
    record = load_json(path) if _is_plain_file(path) else None
    if not isinstance(record, dict) or record.get("writer") != WRITER_ID:
        raise SamplesDirectoryError(
            f"{path} is not a manifest written by {WRITER_ID}. Remove it only if the directory is yours to"
            " overwrite, or pass another `dirpath`."
        )
    return _writer_names(record.get("files"), path, "files")


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
    others = sorted(
        p.name
        for p in dirpath.iterdir()
        if p.name != LOCK_NAME
        and not (p.name == PENDING_DIR and (_pending_is_ours(p) or _is_empty_dir(p)))
        and not p.name.startswith(".write_probe_")
    )
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise SamplesDirectoryError(
            f"Samples directory {dirpath} is not empty ({shown}) and holds no {MANIFEST_NAME} of an earlier"
            f" {WRITER_ID} save, so its files are not ours to overwrite or delete. Pass an empty or new"
            " `dirpath`, or move its contents away."
        )
    return False


def _load_commit(pending: Path) -> Optional[dict]:
    commit = pending / COMMIT_NAME
    if not _pending_is_ours(pending) or not _is_plain_file(commit):
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
    record = _load_commit(pending)
    files = record.get("files") if record is not None else None
    return isinstance(files, list) and MANIFEST_NAME in files and _is_plain_file(pending / MANIFEST_NAME)


def _commit_plan(dirpath: Path, record: dict) -> tuple[list[str], list[str]]:
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
        else:
            _warn(f"Ignored {name!r} in `remove` of {source}: not a stale file of the last save's manifest.")
    return moves, removes


def _move_in(pending: Path, dirpath: Path, name: str) -> None:
    source = pending / name
    info = _lstat(source)
    if info is None:
        return  # moved already, before an interruption
    if not stat.S_ISREG(info.st_mode):
        _warn(f"Did not move {source} into place: not a regular file.")
        return
    os.replace(source, dirpath / name)


def _apply_commit(dirpath: Path, record: dict) -> None:
    """Move the new files into place, remove the stale ones, then move the manifest (last: it is the proof)."""
    pending = dirpath / PENDING_DIR
    moves, removes = _commit_plan(dirpath, record)
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
    (pending / PENDING_MARKER).unlink()
    pending.rmdir()


def _recover(dirpath: Path) -> None:
    """Finish an interrupted commit of ours and clear our pending directory; a foreign one is left alone."""
    pending = dirpath / PENDING_DIR
    record = _load_commit(pending)
    if record is not None:
        _apply_commit(dirpath, record)
    _clear_pending(pending)


def write_samples_dir(
    dirpath: PathLike,
    state: dict,
    *,
    config: dict,
    tokenizer: Any,
    top_features: int,
    samples_per_feature: int,
    rank_by: str,
    global_step: int,
    before_commit: Optional[Callable[[Path], None]] = None,
    feature_extras: Optional[dict[int, dict]] = None,
    full_state: bool = True,
) -> list[int]:
    """Write the samples directory for a merged collector state, atomically.

    Args:
        dirpath: Target directory (created if missing).
        state: A merged collector state dict (CPU tensors).
        config: The callback's configuration, recorded in the summary.
        tokenizer: Tokenizer object or ``None``.
        top_features: How many features get a feature file.
        samples_per_feature: Samples written per feature file.
        rank_by: Ranking used to choose and order the saved features.
        global_step: Trainer step at save time.
        before_commit: Called with the pending directory once every new file is complete (tests use it
            to simulate a crash).
        feature_extras: Extra top-level keys per feature file, as feature index to a JSON-ready dict
            (e.g. ``{"logit_effects": ...}``); features not saved are ignored.
        full_state: Write ``full_state.pt``; without it, a previous one is removed (it would be stale).

    Returns:
        The saved feature indices, in rank order.

    Raises:
        SamplesDirectoryError: ``dirpath`` is not empty and holds no manifest of ours (see
            :func:`claim_samples_dir`), or something that is not ours sits where the pending directory goes.
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    claim_samples_dir(dirpath)
    _recover(dirpath)
    pending = dirpath / PENDING_DIR
    if _lstat(pending) is not None and not _pending_is_ours(pending):
        raise SamplesDirectoryError(
            f"{pending} exists and was not created by {WRITER_ID}; it is left alone. Move it away so saves can"
            " use this name."
        )
    pending.mkdir(exist_ok=True)
    atomic_write_json(pending / PENDING_MARKER, {"writer": WRITER_ID})

    ranked = rank_features(state, rank_by, top_features).tolist()
    view = with_recent_view(state)
    decoder = TokenDecoder(tokenizer)
    if ranked:
        decoder.prepare(_window_token_ids(view, ranked, samples_per_feature))

    names = []
    entries = []
    for idx in ranked:
        stats = feature_statistics(state, idx)
        name = feature_filename(idx)
        record = {"statistics": stats, "top_samples": sample_records(state, idx, samples_per_feature, decoder)}
        groups = sample_groups(view, idx, samples_per_feature, decoder)
        if "recent_overlap" in groups:
            stats["recent_overlap"] = groups.pop("recent_overlap")
        record.update(groups)
        record.update((k, v) for k, v in (feature_extras or {}).get(idx, {}).items() if k not in record)
        atomic_write_json(pending / name, record)
        names.append(name)
        entries.append(
            {
                "feature_idx": idx,
                "max_activation": stats["max_activation"],
                "num_samples": stats["num_samples"],
                "activation_count": stats["activation_count"],
                "frequency": stats["frequency"],
                "mean_activation": stats["mean_activation"],
                **({"recent_overlap": stats["recent_overlap"]} if "recent_overlap" in stats else {}),
                "file": name,
            }
        )
    summary = {"format_version": FORMAT_VERSION, "global_step": int(global_step), **run_summary(state)}
    summary["config"] = config
    summary["top_features_by_activation"] = entries
    atomic_write_json(pending / SUMMARY_NAME, summary)
    if full_state:
        _atomic_torch_save(pending / FULL_STATE_NAME, state)

    written = [*names, *([FULL_STATE_NAME] if full_state else []), SUMMARY_NAME]
    atomic_write_json(pending / MANIFEST_NAME, {"writer": WRITER_ID, "files": sorted(written)})
    stale = sorted(name for name in read_manifest(dirpath) or () if _is_stale_name(name) and name not in written)
    if before_commit is not None:
        before_commit(pending)
    record = {"files": [*written, MANIFEST_NAME], "remove": stale}
    atomic_write_json(pending / COMMIT_NAME, record)
    _apply_commit(dirpath, record)
    _clear_pending(pending)
    return ranked


@dataclass
class SamplesDirectory:
    """What a samples directory holds, with an interrupted commit already resolved.

    Attributes:
        path: The directory.
        summary: Parsed ``collection_summary.json``.
        feature_files: Feature index to the file holding its samples.
        full_state_path: The full-state file, if present.
    """

    path: Path
    summary: dict
    feature_files: dict[int, Path]
    full_state_path: Optional[Path]


def _visible_files(dirpath: Path) -> dict[str, Path]:
    """Our files in ``dirpath``, overlaid by a committed but unfinished save, by the writer's rules."""
    files = {p.name: p for p in dirpath.iterdir() if is_writer_name(p.name) and p.name != MANIFEST_NAME and p.is_file()}
    pending = dirpath / PENDING_DIR
    record = _load_commit(pending)
    if record is not None:
        moves, removes = _commit_plan(dirpath, record)
        for name in removes:
            files.pop(name, None)
        for name in moves:
            if name != MANIFEST_NAME and _is_plain_file(pending / name):
                files[name] = pending / name
    return files


def load_json(path: Path) -> Any:
    """Read a JSON file, raising :class:`SamplesDirectoryError` naming the path if it is corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamplesDirectoryError(f"Cannot read {path}: {err}. The file is corrupt or unreadable.") from err


def read_samples_dir(path: PathLike) -> SamplesDirectory:
    """Open a samples directory without modifying it.

    Raises:
        SamplesDirectoryError: The directory is missing, holds no samples, is corrupt, or was written
            by an incompatible version.
    """
    dirpath = Path(path)
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
    if summary["format_version"] != FORMAT_VERSION:
        raise SamplesDirectoryError(
            f"{files[SUMMARY_NAME]} has format_version {summary['format_version']}, this version reads"
            f" {FORMAT_VERSION}. Install the lightning-sae-samples version that wrote it."
        )
    features = {int(m.group(1)): p for name, p in files.items() if (m := _FEATURE_FILE.fullmatch(name))}
    return SamplesDirectory(dirpath, summary, features, files.get(FULL_STATE_NAME))


def load_full_state(path: PathLike) -> dict:
    """Load a full-state file safely (tensors only, no pickle).

    Raises:
        SamplesDirectoryError: The file is corrupt, or holds a state of another format version (the dense
            layout of version 1 included).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise SamplesDirectoryError(f"Cannot load {path}: {err}. The file is corrupt or unreadable.") from err
    try:
        check_state_version(state, f"full-state file {path}")
    except ValueError as err:
        raise SamplesDirectoryError(str(err)) from err
    return state
