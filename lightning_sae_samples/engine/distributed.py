"""Merge the collectors of all processes exactly, at save time, a chunk of latents at a time."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sae_samples.engine.sample_collector import SampleCollector
from lightning_sae_samples.engine.sample_table import ACTS_DTYPES, TOKEN_DTYPES
from lightning_sae_samples.engine.window_pool import wider
from lightning_sae_samples.state.merge import merge_counters, merge_field, merge_padded_tables
from lightning_sae_samples.state.schema import LATENT_FIELDS, RUN_FIELDS, TABLE_NAMES, WINDOW_TOKENS
from lightning_sae_samples.state.tables import concat_sparse_counts, concat_tables, pack_table, sparse_counts
from lightning_sae_samples.state.window_tokens import merge_pairs

CHUNK_BYTES = 32 * 2**20
_RUN_COUNTERS = tuple(field.name for field in RUN_FIELDS if field.merge != "same")
_FIELD = {field.name: field for field in LATENT_FIELDS}
_TRANSFER = {torch.int16: torch.int32}


def _tensors(padded: dict) -> dict[str, Tensor]:
    """The per-latent tensors of a padded export, flat: statistics by name, tables as ``table/field``."""
    out = {name: padded[name] for name in _FIELD if name in padded}
    for table in TABLE_NAMES:
        for name, value in padded.get(table, {}).items():
            out[f"{table}/{name}"] = value
    return out


def state_bytes_per_latent(padded: dict) -> int:
    """Bytes one latent takes in a padded export of a collector state (its capacity, not its fill)."""
    rows = max(1, len(padded["count"]))
    return sum(v.numel() * v.element_size() for v in _tensors(padded).values()) // rows


def window_dtypes(collector: SampleCollector) -> tuple[torch.dtype, torch.dtype]:
    """The widest dtypes of a collector's stored context token ids and activations, over its tables.

    Tables keeping token refs store neither: the narrowest then (nothing is sent in them).
    """
    tables = [t for t in collector.tables.values() if "context_tokens" in t.pool]
    if not tables:
        return TOKEN_DTYPES[0], ACTS_DTYPES[0]
    tokens = functools.reduce(wider, [t.pool["context_tokens"].dtype for t in tables])
    return tokens, functools.reduce(wider, [t.pool["context_acts"].dtype for t in tables])


def gather_merged_state(collector: SampleCollector, strategy: Any, is_root: bool) -> Optional[dict]:
    """All-gather every process's collection and merge it exactly; the result is returned on the root only.

    Gathers go over latents in chunks of about ``CHUNK_BYTES`` per process (padded, so every process sends
    the same shapes); the root merges each chunk and keeps it compact. Besides the live state, the peak
    memory is the compact merged result (root only) and one gathered chunk, whatever the number of latents.

    Args:
        collector: This process's collector (its device must suit the strategy's collectives).
        strategy: The trainer's strategy (``all_gather``).
        is_root: Whether this process keeps the merged state.

    Returns:
        The merged compact CPU state on the root, ``None`` elsewhere.
    """
    head = collector.export_padded(slice(0, 1))
    # Collectives run on the strategy's device, which a state kept in host memory (`state_device`) is not on.
    device = getattr(strategy, "root_device", None) or getattr(strategy, "device", None) or collector.device
    # The window dtypes travel with the counters: every process sends its windows in the widest of all.
    tokens, acts = window_dtypes(collector)
    codes = [TOKEN_DTYPES.index(tokens), ACTS_DTYPES.index(acts)]
    counters = torch.tensor([int(head[name]) for name in _RUN_COUNTERS] + codes, dtype=torch.int64, device=device)
    gathered = strategy.all_gather(counters).reshape(-1, len(_RUN_COUNTERS) + 2).cpu()
    gathered_counters = gathered[:, : len(_RUN_COUNTERS)]
    send = {
        "context_tokens": functools.reduce(wider, [TOKEN_DTYPES[i] for i in gathered[:, -2].tolist()]),
        "context_acts": functools.reduce(wider, [ACTS_DTYPES[i] for i in gathered[:, -1].tolist()]),
    }
    run = {k: v for k, v in head.items() if k not in _FIELD and k not in TABLE_NAMES}
    per_rank = []
    for row in gathered_counters.tolist():
        entry = {**run, **dict(zip(_RUN_COUNTERS, row))}
        entry["tokens_seen"] = torch.tensor(entry["tokens_seen"])
        entry["nonfinite_skipped"] = torch.tensor(entry["nonfinite_skipped"])
        entry["window_tokens_seen"] = torch.tensor(entry["window_tokens_seen"])
        per_rank.append(entry)
    pairs = _gather_pairs(collector.window_pairs, strategy, device)

    num_latents = collector.config.num_latents
    merged: Optional[dict] = functools.reduce(merge_counters, per_rank) if is_root else None
    stats: dict[str, list[Tensor]] = {}
    tables: dict[str, list[dict]] = {}
    chunk = max(1, CHUNK_BYTES // max(1, state_bytes_per_latent(head)))
    for start in range(0, num_latents, chunk):
        local = _tensors(collector.export_padded(slice(start, min(num_latents, start + chunk))))
        # Collectives carry no int16 (gloo, NCCL): token ids travel as int32 and are narrowed back after.
        kept = {name: send.get(name.rsplit("/", 1)[-1], value.dtype) for name, value in local.items()}
        local = {name: value.to(device, _TRANSFER.get(kept[name], kept[name])) for name, value in local.items()}
        gathered = {name: strategy.all_gather(value.contiguous()).cpu().to(kept[name]) for name, value in local.items()}
        if merged is None:
            continue
        ranks = len(per_rank)
        for name, field in _FIELD.items():
            if name in gathered:
                parts = [gathered[name][r] for r in range(ranks)]
                part = functools.reduce(functools.partial(merge_field, field), parts)
                stats.setdefault(name, []).append(sparse_counts(part) if field.sparse else part)
        for table in TABLE_NAMES:
            fields = {key.split("/", 1)[1]: value for key, value in gathered.items() if key.startswith(f"{table}/")}
            if not fields:
                continue
            capacity = fields["values"].shape[2]
            parts = [{name: value[r] for name, value in fields.items()} for r in range(ranks)]
            best = functools.reduce(lambda a, b: merge_padded_tables(a, b, capacity), parts)
            tables.setdefault(table, []).append(pack_table(best, capacity))
    if merged is not None:
        merged[WINDOW_TOKENS.name] = pairs
        merged["hist_edges"] = head["hist_edges"]
        for name, parts in stats.items():
            merged[name] = concat_sparse_counts(parts) if _FIELD[name].sparse else torch.cat(parts)
        merged.update({name: concat_tables(parts) for name, parts in tables.items()})
    return merged


def _gather_pairs(pairs: dict[str, Tensor], strategy: Any, device: torch.device) -> dict[str, Tensor]:
    """Every process's window (latent, token) counts, merged (on every process; they are small)."""
    length = torch.tensor([len(pairs["key"])], dtype=torch.int64, device=device)
    lengths = strategy.all_gather(length).reshape(-1).cpu().tolist()
    longest = max(lengths)
    parts = {}
    for name in ("key", "count"):
        padded = torch.zeros(longest, dtype=torch.int64, device=device)
        padded[: len(pairs[name])] = pairs[name].to(device)
        parts[name] = strategy.all_gather(padded).reshape(len(lengths), longest).cpu()
    merged = {"key": parts["key"][0, : lengths[0]], "count": parts["count"][0, : lengths[0]]}
    for rank in range(1, len(lengths)):
        merged = merge_pairs(merged, {name: parts[name][rank, : lengths[rank]] for name in ("key", "count")})
    return merged
