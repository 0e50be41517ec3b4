"""A compact state cut into consecutive ranges of latents, and such ranges joined back into one state."""

from __future__ import annotations

import torch

from lightning_sae_samples.state.schema import LATENT_FIELDS, TABLE_NAMES, TOKEN_BITS, WINDOW_TOKENS
from lightning_sae_samples.state.tables import (
    concat_sparse_counts,
    concat_tables,
    dense_counts,
    row_offsets,
    sample_fields,
    sparse_counts,
)

#: Run-level counters that every range of one collection holds alike: each range saw the same tokens.
SHARED_COUNTERS = ("tokens_seen", "steps_collected", "first_collected_step", "last_collected_step",
                   "window_tokens_seen", "window_start")


def _rows_per_latent(state: dict, table: str) -> int:
    return int(state["num_intervals"]) if table == "interval" else 1


def slice_state(state: dict, start: int, stop: int) -> dict:
    """Latents ``start:stop`` of a compact state, as a state of ``stop - start`` latents numbered from 0.

    Run-level entries are kept whole (the range saw every token the state did).
    """
    per_latent = {f.name for f in LATENT_FIELDS} | set(TABLE_NAMES) | {WINDOW_TOKENS.name}
    out = {key: value for key, value in state.items() if key not in per_latent}
    out["num_latents"] = stop - start
    for field in LATENT_FIELDS:
        if field.name not in state:
            continue
        value = state[field.name]
        if field.sparse:
            out[field.name] = sparse_counts(dense_counts(value, slice(start, stop)))
        else:
            out[field.name] = value[start:stop].clone()
    for name in TABLE_NAMES:
        if name not in state:
            continue
        table, per = state[name], _rows_per_latent(state, name)
        offsets = row_offsets(table)
        first, last = int(offsets[start * per]), int(offsets[stop * per])
        part = {"capacity": table["capacity"], "count": table["count"][start * per : stop * per].clone()}
        part.update({field: table[field][first:last].clone() for field in sample_fields(table)})
        out[name] = part
    pairs = state.get(WINDOW_TOKENS.name)
    if pairs is not None:
        bounds = torch.tensor([start << TOKEN_BITS, stop << TOKEN_BITS], dtype=torch.int64)
        lo, hi = torch.searchsorted(pairs["key"].cpu(), bounds).tolist()
        out[WINDOW_TOKENS.name] = {"key": pairs["key"][lo:hi] - (start << TOKEN_BITS),
                                   "count": pairs["count"][lo:hi].clone()}
    return out


def concat_states(parts: list[dict]) -> dict:
    """States of consecutive ranges of latents (in order) joined into one state of all their latents.

    Raises:
        ValueError: The ranges did not see the same tokens (their run counters differ), so they are not parts
            of one collection.
    """
    first = parts[0]
    for part in parts[1:]:
        differs = [name for name in SHARED_COUNTERS if name in first and int(part[name]) != int(first[name])]
        if differs:
            name = differs[0]
            raise ValueError(
                f"The latent shards did not see the same tokens: one has {name}={int(first[name])}, another"
                f" {int(part[name])}. Every shard of a data-parallel replica must collect the same batches at the"
                " same steps (the ranks of one tensor-parallel group)."
            )
    per_latent = {f.name for f in LATENT_FIELDS} | set(TABLE_NAMES) | {WINDOW_TOKENS.name}
    out = {key: value for key, value in first.items() if key not in per_latent}
    out["num_latents"] = sum(int(p["num_latents"]) for p in parts)
    for field in LATENT_FIELDS:
        if field.name in first:
            values = [p[field.name] for p in parts]
            out[field.name] = concat_sparse_counts(values) if field.sparse else torch.cat(values)
    for name in TABLE_NAMES:
        if name in first:
            out[name] = concat_tables([p[name] for p in parts])
    if WINDOW_TOKENS.name in first:
        keys, counts, start = [], [], 0
        for part in parts:
            pairs = part[WINDOW_TOKENS.name]
            keys.append(pairs["key"] + (start << TOKEN_BITS))
            counts.append(pairs["count"])
            start += int(part["num_latents"])
        out[WINDOW_TOKENS.name] = {"key": torch.cat(keys), "count": torch.cat(counts)}
    return out
