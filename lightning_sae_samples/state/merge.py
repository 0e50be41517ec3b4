"""The exact merge of two states (processes, resumes): associative, field by field."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_sae_samples.state.schema import (
    EMPTY,
    LATENT_FIELDS,
    MERGE_KEYS,
    ROW_WINDOWS_KEY,
    RUN_FIELDS,
    TABLE_NAMES,
    TOKEN_BITS,
    TOKEN_SOURCE_KEY,
    WINDOW_TOKENS,
    StateField,
)
from lightning_sae_samples.state.tables import (
    _window_of,
    concat_tables,
    dense_counts,
    empty_table,
    pack_table,
    pad_table,
    sample_fields,
    sparse_counts,
)
from lightning_sae_samples.state.window_tokens import empty_pairs, merge_pairs

#: Latent chunk of whole-state merges, which go through padded ``[rows, capacity]`` tables.
MERGE_CHUNK_SAMPLES = 1 << 20


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


def check_compatible(a: dict, b: dict) -> None:
    """Raise a clear error when two states cannot be merged."""
    for key in MERGE_KEYS:
        if a.get(key) != b.get(key):
            raise ValueError(f"Cannot merge collector states with different {key}: {a.get(key)} and {b.get(key)}.")
    if not torch.equal(a["hist_edges"], b["hist_edges"]):
        raise ValueError("Cannot merge collector states with different histogram bin edges (threshold changed).")
    for key in (ROW_WINDOWS_KEY, TOKEN_SOURCE_KEY):
        if a.get(key) != b.get(key):
            raise ValueError(
                f"Cannot merge collector states with different {key}: {a.get(key)} and {b.get(key)} (a state keeping"
                " token refs merges only with one keeping refs into the same source)."
            )
    if a.get("recent_block", EMPTY) != b.get("recent_block", EMPTY):
        raise ValueError(
            f"Cannot merge recent windows of different blocks ({a.get('recent_block')} and {b.get('recent_block')})."
        )


def merge_counters(a: dict, b: dict) -> dict:
    """Merge the run-level entries of two states: every entry that is neither per latent nor a table."""
    per_latent = {f.name for f in LATENT_FIELDS} | set(TABLE_NAMES)
    merged = {key: value for key, value in a.items() if key not in per_latent}
    if WINDOW_TOKENS.name in a or WINDOW_TOKENS.name in b:
        merged[WINDOW_TOKENS.name] = merge_pairs(a.get(WINDOW_TOKENS.name) or empty_pairs(),
                                                 b.get(WINDOW_TOKENS.name) or empty_pairs())
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
    if WINDOW_TOKENS.name in merged:
        pairs = merged[WINDOW_TOKENS.name]
        bounds = torch.tensor([start << TOKEN_BITS, stop << TOKEN_BITS], dtype=torch.int64)
        lo, hi = torch.searchsorted(pairs["key"].cpu(), bounds).tolist()
        merged[WINDOW_TOKENS.name] = {name: value[lo:hi] for name, value in pairs.items()}
    for name in TABLE_NAMES:
        if name in a:
            per = int(a["num_intervals"]) if name == "interval" else 1
            merged[name] = merge_tables(a[name], b[name], slice(start * per, stop * per))
    return merged
