"""The compact form of a state: counts by their nonzero entries, sample tables packed row by row."""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from lightning_sae_samples.state.schema import LATENT_FIELDS, SAMPLE_FIELD, TABLE_NAMES, WINDOW_TOKENS, empty_field


def sparse_counts(dense: Tensor) -> dict:
    """Counts ``[rows, ...]`` as their nonzero entries: ``shape``, flat ``index`` (ascending) and ``value``."""
    flat = dense.reshape(-1)
    index = flat.nonzero(as_tuple=True)[0]
    return {"shape": list(dense.shape), "index": index, "value": flat[index]}


def dense_counts(counts: dict, rows: slice = slice(None)) -> Tensor:
    """Rows ``rows`` of :func:`sparse_counts` output, dense (int64, on the CPU)."""
    shape = [int(n) for n in counts["shape"]]
    width = math.prod(shape[1:])
    start, stop, _ = rows.indices(shape[0])
    index, value = counts["index"].cpu(), counts["value"].cpu()
    lo, hi = torch.searchsorted(index, torch.tensor([start * width, stop * width])).tolist()
    out = torch.zeros((stop - start) * width, dtype=torch.int64)
    out[index[lo:hi] - start * width] = value[lo:hi].to(torch.int64)
    return out.view(stop - start, *shape[1:])


def concat_sparse_counts(parts: list[dict]) -> dict:
    """:func:`sparse_counts` of consecutive row ranges joined into one."""
    width = math.prod(int(n) for n in parts[0]["shape"][1:])
    index, value, rows = [], [], 0
    for part in parts:
        index.append(part["index"] + rows * width)
        value.append(part["value"])
        rows += int(part["shape"][0])
    return {"shape": [rows, *parts[0]["shape"][1:]], "index": torch.cat(index), "value": torch.cat(value)}


def table_rows(state: dict, name: str) -> int:
    """Rows of a table: latents, or latents x intervals for ``"interval"``."""
    rows = int(state["num_latents"])
    return rows * int(state["num_intervals"]) if name == "interval" else rows


# ---------------------------------------------------------------------- reading compact tables
_OFFSETS: dict[int, tuple[weakref.ref, Tensor]] = {}


def row_offsets(table: dict) -> Tensor:
    """Start of each row's samples in the packed fields, plus the total at the end (``[rows + 1]``, int64).

    Computed once per ``count`` tensor (states are not changed in place), so reading rows one by one
    costs no pass over every row.
    """
    count = table["count"]
    key = id(count)
    cached = _OFFSETS.get(key)
    if cached is not None and cached[0]() is count:
        return cached[1]
    offsets = torch.zeros(len(count) + 1, dtype=torch.int64)
    torch.cumsum(count.to(torch.int64).cpu(), 0, out=offsets[1:])
    _OFFSETS[key] = (weakref.ref(count, lambda _: _OFFSETS.pop(key, None)), offsets)
    return offsets


def row_samples(table: dict, row: int, limit: Optional[int] = None) -> dict[str, Tensor]:
    """The kept samples of one row (best first, at most ``limit``), as views of the packed fields."""
    offsets = row_offsets(table)
    start, stop = int(offsets[row]), int(offsets[row + 1])
    if limit is not None:
        stop = min(stop, start + limit)
    return {name: value[start:stop] for name, value in table.items() if name in SAMPLE_FIELD}


def rows_index(table: dict, rows: Tensor, limit: Optional[int] = None) -> Tensor:
    """Indices into the packed fields of the first ``limit`` samples of each of ``rows``, row by row."""
    offsets = row_offsets(table)
    rows = rows.to(torch.int64).cpu()
    start = offsets[rows]
    count = offsets[rows + 1] - start
    if limit is not None:
        count = count.clamp(max=limit)
    first = torch.repeat_interleave(start - (torch.cumsum(count, 0) - count), count)
    return first + torch.arange(int(count.sum()))


