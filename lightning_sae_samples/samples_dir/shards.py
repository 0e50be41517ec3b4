"""A sharded save: each shard's root writes its own latents' files, global rank 0 writes the rest and commits.

Under tensor parallelism every shard of the latents is merged over its data-parallel replicas onto its root (the
first process of its replica group), which keeps it. A save is then a collective of every process in the world:

1. Global rank 0 readies the pending directory (claim, recovery, staging rename) and says whether it could.
2. Each root sends its top ``top_features`` candidates and the summary's counts (``O(top_features)`` each); every
   process ranks the candidates alike, as one state's latents rank.
3. Each root writes, into the pending directory, the feature files of its saved latents, its part
   ``full_state-0000i-of-0000n.pt`` and its part ``training_history-0000i-of-0000n.pt`` (its latents' history with
   this save's window appended), and reports back its entries and its frequency-histogram counts (or the error it
   met).
4. Rank 0 writes the indexes, summary and manifest, then ``COMMIT``, and commits; every process learns the
   outcome, so a failure on any rank raises everywhere and no rank waits for ever.

No process ever holds another shard's samples. The processes must share a file system (every root writes into
the same pending directory). A process that dies before the commit leaves the previous save; the next save clears
the pending directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lightning_sae_samples.samples_dir.atomic import atomic_torch_save
from lightning_sae_samples.samples_dir.history_file import history_of_latents, read_committed_history
from lightning_sae_samples.samples_dir.names import HISTORY_INDEX_NAME, PENDING_DIR
from lightning_sae_samples.samples_dir.parts import part_names, write_index
from lightning_sae_samples.samples_dir.writer import (
    SaveOptions,
    commit_pending,
    finish_pending,
    ready_pending,
    write_feature_files,
    write_history,
)
from lightning_sae_samples.state.history import window_of_state, without_window_entries
from lightning_sae_samples.state.statistics import (
    SUMMED_COUNTS,
    best_first,
    frequency_histogram,
    lowest_log_frequency,
    ranking_keys,
    run_summary,
    summary_counts,
)
from lightning_sae_samples.tokens import TokenDecoder


@dataclasses.dataclass(frozen=True)
class ShardPart:
    """This process's share of a sharded save.

    Args:
        state: Its shard's state merged over the shard's replicas, on the shard's root; ``None`` elsewhere.
        offset: The global id of the shard's first latent.
        ranges: Every shard's ``(start, stop)`` latents, in order (the parts of the full state).
    """

    state: Optional[dict]
    offset: int
    ranges: list[tuple[int, int]]

    @property
    def number(self) -> int:
        """The part this shard writes (0-based)."""
        return [start for start, _ in self.ranges].index(self.offset)

    @property
    def num_latents(self) -> int:
        """The SAE's latent count ``F``."""
        return self.ranges[-1][1]


class ShardedSaveError(RuntimeError):
    """A sharded save failed on some process; every process raises it (rank 0 the original error)."""


def write_sharded_samples_dir(
    dirpath: Path,
    part: ShardPart,
    options: SaveOptions,
    *,
    directions: Any = None,
    prepare: Optional[Callable[[Path], None]] = None,
) -> tuple[list[int], Optional[dict], Optional[dict]]:
    """Write one save of a sharded collection (a collective: every process of the world calls it).

    Args:
        dirpath: The samples directory, on a file system all processes share.
        part: This process's share.
        options: The save's options (``feature_extras`` keyed by global latent id; ``full_state_parts`` unused).
        directions: Unit decoder rows for ``decoder_directions.pt``, given to global rank 0 (``None``: none).
        prepare: Called on global rank 0 before anything is written (e.g. to take the directory's lock).

    Returns:
        The saved features, best first (on every process), the summary on global rank 0 (``None`` elsewhere), and
        on each root the history part it wrote (``None`` elsewhere, or without a history).

    Raises:
        ShardedSaveError: On every process but the one that failed, which raises its own error: nothing is
            committed then, and the directory holds the previous save.
    """
    dirpath = Path(dirpath)
    rank = torch.distributed.get_rank()
    failure = None
    if rank == 0:
        try:
            if part.state is None:
                raise ValueError(
                    "Global rank 0 holds no merged shard: it must be the first process of its shard's replica group"
                    " (pass replica groups in rank order)."
                )
            if prepare is not None:
                prepare(dirpath)
            ready_pending(dirpath)
        except Exception as err:
            failure = err
    _agree(failure, "could not begin the save")

    candidates = _candidates(part, options) if part.state is not None else None
    shared = [c for c in _all_gather(candidates) if c is not None]
    ranked = best_first(torch.tensor([i for c in shared for i in c["ids"]], dtype=torch.int64),
                        torch.tensor([k for c in shared for k in c["keys"]], dtype=torch.float64),
                        options.top_features).tolist()
    lowest = min((c["lowest"] for c in shared if c["lowest"] is not None), default=None)

    report, history, failure = None, None, None
    if part.state is not None:
        try:
            report, history = _write_shard(dirpath / PENDING_DIR, part, options, ranked, lowest)
        except Exception as err:
            failure = err
    reports = _gather((rank, None if failure is None else _describe(failure), report))

    summary, outcome = None, None
    if rank == 0:
        def write() -> list[str]:
            nonlocal summary
            names, summary = _write_run_files(dirpath, part, options, ranked, shared, reports, directions)
            return names

        try:
            commit_pending(dirpath, write)
        except Exception as err:
            outcome = err
    _agree(outcome, "could not complete the save", mine=failure)
    return ranked, summary, history


