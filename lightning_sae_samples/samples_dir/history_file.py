"""``training_history.pt``: the windows of a history laid out as concatenated tensors, and checked when read.

A sharded collection writes its history in parts, one per shard of latents (``training_history-0000i-of-0000n.pt``
with ``training_history.index.json``): each part is a history of the same windows holding only its latents' rows
and samples (global latent ids); read through the index, the parts join into the one history.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, Callable, Optional

import torch
from torch import Tensor

from lightning_sae_samples.config import MAX_HISTORY_WINDOWS_PER_LEVEL
from lightning_sae_samples.samples_dir.names import HISTORY_INDEX_NAME, HISTORY_NAME, PathLike, SamplesDirectoryError
from lightning_sae_samples.samples_dir.parts import part_path, read_index
from lightning_sae_samples.state.history import (
    HISTORY_FORMAT_VERSION,
    HISTORY_SAMPLE_FIELDS,
    ROW_FIELDS,
    WINDOW_SCALARS,
    join_windows,
)


def history_payload(windows: list[dict], *, num_latents: int, top_tokens: int, context_window: int,
                    dead_window_steps: int, vocab: dict[int, str]) -> dict:
    """The file's content for a list of windows (see ``docs/format.md``); ``vocab``: token id to display string."""
    table: dict[str, Any] = {name: torch.tensor([int(w[name]) for w in windows], dtype=torch.int64)
                             for name in WINDOW_SCALARS}
    table["rows"] = torch.tensor([len(w["latent"]) for w in windows], dtype=torch.int64)
    table["sample_rows"] = torch.tensor([len(w["samples"]["latent"]) for w in windows], dtype=torch.int64)
    rows = {name: _cat([w[name] for w in windows], dtype, (top_tokens,) if name.startswith("token_") else ())
            for name, dtype in ROW_FIELDS.items()}
    samples = {name: _cat([w["samples"][name] for w in windows], dtype,
                          (context_window,) if name.startswith("context_") else ())
               for name, dtype in HISTORY_SAMPLE_FIELDS.items()}
    ids = sorted(vocab)
    return {
        "format_version": HISTORY_FORMAT_VERSION, "num_latents": int(num_latents), "top_tokens": int(top_tokens),
        "context_window": int(context_window), "dead_window_steps": int(dead_window_steps),
        "windows": table, "rows": rows, "samples": samples,
        "vocab": {"ids": torch.tensor(ids, dtype=torch.int64), "strings": [vocab[i] for i in ids]},
    }


def _cat(parts: list[Tensor], dtype: torch.dtype, trailing: tuple[int, ...]) -> Tensor:
    if not parts:
        return torch.empty((0, *trailing), dtype=dtype)
    return torch.cat([p.to(dtype) for p in parts])


#: Token ids below this (a vocabulary's size) are collected by counting them in a table, larger ones by sorting.
_MARK_IDS_BELOW = 1 << 24


def history_token_ids(windows: list[dict]) -> Tensor:
    """Every token id a history shows (top tokens and sample contexts), distinct."""
    parts = [w["token_ids"].reshape(-1) for w in windows] + [w["samples"]["context_tokens"].reshape(-1)
                                                             for w in windows]
    highest = max((int(p.max()) for p in parts if p.numel()), default=-1)
    if highest < 0:
        return torch.empty(0, dtype=torch.int64)
    if highest >= _MARK_IDS_BELOW:
        ids = torch.unique(torch.cat([p.to(torch.int64) for p in parts]))
        return ids[ids >= 0]
    # Counting each id (-1, "none", shifted to 0) is linear in the ids; a sort of a long history's ~10^7 is not.
    seen = torch.zeros(highest + 2, dtype=torch.int64)
    for part in parts:
        seen += torch.bincount(part.to(torch.int64) + 1, minlength=highest + 2)
    return seen[1:].nonzero().flatten()


def windows_of_payload(payload: dict) -> list[dict]:
    """The windows of a checked payload (see :func:`check_history`), oldest first."""
    table, rows, samples = payload["windows"], payload["rows"], payload["samples"]
    row_ends = torch.cumsum(table["rows"], 0).tolist()
    sample_ends = torch.cumsum(table["sample_rows"], 0).tolist()
    windows, row_start, sample_start = [], 0, 0
    for w, (row_end, sample_end) in enumerate(zip(row_ends, sample_ends)):
        window = {name: int(table[name][w]) for name in WINDOW_SCALARS}
        window.update({name: rows[name][row_start:row_end] for name in ROW_FIELDS})
        window["samples"] = {name: samples[name][sample_start:sample_end] for name in HISTORY_SAMPLE_FIELDS}
        windows.append(window)
        row_start, sample_start = row_end, sample_end
    return windows