# ---------------------------------------------------------------------- padded <-> compact
def sample_fields(table: dict) -> list[str]:
    """Names of the per-sample fields a table holds."""
    return [name for name in SAMPLE_FIELD if name in table]


def pad_table(table: dict, rows: slice, capacity: int) -> dict[str, Tensor]:
    """Rows ``rows`` of a compact table as padded ``[rows, capacity, ...]`` tensors (empty places filled)."""
    offsets = row_offsets(table)
    start, stop, _ = rows.indices(len(table["count"]))
    counts = table["count"][start:stop].to(torch.int64).cpu()
    first, last = int(offsets[start]), int(offsets[stop])
    row = torch.repeat_interleave(torch.arange(stop - start), counts)
    column = torch.arange(last - first) - (offsets[start:stop] - first)[row] if len(row) else row
    out = {}
    for name in sample_fields(table):
        value = table[name][first:last]
        shape = (stop - start, capacity, *value.shape[1:])
        padded = torch.full(shape, SAMPLE_FIELD[name].fill, dtype=value.dtype, device=value.device)
        padded[row.to(value.device), column.to(value.device)] = value
        out[name] = padded
    return out


def pack_table(padded: dict[str, Tensor], capacity: int) -> dict:
    """A compact table from padded ``[rows, capacity, ...]`` fields whose kept samples come first per row."""
    key = padded["priority"] if "priority" in padded else padded["values"]
    filled = torch.isfinite(key)
    table: dict = {"capacity": int(capacity), "count": filled.sum(1).to(torch.int32)}
    for name, value in padded.items():
        table[name] = value[filled]
    return table


def empty_table(capacity: int, rows: int, window: int, names: list[str]) -> dict:
    """A compact table with no samples."""
    table: dict = {"capacity": int(capacity), "count": torch.zeros(rows, dtype=torch.int32)}
    for name in names:
        trailing = (window,) if name.startswith("context_") else ()
        table[name] = empty_field(SAMPLE_FIELD[name], (0, *trailing))
    return table


def concat_tables(parts: list[dict]) -> dict:
    """Tables of consecutive row ranges joined into one."""
    out: dict = {"capacity": parts[0]["capacity"], "count": torch.cat([p["count"] for p in parts])}
    for name in sample_fields(parts[0]):
        out[name] = torch.cat([p[name] for p in parts])
    return out


def _window_of(table: dict) -> int:
    """Window length of a table's context fields (0 for a table keeping token refs, which has none)."""
    return int(table["context_tokens"].shape[1]) if "context_tokens" in table else 0


def padded_state(state: dict) -> dict:
    """A compact state laid out as padded tensors: ``{table}_{field}`` of shape ``[F, capacity, ...]``.

    ``[F, num_intervals, capacity, ...]`` for the interval table. Handy to inspect small states; its size is
    the tables' capacity, not what was seen.
    """
    out = {key: value for key, value in state.items() if key not in TABLE_NAMES}
    pairs = out.pop(WINDOW_TOKENS.name, None)
    if pairs is not None:  # the history window's (latent, token) counts, as two flat tensors
        out[f"{WINDOW_TOKENS.name}_key"], out[f"{WINDOW_TOKENS.name}_count"] = pairs["key"], pairs["count"]
    for field in LATENT_FIELDS:
        if field.sparse and field.name in state:
            out[field.name] = dense_counts(state[field.name])
    num_latents = int(state["num_latents"])
    for name in TABLE_NAMES:
        if name not in state:
            continue
        table = state[name]
        padded = pad_table(table, slice(None), int(table["capacity"]))
        for field, value in padded.items():
            if name == "interval":
                value = value.reshape(num_latents, -1, *value.shape[1:])
            out[f"{name}_{field}"] = value
    return out


def kept_per_latent(state: dict, name: str = "top") -> Tensor:
    """Samples a table keeps per latent (int64 ``[F]``; summed over intervals for ``"interval"``)."""
    count = state[name]["count"].to(torch.int64)
    return count.view(int(state["num_latents"]), -1).sum(1)
