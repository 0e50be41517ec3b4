"""Merge the collectors of all processes exactly, at save time, a chunk of latents at a time."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from lightning_sae_samples.collector import SampleCollector, merge_counters, merge_states, per_latent_fields

CHUNK_BYTES = 32 * 2**20
_RUN_COUNTERS = ("tokens_seen", "nonfinite_skipped", "steps_collected", "first_collected_step", "last_collected_step")


def state_bytes_per_latent(state: dict) -> int:
    """Bytes one latent takes in an exported collector state."""
    return sum(state[name][:1].numel() * state[name].element_size() for name in per_latent_fields(state))


def gather_merged_state(collector: SampleCollector, strategy: Any, is_root: bool) -> Optional[dict]:
    """All-gather every process's collection and merge it exactly; the result is returned on the root only.

    Gathers go over latents in chunks of about ``CHUNK_BYTES`` per process, so besides the live state the
    peak memory is the merged result (root only) and one gathered chunk, whatever the number of latents.

    Args:
        collector: This process's collector (its device must suit the strategy's collectives).
        strategy: The trainer's strategy (``all_gather``).
        is_root: Whether this process keeps the merged state.

    Returns:
        The merged CPU state on the root, ``None`` elsewhere.
    """
    head = collector.export(slice(0, 1))
    fields = per_latent_fields(head)
    device = collector.device
    counters = torch.tensor([int(head[name]) for name in _RUN_COUNTERS], dtype=torch.int64, device=device)
    gathered_counters = strategy.all_gather(counters).reshape(-1, len(_RUN_COUNTERS)).cpu()
    per_rank = []
    for row in gathered_counters.tolist():
        entry = {k: v for k, v in head.items() if k not in fields}
        entry.update(zip(_RUN_COUNTERS, row))
        entry["tokens_seen"] = torch.tensor(entry["tokens_seen"])
        entry["nonfinite_skipped"] = torch.tensor(entry["nonfinite_skipped"])
        per_rank.append(entry)

    num_latents = collector.config.num_latents
    merged: Optional[dict] = None
    if is_root:
        merged = functools.reduce(merge_counters, per_rank)
        merged["hist_edges"] = head["hist_edges"]
        for name in fields:
            merged[name] = torch.empty((num_latents, *head[name].shape[1:]), dtype=head[name].dtype)
    chunk = max(1, CHUNK_BYTES // max(1, state_bytes_per_latent(head)))
    for start in range(0, num_latents, chunk):
        local = collector.export(slice(start, min(num_latents, start + chunk)))
        gathered = {name: strategy.all_gather(local[name].contiguous()).cpu() for name in fields}
        if merged is None:
            continue
        parts = [{**per_rank[r], **{n: g[r] for n, g in gathered.items()}} for r in range(len(per_rank))]
        part = functools.reduce(merge_states, parts)
        for name in fields:
            merged[name][start : start + len(part[name])] = part[name]
    return merged