def _candidates(part: ShardPart, options: SaveOptions) -> dict:
    """A root's best ``top_features`` latents (global ids, ranking keys) and its counts for the summary."""
    state = part.state
    fired, keys = ranking_keys(state, options.rank_by)
    top = best_first(fired, keys, options.top_features)
    return {"ids": (top + part.offset).tolist(), "keys": keys[torch.searchsorted(fired, top)].tolist(),
            "counts": summary_counts(state), "lowest": lowest_log_frequency(state)}


def _write_shard(pending: Path, part: ShardPart, options: SaveOptions, ranked: list[int],
                 lowest: Optional[float]) -> tuple[dict, Optional[dict]]:
    """A root's files: its saved latents' feature files and its parts; what rank 0 needs back, its history part."""
    state = part.state
    stop = part.offset + int(state["num_latents"])
    mine = [idx - part.offset for idx in ranked if part.offset <= idx < stop]
    digest = hashlib.sha256()
    entries = write_feature_files(pending, state, mine, options, TokenDecoder(options.tokenizer), digest,
                                  part.offset)
    if options.full_state:
        atomic_torch_save(pending / part_names(part.ranges)[part.number], without_window_entries(state))
    history = None
    if options.history is not None and "window_count" in state:
        history = _write_history_part(pending, part, options, mine)
    return {"offset": part.offset, "entries": entries, "digest": digest.hexdigest(),
            "histogram": frequency_histogram(state, lowest=lowest)["counts"], "history": history is not None}, history


def _write_history_part(pending: Path, part: ShardPart, options: SaveOptions, mine: list[int]) -> dict:
    """A root's part of the history: its latents' history (carried, else committed) with this save's window."""
    state, settings = part.state, options.history
    stop = part.offset + int(state["num_latents"])
    window = window_of_state(state, options.global_step, int(settings["top_tokens"]), mine,
                             int(settings["samples_per_feature"]))
    window["latent"] = window["latent"] + part.offset
    window["samples"]["latent"] = window["samples"]["latent"] + part.offset
    previous = settings.get("previous")
    if previous is None:
        previous = read_committed_history(pending.parent)
    if previous is not None and not _within(previous, part.offset, stop):  # the whole history, or other shards'
        previous = history_of_latents(previous, part.offset, stop)
    name = part_names(part.ranges, HISTORY_INDEX_NAME)[part.number]
    return write_history(pending / name, previous, window, part.num_latents, int(state["half_window"]), settings,
                         TokenDecoder(options.tokenizer))


def _within(history: dict, start: int, stop: int) -> bool:
    """Whether a history holds rows and samples of latents ``[start, stop)`` alone (a root's own part)."""
    return all(not len(ids) or (start <= int(ids.min()) and int(ids.max()) < stop)
               for ids in (history["rows"]["latent"], history["samples"]["latent"]))


def _write_run_files(dirpath: Path, part: ShardPart, options: SaveOptions, ranked: list[int], shared: list[dict],
                     reports: list, directions: Any) -> tuple[list[str], dict]:
    """On rank 0, once every root has reported: the indexes, summary and manifest; the save's files."""
    failed = [(rank, problem) for rank, problem, _ in reports if problem is not None]
    if failed:
        rank, problem = failed[0]
        raise ShardedSaveError(f"Rank {rank} could not write its part of the save into {dirpath / PENDING_DIR}:"
                               f" {problem}. Nothing was committed; {dirpath} holds the previous save.")
    shards = sorted((report for _, _, report in reports if report is not None), key=lambda r: r["offset"])
    entry_of = {entry["feature_idx"]: entry for shard in shards for entry in shard["entries"]}
    entries = [entry_of[idx] for idx in ranked]
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(shard["digest"].encode("ascii"))
    counts = {name: sum(c["counts"][name] for c in shared) for name in SUMMED_COUNTS}
    state = part.state
    histogram = frequency_histogram(state, lowest=min(
        (c["lowest"] for c in shared if c["lowest"] is not None), default=None))
    histogram["counts"] = [sum(column) for column in zip(*(shard["histogram"] for shard in shards))]
    summary = run_summary(state, counts, histogram, num_latents=part.num_latents)
    names = [entry["file"] for entry in entries]
    if options.full_state:
        write_index(dirpath / PENDING_DIR, part.ranges, part.num_latents)
        names += part_names(part.ranges)
    if all(shard["history"] for shard in shards):
        write_index(dirpath / PENDING_DIR, part.ranges, part.num_latents, HISTORY_INDEX_NAME)
        names += part_names(part.ranges, HISTORY_INDEX_NAME)
    written, _ = finish_pending(dirpath, dirpath / PENDING_DIR, state, summary, entries, names, options, digest,
                                directions=directions, decoder=TokenDecoder(options.tokenizer))
    return written, {**summary, "global_step": options.global_step, "top_features_by_activation": entries}


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _all_gather(obj: Any) -> list:
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _gather(obj: Any) -> list:
    rank0 = torch.distributed.get_rank() == 0
    out: Optional[list] = [None] * torch.distributed.get_world_size() if rank0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out or []


def _agree(failure: Optional[BaseException], what: str, mine: Optional[BaseException] = None) -> None:
    """Tell every process rank 0's ``failure``; a process that failed raises its own error, the others one naming it.

    ``mine``: this process's own error (already reported to rank 0); rank 0 raises ``failure`` as it is.
    """
    message = [None if failure is None else _describe(failure)]
    torch.distributed.broadcast_object_list(message, src=0)
    if mine is not None:
        raise mine
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise ShardedSaveError(f"Global rank 0 {what}: {message[0]}")