def payload_vocab(payload: dict) -> dict[int, str]:
    """Token id to display string, as the writer decoded them."""
    return dict(zip(payload["vocab"]["ids"].tolist(), payload["vocab"]["strings"]))


def history_of_latents(payload: dict, start: int, stop: int) -> dict:
    """The history of latents ``[start, stop)`` alone: the same windows, only their rows and samples (ids kept)."""
    windows = []
    for window in windows_of_payload(payload):
        rows = (window["latent"] >= start) & (window["latent"] < stop)
        samples = (window["samples"]["latent"] >= start) & (window["samples"]["latent"] < stop)
        windows.append({**{name: window[name] for name in WINDOW_SCALARS},
                        **{name: window[name][rows] for name in ROW_FIELDS},
                        "samples": {name: value[samples] for name, value in window["samples"].items()}})
    return history_payload(windows, **_settings_of(payload), vocab=payload_vocab(payload))


def _settings_of(payload: dict) -> dict:
    return {name: int(payload[name]) for name in ("num_latents", "top_tokens", "context_window", "dead_window_steps")}


def join_histories(parts: list[dict], where: PathLike) -> dict:
    """One history from the histories of consecutive shards (same windows, each its latents'), in latent order.

    Raises:
        SamplesDirectoryError: The parts are not of one save (other windows or settings), naming ``where``.
    """
    settings, table = _settings_of(parts[0]), parts[0]["windows"]
    for number, part in enumerate(parts[1:], start=2):
        if _settings_of(part) != settings or any(not torch.equal(part["windows"][name], table[name])
                                                 for name in WINDOW_SCALARS):
            raise SamplesDirectoryError(f"{where}: history part {number} holds other windows or settings than part 1;"
                                        " the directory mixes two saves. Re-run the save.")
    windows = [join_windows([(0, window) for window in same]) for same in zip(*map(windows_of_payload, parts))]
    vocab: dict[int, str] = {}
    for part in parts:
        vocab.update(payload_vocab(part))
    return history_payload(windows, **settings, vocab=vocab)


def history_to_tensors(payload: dict) -> dict:
    """A payload whose vocabulary's strings are tensors too (UTF-8 bytes and lengths): all a checkpoint stores."""
    encoded = [text.encode("utf-8") for text in payload["vocab"]["strings"]]
    utf8 = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if any(encoded) else torch.empty(
        0, dtype=torch.uint8)
    lengths = torch.tensor([len(b) for b in encoded], dtype=torch.int64)
    return {**payload, "vocab": {"ids": payload["vocab"]["ids"], "utf8": utf8, "lengths": lengths}}


def history_from_tensors(stored: dict) -> dict:
    """The payload :func:`history_to_tensors` stored, checked (see :func:`check_history`).

    Raises:
        ValueError: The stored history is not usable (its vocabulary's bytes, or a field the check names).
    """
    vocab = stored.get("vocab") if isinstance(stored, dict) else None
    utf8, lengths = (vocab.get("utf8"), vocab.get("lengths")) if isinstance(vocab, dict) else (None, None)
    if not (isinstance(utf8, Tensor) and utf8.dtype == torch.uint8 and utf8.dim() == 1 and isinstance(lengths, Tensor)
            and lengths.dim() == 1 and not lengths.is_floating_point() and (not len(lengths) or (
                int(lengths.min()) >= 0 and int(lengths.sum()) == len(utf8)))):
        raise ValueError("its vocabulary is not UTF-8 bytes with their lengths")
    data = bytes(utf8.numpy())
    ends = torch.cumsum(lengths, 0).tolist()
    try:
        strings = [data[end - length:end].decode("utf-8") for end, length in zip(ends, lengths.tolist())]
    except UnicodeDecodeError as err:
        raise ValueError(f"its vocabulary is not UTF-8 ({err})") from None
    payload = {**stored, "vocab": {"ids": vocab.get("ids"), "strings": strings}}
    check_history(payload)
    return payload


