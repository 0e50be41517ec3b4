"""Write a samples directory for a merged collector state, atomically."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from lightning_sae_samples.samples_dir.atomic import atomic_torch_save, atomic_write_json
from lightning_sae_samples.samples_dir.commit import (
    _apply_commit,
    _clear_pending,
    _pending_is_ours,
    _recover,
    claim_samples_dir,
    create_pending,
    is_plain_file,
    lstat_or_none,
    read_manifest,
)
from lightning_sae_samples.samples_dir.decoder import decoder_payload, unit_directions
from lightning_sae_samples.samples_dir.history_file import (
    history_payload,
    history_token_ids,
    payload_vocab,
    read_committed_history,
    windows_of_payload,
)
from lightning_sae_samples.samples_dir.names import (
    COMMIT_NAME,
    DECODER_NAME,
    FULL_STATE_NAME,
    HISTORY_INDEX_NAME,
    HISTORY_NAME,
    MANIFEST_NAME,
    PENDING_DIR,
    SUMMARY_NAME,
    WRITER_ID,
    PathLike,
    SamplesDirectoryError,
    _is_stale_name,
    feature_filename,
)
from lightning_sae_samples.samples_dir.parts import part_names, write_parts
from lightning_sae_samples.samples_dir.serialize import (
    _window_token_ids,
    activating_tokens_record,
    sample_groups,
    sample_records,
    with_recent_view,
)
from lightning_sae_samples.state.history import append_window, window_of_state, without_window_entries
from lightning_sae_samples.state.schema import FORMAT_VERSION
from lightning_sae_samples.state.statistics import feature_statistics, rank_features, run_summary
from lightning_sae_samples.tokens import TokenDecoder

#: Hex digits of the digest in a save's ``save_id`` (``"<global_step>-<digits>"``).
SAVE_ID_DIGITS = 16


@dataclass(frozen=True)
class SaveOptions:
    """What one save writes besides the state (the keywords of :func:`write_samples_dir`, documented there)."""

    config: dict
    tokenizer: Any
    top_features: int
    samples_per_feature: int
    rank_by: str
    global_step: int
    feature_extras: Optional[dict[int, dict]] = None
    full_state: bool = True
    source: str = "train"
    trained_step: Optional[int] = None
    history: Optional[dict] = None
    full_state_parts: Optional[list[tuple[int, int]]] = None


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
    source: str = "train",
    trained_step: Optional[int] = None,
    history: Optional[dict] = None,
    decoder: Any = None,
    full_state_parts: Optional[list[tuple[int, int]]] = None,
    on_history: Optional[Callable[[dict], None]] = None,
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
        global_step: Trainer step at save time (of a snapshot: the step of the weights it was taken with).
        source: ``"train"`` for the training-time collection (samples from many SAE states); ``"validate"``,
            ``"test"`` or ``"predict"`` for a snapshot of one evaluation run, recorded as the summary's ``source``
            with its ``weights_step``.
        trained_step: Of a snapshot: the run's last training step, recorded as ``trained_step`` when it is newer
            than the weights' step (the evaluation loaded an older checkpoint).
        before_commit: Called with the pending directory once every new file is complete (tests use it
            to simulate a crash).
        feature_extras: Extra top-level keys per feature file, as feature index to a JSON-ready dict
            (e.g. ``{"logit_effects": ...}``); features not saved are ignored.
        full_state: Write ``full_state.pt``; without it, a previous one is removed (it would be stale).
        history: Append the state's history window to ``training_history.pt``, thinned: a dict of ``top_tokens``,
            ``per_level``, ``samples_per_feature`` and ``dead_window_steps`` (``None``: no history, as in snapshots),
            and ``previous``: the history payload to append to (default: the directory's file).
        decoder: The SAE's decoder ``W_dec`` ``[F, d_model]``: written as ``decoder_directions.pt`` (unit rows,
            bfloat16) for the latents' neighbours; without it, a previous one is removed (it would be stale).
        full_state_parts: Write the full state in parts cut at these ``(start, stop)`` latent ranges (the shards
            of a sharded collection), with ``full_state.index.json``, instead of ``full_state.pt``.
        on_history: Called with the ``training_history.pt`` payload this save wrote, once it is committed (not
            called when the save writes no history).

    Returns:
        The saved feature indices, in rank order.

    Raises:
        SamplesDirectoryError: ``dirpath`` is not empty and holds no manifest of ours (see
            :func:`claim_samples_dir`), or something that is not ours sits where the pending directory goes.
    """
    dirpath = Path(dirpath)
    directions = None if decoder is None else unit_directions(decoder, int(state["num_latents"]))
    pending = ready_pending(dirpath)
    options = SaveOptions(config, tokenizer, top_features, samples_per_feature, rank_by, int(global_step),
                          feature_extras, full_state, source, trained_step, history, full_state_parts)

    def write() -> list[str]:
        ranked[:], written, history_written[:] = _write_pending(dirpath, pending, state, options, directions)
        if before_commit is not None:
            before_commit(pending)
        return written

    ranked: list[int] = []
    history_written: list[dict] = []
    commit_pending(dirpath, write)
    if on_history is not None and history_written:
        on_history(history_written[0])
    return ranked


