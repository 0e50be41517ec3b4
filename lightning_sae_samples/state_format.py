"""The collector state, declared once: its fields, their scope, dtype, fill value and merge rule.

As torchmetrics declares a metric's states with ``add_state(name, default, dist_reduce_fx)``, this module
declares every entry of a collector state; the collector's initial state, its compact export and loading,
``empty_like``, the exact merge across processes and resumes (:func:`merge_states`) and the compatibility
check on resume are generated from these declarations. It imports nothing from the tensor engine, so the
readers (:mod:`~lightning_sae_samples.storage`, :mod:`~lightning_sae_samples.statistics`, the analyzer)
read states without it.

The compact form (``format_version`` :data:`STATE_FORMAT_VERSION`) holds what was seen, not the capacity:
every sample table is a dict under its name (``state["top"]``, ``state["interval"]``, ...) with
``capacity``, a per-row ``count`` (int32) and the kept samples packed row-major, each row best first.
Rows of the ``interval`` table are ``latent * num_intervals + interval``. Counts per latent and bin or
interval (``hist``, ``interval_count``) are stored by their nonzero entries (:func:`sparse_counts`).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

#: Version of the collection summary and feature files (``collection_summary.json``).
FORMAT_VERSION = 1
#: Version of the collector state (checkpoint entry and ``full_state.pt``): 2 is the compact form.
STATE_FORMAT_VERSION = 2
EMPTY = -1
#: Sample tables, in the order they appear in a state.
TABLE_NAMES = ("top", "interval", "recent", "recent_prev")
#: Per-sample fields that say where a sample was seen; the rest of a sample's fields are its sort keys.
WINDOW_FIELDS = ("position", "context_tokens", "context_acts")
#: Per-sample fields every table has (``priority`` and ``hash`` only where random or de-duplicated).
TABLE_FIELDS = ("values", "step", "order", *WINDOW_FIELDS)
#: Latent chunk of whole-state merges, which go through padded ``[rows, capacity]`` tables.
MERGE_CHUNK_SAMPLES = 1 << 20

Number = Union[int, float]


@dataclass(frozen=True)
class StateField:
    """One declared entry of a collector state.

    Args:
        name: Key in the state (for a sample field: key inside its table's dict).
        scope: ``"latent"`` (first dimension ``F``), ``"interval"`` (``[F, num_intervals]``), ``"run"`` (one
            value per run) or ``"sample"`` (one per kept sample of a table).
        dtype: Tensor dtype (``None``: a plain Python value).
        fill: Value of an empty entry.
        merge: How two states combine: ``"sum"``, ``"min"``, ``"max"``, ``"first"`` (earliest step, ignoring
            ``EMPTY``), ``"last"`` (latest step), ``"same"`` (must be equal; checked on merge), or
            ``"top-k"`` (sample fields: re-ranked over both, see :func:`merge_padded_tables`).
        sparse: Counts stored by their nonzero entries (see :func:`sparse_counts`): dense in memory, but
            in the compact form only what was counted.
    """

    name: str
    scope: str
    dtype: Optional[torch.dtype]
    fill: Number
    merge: str
    sparse: bool = False


#: Configuration entries: equal in states that merge (``check_compatible``).
CONFIG_FIELDS = (
    StateField("num_latents", "run", None, 0, "same"),
    StateField("max_samples", "run", None, 0, "same"),
    StateField("context_size", "run", None, 0, "same"),
    StateField("threshold", "run", None, 0.0, "same"),
    StateField("samples_per_interval", "run", None, 0, "same"),
    StateField("num_intervals", "run", None, 8, "same"),
    StateField("recent_window_steps", "run", None, None, "same"),
    StateField("recent_samples", "run", None, 10, "same"),
    StateField("seed", "run", None, 0, "same"),
    StateField("deduplicate_contexts", "run", None, False, "same"),
)
#: Config entries whose difference makes two states unmergeable (the threshold shows in the edges).
MERGE_KEYS = ("num_latents", "max_samples", "context_size", "samples_per_interval", "recent_window_steps",
              "deduplicate_contexts")
#: Run-level counters.
RUN_FIELDS = (
    StateField("tokens_seen", "run", torch.int64, 0, "sum"),
    StateField("nonfinite_skipped", "run", torch.int64, 0, "sum"),
    StateField("steps_collected", "run", None, 0, "max"),
    StateField("first_collected_step", "run", None, EMPTY, "first"),
    StateField("last_collected_step", "run", None, EMPTY, "last"),
    StateField("recent_block", "run", None, EMPTY, "same"),
)
#: Streaming statistics per latent (``hist`` has a second dimension: the histogram bins).
STAT_FIELDS = (
    StateField("count", "latent", torch.int64, 0, "sum"),
    StateField("sum", "latent", torch.float64, 0.0, "sum"),
    StateField("sum_sq", "latent", torch.float64, 0.0, "sum"),
    StateField("max", "latent", torch.float32, -math.inf, "max"),
    StateField("min", "latent", torch.float32, math.inf, "min"),
    StateField("hist", "latent", torch.int64, 0, "sum", sparse=True),
    StateField("first_step", "latent", torch.int64, EMPTY, "first"),
    StateField("last_step", "latent", torch.int64, EMPTY, "last"),
)
#: Activations per latent and interval (only with interval sampling).
INTERVAL_FIELDS = (StateField("interval_count", "interval", torch.int64, 0, "sum", sparse=True),)
#: Fields of one kept sample, in every table.
SAMPLE_FIELDS = (
    StateField("values", "sample", torch.float32, -math.inf, "top-k"),
    StateField("priority", "sample", torch.float64, -math.inf, "top-k"),
    StateField("step", "sample", torch.int64, EMPTY, "top-k"),
    StateField("order", "sample", torch.int64, EMPTY, "top-k"),
    StateField("hash", "sample", torch.int64, 0, "top-k"),
    StateField("position", "sample", torch.int32, EMPTY, "top-k"),
    # Window fields are stored in the smallest dtype that holds them: token ids in int16 while every id seen is
    # below 2**15, else int32; activations in the latents' own bfloat16/float16, else float32. Merges widen.
    StateField("context_tokens", "sample", torch.int32, EMPTY, "top-k"),
    StateField("context_acts", "sample", torch.float32, 0.0, "top-k"),
)
SAMPLE_FIELD = {f.name: f for f in SAMPLE_FIELDS}
#: Per-latent tensors of a state (indexed by latent), with their declarations.
LATENT_FIELDS = (*STAT_FIELDS, *INTERVAL_FIELDS)


def empty_field(field: StateField, shape: tuple[int, ...], device: Union[torch.device, str] = "cpu") -> Tensor:
    """A tensor of ``shape`` holding ``field``'s empty value."""
    return torch.full(shape, field.fill, dtype=field.dtype, device=device)


def merge_field(field: StateField, a: Tensor, b: Tensor) -> Tensor:
    """Combine two values of one field by its merge rule."""
    if field.merge == "sum":
        return a + b
    if field.merge in ("max", "last"):
        return torch.maximum(a, b)
    if field.merge == "min":
        return torch.minimum(a, b)
    if field.merge == "first":
        return torch.where((a == EMPTY) | ((b != EMPTY) & (b < a)), b, a)
    raise ValueError(f"Field {field.name!r} has no tensor merge rule ({field.merge!r}).")


def _merge_number(field: StateField, a: int, b: int) -> int:
    if field.merge == "sum":
        return a + b
    if field.merge in ("max", "last"):
        return max(a, b)
    if field.merge == "first":
        present = [s for s in (a, b) if s != EMPTY]
        return min(present) if present else EMPTY
    return a


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


def sort_samples(priority: Tensor, step: Tensor, order: Tensor) -> Tensor:
    """Indices that order samples along the last dim by priority desc, then ``(step, order)`` asc."""
    perm = torch.argsort(order, dim=-1, stable=True)
    perm = torch.gather(perm, -1, torch.argsort(torch.gather(step, -1, perm), dim=-1, stable=True))
    by_priority = torch.argsort(torch.gather(priority, -1, perm), dim=-1, descending=True, stable=True)
    return torch.gather(perm, -1, by_priority)


def merge_padded_tables(a: dict[str, Tensor], b: dict[str, Tensor], capacity: int) -> dict[str, Tensor]:
    """Exactly merge two padded tables with the same rows: each row keeps its best ``capacity`` of both."""
    key = "priority" if "priority" in a else "values"
    both = {name: torch.cat([a[name], b[name]], dim=1) for name in a}
    best = sort_samples(both[key], both["step"], both["order"])
    if "hash" in both:
        # De-duplicated tables: of samples with the same context, only the best stays.
        hashes = torch.gather(both["hash"], 1, best)
        filled = torch.isfinite(torch.gather(both[key], 1, best))
        by_hash = torch.argsort(hashes, dim=1, stable=True)
        sorted_hash = torch.gather(hashes, 1, by_hash)
        repeat = torch.zeros_like(filled)
        repeat[:, 1:] = sorted_hash[:, 1:] == sorted_hash[:, :-1]
        duplicate = torch.zeros_like(filled).scatter(1, by_hash, repeat) & filled
        best = torch.gather(best, 1, torch.argsort(duplicate.to(torch.int8), dim=1, stable=True))
    best = best[:, :capacity]
    out = {}
    for name, value in both.items():
        index = best if value.dim() == 2 else best.unsqueeze(-1).expand(-1, -1, value.shape[-1])
        out[name] = torch.gather(value, 1, index)
    return out


def merge_tables(a: dict, b: dict, rows: Optional[slice] = None) -> dict:
    """Exactly merge two compact tables (all rows, or ``rows``), a bounded chunk of rows at a time."""
    capacity = int(a["capacity"])
    start, stop, _ = (rows or slice(None)).indices(len(a["count"]))
    chunk = max(1, MERGE_CHUNK_SAMPLES // max(1, capacity))
    parts = []
    for first in range(start, stop, chunk):
        part = slice(first, min(stop, first + chunk))
        merged = merge_padded_tables(pad_table(a, part, capacity), pad_table(b, part, capacity), capacity)
        parts.append(pack_table(merged, capacity))
    if not parts:
        return empty_table(capacity, 0, _window_of(a), sample_fields(a))
    return concat_tables(parts)


def _window_of(table: dict) -> int:
    return int(table["context_tokens"].shape[1])


# ---------------------------------------------------------------------- whole states
def check_state_version(state: object, source: str = "collector state") -> None:
    """Raise a clear error unless ``state`` is a compact collector state of this version."""
    if not isinstance(state, dict):
        raise ValueError(f"The {source} is not a dict; it was not written by lightning-sae-samples.")
    version = state.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(
            f"The {source} has state format_version {version!r}; this version of lightning-sae-samples reads"
            f" {STATE_FORMAT_VERSION} (compact tables). Read it with the lightning-sae-samples version that"
            " wrote it, or collect again."
        )


def check_compatible(a: dict, b: dict) -> None:
    """Raise a clear error when two states cannot be merged."""
    for key in MERGE_KEYS:
        if a.get(key) != b.get(key):
            raise ValueError(f"Cannot merge collector states with different {key}: {a.get(key)} and {b.get(key)}.")
    if not torch.equal(a["hist_edges"], b["hist_edges"]):
        raise ValueError("Cannot merge collector states with different histogram bin edges (threshold changed).")
    if a.get("recent_block", EMPTY) != b.get("recent_block", EMPTY):
        raise ValueError(
            f"Cannot merge recent windows of different blocks ({a.get('recent_block')} and {b.get('recent_block')})."
        )


def merge_counters(a: dict, b: dict) -> dict:
    """Merge the run-level entries of two states: every entry that is neither per latent nor a table."""
    per_latent = {f.name for f in LATENT_FIELDS} | set(TABLE_NAMES)
    merged = {key: value for key, value in a.items() if key not in per_latent}
    for field in RUN_FIELDS:
        if field.name not in a:
            continue
        if field.dtype is not None:
            merged[field.name] = merge_field(field, a[field.name], b[field.name])
        else:
            merged[field.name] = _merge_number(field, int(a[field.name]), int(b[field.name]))
    return merged


def merge_states(a: dict, b: dict, latents: Optional[slice] = None) -> dict:
    """Exactly merge two compact collector states, optionally only a slice of latents.

    Every sample table is re-ranked over the union (priority, then earliest ``(step, order)``); the
    statistics combine by their declared rule. ``merge_states`` is associative and commutative, so it
    serves DDP gathers and resumes alike.
    """
    check_compatible(a, b)
    sel = slice(None) if latents is None else latents
    merged = merge_counters(a, b)
    for field in LATENT_FIELDS:
        if field.name in a and field.sparse:
            both = dense_counts(a[field.name], sel) + dense_counts(b[field.name], sel)
            merged[field.name] = sparse_counts(both)
        elif field.name in a:
            merged[field.name] = merge_field(field, a[field.name][sel], b[field.name][sel])
    start, stop, _ = sel.indices(int(a["num_latents"]))
    for name in TABLE_NAMES:
        if name in a:
            per = int(a["num_intervals"]) if name == "interval" else 1
            merged[name] = merge_tables(a[name], b[name], slice(start * per, stop * per))
    return merged


def padded_state(state: dict) -> dict:
    """A compact state laid out as padded tensors: ``{table}_{field}`` of shape ``[F, capacity, ...]``.

    ``[F, num_intervals, capacity, ...]`` for the interval table. Handy to inspect small states; its size is
    the tables' capacity, not what was seen.
    """
    out = {key: value for key, value in state.items() if key not in TABLE_NAMES}
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