def load_history_parts(index_path: PathLike, locate: Optional[Callable[[str], Optional[Path]]] = None) -> dict:
    """The history in parts that ``training_history.index.json`` lists, each part checked, joined into one.

    ``locate``: where a part of this save is (see ``parts.load_parts``); default: beside the index.

    Raises:
        SamplesDirectoryError: The index or a part is unusable, or a part holds latents outside its range.
    """
    index_path = Path(index_path)
    index = read_index(index_path)
    parts = []
    for part in index["parts"]:
        path = part_path(index_path, part["file"], locate)
        payload = load_history(path)
        start, stop = part["latents"]
        rows, samples = payload["rows"]["latent"], payload["samples"]["latent"]
        outside = any(len(v) and (int(v.min()) < start or int(v.max()) >= stop) for v in (rows, samples))
        if int(payload["num_latents"]) != index["num_latents"] or outside:
            raise SamplesDirectoryError(f"{path} holds latents outside {start} to {stop - 1} of"
                                        f" {index['num_latents']}, as its index says; the directory mixes two saves."
                                        " Re-run the save.")
        parts.append(payload)
    return join_histories(parts, index_path)


def load_history(path: PathLike, opened: Optional[IO[bytes]] = None,
                 locate: Optional[Callable[[str], Optional[Path]]] = None) -> dict:
    """Load and check ``training_history.pt`` (tensors only, no pickle); from ``opened`` (``path`` held open) if given.

    Of ``training_history.index.json``, the parts it lists, joined (``locate``: see :func:`load_history_parts`).

    Raises:
        SamplesDirectoryError: One line naming the file and the first field that is not usable.
    """
    if Path(path).name == HISTORY_INDEX_NAME:
        return load_history_parts(path, locate)
    try:
        if opened is not None:
            opened.seek(0)
        payload = torch.load(path if opened is None else opened, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise SamplesDirectoryError(f"Cannot load {path}: {type(err).__name__}. The file is corrupt or unreadable."
                                    ) from err
    try:
        check_history(payload)
    except ValueError as err:
        raise SamplesDirectoryError(f"{path} is not a usable feature history: {err}.") from err
    return payload


def read_existing_history(path: Path) -> Optional[dict]:
    """The payload at ``path`` if one is there (checked), else ``None``."""
    return load_history(path) if path.is_file() else None


def read_committed_history(dirpath: Path) -> Optional[dict]:
    """The history a samples directory holds, whole or in parts (checked), else ``None``."""
    return read_existing_history(dirpath / HISTORY_NAME) or read_existing_history(dirpath / HISTORY_INDEX_NAME)


# ---------------------------------------------------------------------- checks
#: Bounds that keep every reader's arithmetic in int64 and its per-latent tensors of a sane size.
_MAX_STEP = 2**62
_INT64_MAX = 2**63 - 1
#: Highest level: a window of level ``l`` merges at least ``2**l`` saves, and ``saves`` is at most ``_MAX_STEP``.
_MAX_LEVEL = 62
#: Most windows thinning can keep: at most ``MAX_HISTORY_WINDOWS_PER_LEVEL`` on each level.
_MAX_WINDOWS = MAX_HISTORY_WINDOWS_PER_LEVEL * (_MAX_LEVEL + 1)


def _int(payload: dict, key: str, minimum: int, maximum: int = _MAX_STEP) -> int:
    value = payload.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"`{key}` must be an integer in [{minimum}, {maximum}], got {_show(value)}")
    return value


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


#: Fields that may hold NaN: a shuffled row's neighbours' activations are unknown.
MAY_BE_UNKNOWN = ("samples.context_acts",)


def _tensor(value: Any, key: str, shape: tuple[int, ...], floating: bool) -> Tensor:
    if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.is_floating_point() != floating or (
        value.is_complex() or value.dtype == torch.bool
    ):
        kind = "float" if floating else "integer"
        raise ValueError(f"`{key}` must be an {kind} tensor of shape {shape}, got {_show(value)}")
    if floating and key not in MAY_BE_UNKNOWN and value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"`{key}` holds NaN or an infinite value")
    return value


def _group(payload: dict, key: str) -> dict:
    value = payload.get(key)
    if not isinstance(value, dict):
        raise ValueError(f"`{key}` must be a dict, got {_show(value)}")
    return value


