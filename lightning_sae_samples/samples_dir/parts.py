"""The full state in parts: one file per shard of latents, and the index that says which latents each holds.

A collection of sharded latents (tensor parallelism) saves its full state as ``full_state-00001-of-0000n.pt`` ...
``full_state-0000n-of-0000n.pt``, the convention of sharded Hugging Face checkpoints, with
``full_state.index.json``: each part is the compact state of a range of latents, numbered from 0; the index lists
the ranges in order. The parts and the index are files of one save, committed together. The history of a
sharded collection is cut alike: ``training_history-0000i-of-0000n.pt`` and ``training_history.index.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from lightning_sae_samples.samples_dir.atomic import atomic_torch_save, atomic_write_json
from lightning_sae_samples.samples_dir.names import (
    FULL_STATE_INDEX_NAME,
    HISTORY_INDEX_NAME,
    PathLike,
    SamplesDirectoryError,
    full_state_part_name,
    history_part_name,
)
from lightning_sae_samples.state.schema import check_state_version
from lightning_sae_samples.state.slices import concat_states, slice_state
from lightning_sae_samples.state.validate import check_state

#: Version of ``full_state.index.json``.
INDEX_VERSION = 1


#: An index's name to the name of its part ``number`` (from 1) of ``count``.
_PART_NAME = {FULL_STATE_INDEX_NAME: full_state_part_name, HISTORY_INDEX_NAME: history_part_name}


def part_names(ranges: list[tuple[int, int]], index_name: str = FULL_STATE_INDEX_NAME) -> list[str]:
    """The files of a full state (or, by ``index_name``, a history) cut at ``ranges``: the parts, then the index."""
    name_of = _PART_NAME[index_name]
    return [name_of(number, len(ranges)) for number in range(1, len(ranges) + 1)] + [index_name]


def write_parts(pending: Path, state: dict, ranges: list[tuple[int, int]]) -> None:
    """Write ``state`` cut at ``ranges`` (``(start, stop)`` in order, covering every latent), then its index."""
    for name, (start, stop) in zip(part_names(ranges), ranges):
        atomic_torch_save(pending / name, slice_state(state, start, stop))
    write_index(pending, ranges, int(state["num_latents"]))


def write_index(pending: Path, ranges: list[tuple[int, int]], num_latents: int,
                index_name: str = FULL_STATE_INDEX_NAME) -> None:
    """Write the index ``index_name`` for parts cut at ``ranges`` of ``num_latents`` latents."""
    names = part_names(ranges, index_name)
    parts = [{"file": name, "latents": [int(start), int(stop)]} for name, (start, stop) in zip(names, ranges)]
    index = {"index_version": INDEX_VERSION, "num_latents": int(num_latents), "parts": parts}
    atomic_write_json(pending / index_name, index)


def read_index(path: PathLike) -> dict:
    """The index of a full state (or history) in parts, checked: valid part names covering ``[0, num_latents)``.

    Raises:
        SamplesDirectoryError: The index is unreadable or does not describe parts of one state.
    """
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SamplesDirectoryError(f"Cannot read {path}: {err}. The file is corrupt or unreadable.") from err
    name_of = _PART_NAME.get(path.name)
    problem = "it is not named as an index" if name_of is None else _index_problem(index, name_of)
    if problem:
        raise SamplesDirectoryError(f"{path} is not an index of parts: {problem}. Re-run the save.")
    return index


def _index_problem(index: Any, name_of: Callable[[int, int], str]) -> str:
    if not isinstance(index, dict) or index.get("index_version") != INDEX_VERSION:
        return f"it is not a dict of index_version {INDEX_VERSION}"
    total, parts = index.get("num_latents"), index.get("parts")
    if isinstance(total, bool) or not isinstance(total, int) or not isinstance(parts, list) or not parts:
        return "it lacks `num_latents` or `parts`"
    covered = 0
    for number, part in enumerate(parts, start=1):
        latents = part.get("latents") if isinstance(part, dict) else None
        if (not isinstance(latents, list) or len(latents) != 2 or latents[0] != covered
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in latents) or latents[1] <= covered):
            return f"part {number} does not continue the latents at {covered}"
        if part.get("file") != name_of(number, len(parts)):
            return f"part {number} is not named {name_of(number, len(parts))}"
        covered = latents[1]
    if covered != total:
        return f"its parts cover {covered} of {total} latents"
    return ""


def load_part(path: Path, latents: list[int]) -> dict:
    """One part's state (tensors only, no pickle), checked to hold ``latents[1] - latents[0]`` latents."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise SamplesDirectoryError(f"Cannot load {path}: {err}. The file is corrupt or unreadable.") from err
    try:
        check_state_version(state, f"full-state part {path}")
        check_state(state)
    except ValueError as err:
        raise SamplesDirectoryError(f"{path} is not a usable collector state: {err}. Re-run the save.") from err
    if int(state["num_latents"]) != latents[1] - latents[0]:
        raise SamplesDirectoryError(
            f"{path} holds {int(state['num_latents'])} latents where its index says {latents[1] - latents[0]}"
            f" (latents {latents[0]} to {latents[1] - 1}); the directory mixes two saves. Re-run the save."
        )
    return state


def load_parts(index_path: PathLike, locate: Optional[Callable[[str], Optional[Path]]] = None) -> dict:
    """The whole state of a full state in parts, joined (as ``full_state.pt`` would hold it).

    ``locate``: where a part of this save is (a committed save's parts may still be in its pending folder);
    default: beside the index.
    """
    index_path = Path(index_path)
    index = read_index(index_path)
    states = [load_part(part_path(index_path, part["file"], locate), part["latents"]) for part in index["parts"]]
    try:
        return concat_states(states)
    except ValueError as err:
        raise SamplesDirectoryError(f"{index_path}: the parts are not of one save ({err})") from err


def part_path(index_path: Path, name: str, locate: Optional[Callable[[str], Optional[Path]]]) -> Path:
    """Where the part ``name`` of the index at ``index_path`` is (see :func:`load_parts`'s ``locate``)."""
    found = locate(name) if locate is not None else index_path.parent / name
    if found is None:
        raise SamplesDirectoryError(f"{index_path} lists {name}, which is missing; the save is incomplete.")
    return found


def load_part_of(
    index_path: PathLike, latent: int, locate: Optional[Callable[[str], Optional[Path]]] = None
) -> tuple[dict, int]:
    """The part that holds ``latent``, opened alone, and the global id of its first latent.

    Raises:
        SamplesDirectoryError: The index is bad, or no part holds ``latent``.
    """
    index_path = Path(index_path)
    for part in read_index(index_path)["parts"]:
        start, stop = part["latents"]
        if start <= latent < stop:
            return load_part(part_path(index_path, part["file"], locate), part["latents"]), start
    raise SamplesDirectoryError(f"{index_path}: no part holds latent {latent}.")
