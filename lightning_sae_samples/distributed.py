"""Merge the collectors of all processes exactly, at save time, a chunk of latents at a time."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from lightning_sae_samples.collector import PER_LATENT_FIELDS, merge_counters, merge_states

CHUNK_BYTES = 32 * 2**20


def state_bytes_per_latent(state: dict) -> int:
    """Bytes one latent takes in a collector state."""
    return sum(state[name][:1].numel() * state[name].element_size() for name in PER_LATENT_FIELDS)


def gather_merged_state(local: dict, strategy: Any, is_root: bool) -> Optional[dict]:
    """All-gather every process's state and merge them exactly; the result is returned on the root only.

    Gathers go over latents in chunks of about ``CHUNK_BYTES`` per process, so the peak memory is the
    local state, the merged result (root only) and one gathered chunk, whatever the number of latents.

    Args:
        local: This process's state from ``SampleCollector.tensors()`` (on the collective's device).
        strategy: The trainer's strategy (``all_gather``, ``world_size``).
        is_root: Whether this process keeps the merged state.

    Returns:
        The merged CPU state on the root, ``None`` elsewhere.
    """
    num_latents = int(local["num_latents"])
    scalars = {k: v for k, v in local.items() if k not in PER_LATENT_FIELDS and not torch.is_tensor(v)}
    scalars["hist_edges"] = local["hist_edges"]
    counters = {}
    for name in ("tokens_seen", "nonfinite_skipped"):
        counters[name] = strategy.all_gather(local[name].reshape(1)).reshape(-1).cpu()
    for name in ("steps_collected", "first_collected_step", "last_collected_step"):
        value = torch.tensor([int(local[name])], device=local["count"].device)
        counters[name] = strategy.all_gather(value).reshape(-1).cpu()
    world = len(counters["tokens_seen"])

    per_rank_scalars = []
    for rank in range(world):
        entry = dict(scalars)
        for name, values in counters.items():
            entry[name] = values[rank] if name in ("tokens_seen", "nonfinite_skipped") else int(values[rank])
        per_rank_scalars.append(entry)

    merged: Optional[dict] = None
    if is_root:
        merged = functools.reduce(merge_counters, per_rank_scalars)
        for name in PER_LATENT_FIELDS:
            merged[name] = torch.empty(local[name].shape, dtype=local[name].dtype)
    chunk = max(1, CHUNK_BYTES // max(1, state_bytes_per_latent(local)))
    for start in range(0, num_latents, chunk):
        sel = slice(start, min(num_latents, start + chunk))
        gathered = {name: strategy.all_gather(local[name][sel].contiguous()).cpu() for name in PER_LATENT_FIELDS}
        if merged is None:
            continue
        parts = [{**per_rank_scalars[r], **{n: g[r] for n, g in gathered.items()}} for r in range(world)]
        part = functools.reduce(merge_states, parts)
        for name in PER_LATENT_FIELDS:
            merged[name][sel] = part[name]
    return merged