def ready_pending(dirpath: Path) -> Path:
    """Claim ``dirpath``, finish or clear an interrupted save of ours, and make the pending directory.

    Raises:
        SamplesDirectoryError: ``dirpath`` is not ours, or something that is not ours sits at the pending name.
    """
    dirpath.mkdir(parents=True, exist_ok=True)
    claim_samples_dir(dirpath)
    _recover(dirpath)
    pending = dirpath / PENDING_DIR
    if lstat_or_none(pending) is not None and not _pending_is_ours(pending):
        raise SamplesDirectoryError(
            f"{pending} exists and was not created by {WRITER_ID}; it is left alone. Move it away so saves can"
            " use this name."
        )
    if lstat_or_none(pending) is None:
        create_pending(dirpath)
    return pending


def commit_pending(dirpath: Path, write: Callable[[], list[str]]) -> None:
    """Run ``write`` (fills the pending directory, returns the save's files) and commit what it wrote.

    A failure before the commit record is written leaves the previous save, and the partial files go at once.
    """
    pending = dirpath / PENDING_DIR
    try:
        written = write()
        record = {"files": [*written, MANIFEST_NAME], "remove": _stale(dirpath, written)}
        atomic_write_json(pending / COMMIT_NAME, record)
    except BaseException:
        # Nothing is committed: the previous save stands, and the partial files go at once (a full disk gets its
        # space back, and no WRITER stays behind).
        if not is_plain_file(pending / COMMIT_NAME):
            try:
                _clear_pending(pending)
            except OSError:
                pass
        raise
    _apply_commit(dirpath, record)
    _clear_pending(pending)


def _write_pending(
    dirpath: Path, pending: Path, state: dict, options: SaveOptions, directions: Optional[Any] = None,
) -> tuple[list[int], list[str], list[dict]]:
    """Write the save's files into the pending directory.

    Returns:
        The ranked features, the files, and the history payload written (in a list; empty: no history).
    """
    # The save's id: its step and a digest of what it wrote, so that a reader can tell two saves apart and an
    # exact resume still writes the same files as an uninterrupted run.
    digest = hashlib.sha256()
    ranked = rank_features(state, options.rank_by, options.top_features).tolist()
    decoder = TokenDecoder(options.tokenizer)
    entries = write_feature_files(pending, state, ranked, options, decoder, digest)
    window = None
    if options.history is not None and "window_count" in state:
        window = window_of_state(state, options.global_step, int(options.history["top_tokens"]), ranked,
                                 int(options.history["samples_per_feature"]))
    parts = options.full_state_parts
    names = [entry["file"] for entry in entries]
    if options.full_state:
        names += part_names(parts) if parts else [FULL_STATE_NAME]
    if options.full_state and parts:
        write_parts(pending, without_window_entries(state), parts)
    elif options.full_state:
        atomic_torch_save(pending / FULL_STATE_NAME, without_window_entries(state))
    written, history = finish_pending(dirpath, pending, state, run_summary(state), entries, names, options, digest,
                                      window=window, directions=directions, decoder=decoder)
    return ranked, written, [] if history is None else [history]


def write_feature_files(
    pending: Path, state: dict, features: list[int], options: SaveOptions, decoder: TokenDecoder, digest: Any,
    offset: int = 0,
) -> list[dict]:
    """Write the feature files of ``features`` (latents of ``state``) into ``pending``, in order.

    Args:
        pending: The save's pending directory.
        state: The (merged) state, or one shard's.
        features: Latents of ``state`` (numbered from 0) to write, best first.
        options: The save's options (samples per feature, extras keyed by global id).
        decoder: Decodes the windows' token ids (prepared here).
        digest: A ``hashlib`` object updated with each file's bytes, in order.
        offset: The global id of ``state``'s first latent (a shard's): the files carry global ids.

    Returns:
        Each file's entry in the summary's ``top_features_by_activation``.
    """
    view = with_recent_view(state)
    if features:
        decoder.prepare(_window_token_ids(view, features, options.samples_per_feature))
    entries = []
    for local in features:
        idx = local + offset
        stats = feature_statistics(state, local)
        record = {"statistics": stats,
                  "top_samples": sample_records(state, local, options.samples_per_feature, decoder),
                  "activating_tokens": activating_tokens_record(state, local, decoder)}
        groups = sample_groups(view, local, options.samples_per_feature, decoder)
        if "recent_overlap" in groups:
            stats["recent_overlap"] = groups.pop("recent_overlap")
        record.update(groups)
        if offset:
            _relabel(record, idx)
        record.update((k, v) for k, v in (options.feature_extras or {}).get(idx, {}).items() if k not in record)
        name = feature_filename(idx)
        digest.update(atomic_write_json(pending / name, record))
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
    return entries


def _relabel(record: dict, idx: int) -> None:
    """Give a feature record of a shard's latent, and each of its samples, the latent's global id."""
    record["statistics"]["feature_idx"] = idx
    groups = [record["top_samples"], record.get("recent_samples", [])]
    groups += [interval["samples"] for interval in record.get("interval_samples", [])]
    for samples in groups:
        for sample in samples:
            sample["feature_idx"] = idx


