"""How many bytes a collector's state takes, before it is allocated."""

from __future__ import annotations

from typing import Optional

from lightning_sae_samples.engine.bins import HISTOGRAM_BINS
from lightning_sae_samples.engine.sample_collector import CollectorConfig


def _table_bytes(rows: int, capacity: int, window: int, random: bool, dedup: bool, stored: int) -> tuple[int, int]:
    """Bytes of a sample table: its sorted per-row keys, and its window pool holding ``stored`` samples."""
    per_place = 4 + 4 + 8 + 4 + (8 if random else 0) + (8 if dedup else 0)  # values, step, order, slot, ...
    per_sample = 4 + 2 * 4 * window  # position, context tokens and activations at their widest (int32, fp32)
    return rows * capacity * per_place + rows * 8, min(stored, rows * capacity) * per_sample


def estimate_state_bytes(config: CollectorConfig, stored_samples: Optional[int] = None) -> dict[str, int]:
    """Bytes a collector's state takes in memory.

    Args:
        config: The collector's configuration.
        stored_samples: Samples stored per table (the window pools grow with them); ``None``: every table full.

    Returns:
        ``{"fixed": ..., "samples": ..., "total": ...}``: the part allocated up front (per-latent statistics and
        every table's sorted keys), the window pools, and their sum; plus ``"top"``, ``"interval"`` and
        ``"recent"``: each table kind's share of the total, to tell which argument to lower.
    """
    num_latents, window = config.num_latents, config.window
    dedup = config.deduplicate_contexts
    bins = HISTOGRAM_BINS
    stats = num_latents * (8 + 8 + 8 + 4 + 4 + 8 * bins + 8 + 8)
    tables = {"top": [(num_latents, config.max_samples, False, dedup)]}
    if config.samples_per_interval:
        stats += num_latents * config.num_intervals * 8
        tables["interval"] = [(num_latents * config.num_intervals, config.samples_per_interval, True, False)]
    if config.recent_window_steps:
        tables["recent"] = [(num_latents, config.recent_samples, False, dedup)] * 2
    out = {"fixed": stats, "samples": 0}
    for kind, specs in tables.items():
        out[kind] = 0
        for rows, capacity, random, dup in specs:
            stored = rows * capacity if stored_samples is None else stored_samples
            keys, pool = _table_bytes(rows, capacity, window, random, dup, stored)
            out["fixed"] += keys
            out["samples"] += pool
            out[kind] += keys + pool
    out["total"] = out["fixed"] + out["samples"]
    return out