def check_history(payload: Any) -> None:
    """Raise a ``ValueError`` naming the first field of a history payload a reader could not use safely."""
    if not isinstance(payload, dict):
        raise ValueError(f"the file must hold a dict, got {_show(payload)}")
    version = payload.get("format_version")
    if version != HISTORY_FORMAT_VERSION:
        raise ValueError(f"`format_version` is {_show(version)}; this version reads {HISTORY_FORMAT_VERSION}")
    num_latents = _int(payload, "num_latents", 1, 2**31)
    top = _int(payload, "top_tokens", 1, 1024)
    width = _int(payload, "context_window", 1, 4097)
    dead_window_steps = _int(payload, "dead_window_steps", 1)
    table = _group(payload, "windows")
    first = table.get("start")
    count = len(first) if isinstance(first, Tensor) and first.dim() == 1 else -1
    if count < 0:
        raise ValueError(f"`windows.start` must be a 1-d integer tensor, got {_show(first)}")
    if count > _MAX_WINDOWS:
        raise ValueError(f"`windows` holds {count} windows; thinning keeps at most {_MAX_WINDOWS}")
    for name in (*WINDOW_SCALARS, "rows", "sample_rows"):
        value = _tensor(table.get(name), f"windows.{name}", (count,), floating=False)
        if count and (int(value.min()) < 0 or int(value.max()) > _MAX_STEP):
            raise ValueError(f"`windows.{name}` must lie in [0, {_MAX_STEP}]")
    if count and (bool((table["end"] < table["start"]).any()) or bool((table["end"][1:] < table["end"][:-1]).any())):
        raise ValueError("`windows.end` must not precede its `start` nor the previous window's end")
    if count and int(table["end"][-1]) + dead_window_steps > _INT64_MAX:
        raise ValueError(f"`dead_window_steps` ({dead_window_steps}) after the last `windows.end`"
                         f" ({int(table['end'][-1])}) passes the largest int64 step")
    _check_levels(table["level"])
    rows, samples = _group(payload, "rows"), _group(payload, "samples")
    total = int(table["rows"].sum())
    for name, dtype in ROW_FIELDS.items():
        shape = (total, top) if name.startswith("token_") else (total,)
        _tensor(rows.get(name), f"rows.{name}", shape, floating=dtype.is_floating_point)
    latent = rows["latent"]
    if total and (int(latent.min()) < 0 or int(latent.max()) >= num_latents):
        raise ValueError(f"`rows.latent` must lie in [0, {num_latents})")
    _check_ascending_within_windows(latent, table["rows"])
    if total and (int(rows["count"].min()) < 1 or int(rows["token_counts"].min()) < 0):
        raise ValueError("`rows.count` must be positive and `rows.token_counts` not negative")
    if total and int(rows["token_ids"].min()) < -1:
        raise ValueError("`rows.token_ids` must be token ids, or -1 where none")
    stored = int(table["sample_rows"].sum())
    for name, dtype in HISTORY_SAMPLE_FIELDS.items():
        shape = (stored, width) if name.startswith("context_") else (stored,)
        _tensor(samples.get(name), f"samples.{name}", shape, floating=dtype.is_floating_point)
    if stored and (int(samples["latent"].min()) < 0 or int(samples["latent"].max()) >= num_latents):
        raise ValueError(f"`samples.latent` must lie in [0, {num_latents})")
    if stored and int(samples["context_tokens"].min()) < -1:
        raise ValueError("`samples.context_tokens` must be token ids, or -1 outside the sequence")
    if stored and int(samples["context_tokens"][:, width // 2].min()) < 0:
        raise ValueError(f"`samples.context_tokens` must hold each sample's activating token at index {width // 2}")
    vocab = _group(payload, "vocab")
    ids = vocab.get("ids")
    if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.is_floating_point():
        raise ValueError(f"`vocab.ids` must be a 1-d integer tensor, got {_show(ids)}")
    strings = vocab.get("strings")
    if not isinstance(strings, list) or len(strings) != len(ids) or not all(isinstance(s, str) for s in strings):
        raise ValueError(f"`vocab.strings` must be a list of {len(ids)} strings, got {_show(strings)}")


def _check_levels(level: Tensor) -> None:
    """Each level holds at most what thinning keeps on it (checked before anything is built per window)."""
    if not len(level):
        return
    if int(level.max()) > _MAX_LEVEL:
        raise ValueError(f"`windows.level` must lie in [0, {_MAX_LEVEL}]")
    crowded = int(torch.bincount(level).max())
    if crowded > MAX_HISTORY_WINDOWS_PER_LEVEL:
        raise ValueError(f"`windows.level` puts {crowded} windows on one level; thinning keeps at most"
                         f" {MAX_HISTORY_WINDOWS_PER_LEVEL}")


def _check_ascending_within_windows(latent: Tensor, rows_per_window: Tensor) -> None:
    """Rows of a window name each latent once, ascending (readers look a latent up by bisection)."""
    if len(latent) < 2:
        return
    starts = torch.cumsum(rows_per_window, 0) - rows_per_window
    opens_window = torch.zeros(len(latent), dtype=torch.bool)
    opens_window[starts[rows_per_window > 0]] = True
    ascending = latent[1:] > latent[:-1]
    if not bool((ascending | opens_window[1:]).all()):
        raise ValueError("`rows.latent` must be strictly ascending within each window (each latent once)")