def finish_pending(
    dirpath: Path,
    pending: Path,
    state: dict,
    summary: dict,
    entries: list[dict],
    names: list[str],
    options: SaveOptions,
    digest: Any,
    *,
    window: Optional[dict] = None,
    directions: Optional[Any] = None,
    decoder: Optional[TokenDecoder] = None,
) -> tuple[list[str], Optional[dict]]:
    """Write the save's run-level files into ``pending``: history, decoder, summary and manifest.

    Args:
        dirpath: The samples directory (its committed history is appended to when the options carry none).
        pending: The save's pending directory.
        state: The state (or, for a sharded save, one shard's) whose run counters the summary records.
        summary: :func:`~lightning_sae_samples.state.statistics.run_summary` of the whole collection.
        entries: The saved features' summary entries, best first.
        names: The files the save wrote besides these (feature files, full state).
        options: The save's options.
        digest: A ``hashlib`` object holding what the save wrote so far; it makes the ``save_id``.
        window: The history window to append (``None``: no history).
        directions: Unit decoder rows to write as ``decoder_directions.pt`` (``None``: none).
        decoder: Decodes the history's new token ids.

    Returns:
        Every file of the save, the manifest aside; and the history payload written (``None``: no history).
    """
    global_step = options.global_step
    history = None
    if window is not None:
        history = _write_history(dirpath, pending, window, int(summary["num_features_tracked"]),
                                 int(state["half_window"]), options.history, decoder or TokenDecoder(None))
    written = [*names, *([HISTORY_NAME] if window is not None else []),
               *([DECODER_NAME] if directions is not None else []), SUMMARY_NAME]
    summary = {"format_version": FORMAT_VERSION, "save_id": "", "global_step": int(global_step), **summary}
    summary["config"] = options.config
    if options.source != "train":
        summary["source"], summary["weights_step"] = options.source, global_step
        if options.trained_step is not None and int(options.trained_step) > global_step:
            summary["trained_step"] = int(options.trained_step)
    summary["top_features_by_activation"] = entries
    digest.update(json.dumps([summary, sorted(written)], sort_keys=True, ensure_ascii=False).encode("utf-8"))
    summary["save_id"] = save_id = f"{int(global_step)}-{digest.hexdigest()[:SAVE_ID_DIGITS]}"
    atomic_write_json(pending / SUMMARY_NAME, summary)
    if directions is not None:
        atomic_torch_save(pending / DECODER_NAME, decoder_payload(directions, global_step))
    atomic_write_json(pending / MANIFEST_NAME, {"writer": WRITER_ID, "save_id": save_id, "files": sorted(written)})
    return written, history


def _stale(dirpath: Path, written: list[str]) -> list[str]:
    """The last save's files that this one does not write again (removed at its commit)."""
    stale = [HISTORY_NAME] if HISTORY_INDEX_NAME in written else []  # a history in parts replaces the whole one
    return sorted(name for name in read_manifest(dirpath) or ()
                  if (_is_stale_name(name) or name in stale) and name not in written)


def _write_history(dirpath: Path, pending: Path, window: dict, num_latents: int, half_window: int,
                   settings: dict, decoder: TokenDecoder) -> dict:
    """Append ``window`` (the state's, see ``window_of_state``) to the history and write it into ``pending``.

    The history is ``settings["previous"]`` when given (the collector's, carried by a checkpoint into any
    ``dirpath``), else the committed file's (read and checked; a history in parts is joined).
    """
    previous = settings.get("previous")
    if previous is None:
        previous = read_committed_history(dirpath)
    return write_history(pending / HISTORY_NAME, previous, window, num_latents, half_window, settings, decoder)


def write_history(path: Path, previous: Optional[dict], window: dict, num_latents: int, half_window: int,
                  settings: dict, decoder: TokenDecoder) -> dict:
    """Write ``previous`` (a history payload or ``None``) with ``window`` appended and thinned to ``path``.

    Thinning depends on the windows' levels alone, so the parts of a sharded history keep the same windows.
    Returns the payload written.
    """
    windows = windows_of_payload(previous) if previous is not None else []
    vocab = payload_vocab(previous) if previous is not None else {}
    if previous is not None and int(previous["top_tokens"]) != window["token_ids"].shape[1]:
        windows = []  # recorded with another `history_top_tokens`: the windows do not line up; start afresh
    windows = append_window(windows, window, int(settings["per_level"]), int(settings["samples_per_feature"]))
    ids = history_token_ids(windows).tolist()
    new = [i for i in ids if i not in vocab]
    decoder.prepare(new)
    vocab.update((i, decoder.token_str(i)) for i in new)
    vocab = {i: vocab[i] for i in ids}
    payload = history_payload(
        windows, num_latents=num_latents, top_tokens=int(settings["top_tokens"]),
        context_window=2 * half_window + 1, dead_window_steps=int(settings["dead_window_steps"]),
        vocab=vocab,
    )
    atomic_torch_save(path, payload)
    return payload
