"""How many bytes a collector's state takes, before it is allocated."""

from __future__ import annotations

from typing import Optional

import torch

from lightning_sae_samples.config import CollectionConfig
from lightning_sae_samples.engine.bins import HISTOGRAM_BINS
from lightning_sae_samples.engine.sample_table import SLOT_DTYPE, STEP_DTYPE, acts_dtype_for, token_dtype_for
from lightning_sae_samples.engine.window_pool import REFS_DTYPE

#: Bytes of a table's sorted keys per place: values (fp32), step, order (int64), pool slot.
_KEY_BYTES = 4 + STEP_DTYPE.itemsize + 8 + SLOT_DTYPE.itemsize


def _table_bytes(
    rows: int, capacity: int, window: int, random: bool, dedup: bool, stored: int, window_bytes: int
) -> tuple[int, int]:
    """Bytes of a sample table: its sorted per-row keys, and its window pool holding ``stored`` samples.

    ``window_bytes``: bytes per window place (token id and activation), or 0 for a pool of token refs.
    """
    per_place = _KEY_BYTES + (8 if random else 0) + (8 if dedup else 0)  # + priority, context hash
    # Position (int32), and the context tokens and activations, or the token ref (int64); the pool's reference count.
    per_sample = 4 + (window * window_bytes if window_bytes else 8) + REFS_DTYPE.itemsize
    # Per row: the merge floor (8) and the fill (int16 below 2**15 places); one scratch window that merges write
    # the samples that do not enter to.
    fill = 2 if capacity < 2**15 else 4
    return rows * capacity * per_place + rows * (8 + fill) + per_sample, min(stored, rows * capacity) * per_sample


def estimate_state_bytes(
    config: CollectionConfig,
    stored_samples: Optional[int] = None,
    *,
    latent_dtype: torch.dtype = torch.float32,
    vocab_size: Optional[int] = None,
) -> dict[str, int]:
    """Bytes a collector's state takes in memory, in the compact dtypes it will use.

    Args:
        config: The collection's settings, with ``num_latents`` set.
        stored_samples: Samples stored per table (the window pools grow with them); ``None``: every table full.
        latent_dtype: Dtype of the latents: context activations are kept in bfloat16/float16 when the latents
            are, else in float32.
        vocab_size: Token ids are kept in int16 while every id is below ``2**15``; ``None`` (unknown) counts
            int32.

    Returns:
        ``{"fixed": ..., "samples": ..., "total": ...}``: the part allocated up front (per-latent statistics and
        every table's sorted keys), the window pools, and their sum; plus ``"top"``, ``"interval"`` and
        ``"recent"`` and ``"window"``: each table kind's share of the total, to tell which argument to lower.
    """
    num_latents, window = config.num_latents, config.window
    token_dtype = torch.int32 if vocab_size is None else token_dtype_for(max(vocab_size - 1, 0))
    window_bytes = token_dtype.itemsize + acts_dtype_for(latent_dtype).itemsize
    if config.row_windows == "refs":  # kept samples of shuffled rows hold their token refs
        window_bytes = 0
    dedup = config.deduplicate_contexts
    bins = HISTOGRAM_BINS
    stats = num_latents * (8 + 8 + 8 + 4 + 4 + 8 * bins + 8 + 8 + 8 + 8 + 4)  # + the history window's statistics
    tables = {"top": [(num_latents, config.max_samples_per_feature, False, dedup)]}
    if config.samples_per_interval:
        stats += num_latents * config.num_intervals * 8
        tables["interval"] = [(num_latents * config.num_intervals, config.samples_per_interval, True, False)]
    if config.recent_window_steps:
        tables["recent"] = [(num_latents, config.recent_samples_per_feature, False, dedup)] * 2
    if config.history_samples_per_feature:
        tables["window"] = [(num_latents, config.history_samples_per_feature, False, dedup)]
    out = {"fixed": stats, "samples": 0}
    for kind, specs in tables.items():
        out[kind] = 0
        for rows, capacity, random, dup in specs:
            stored = rows * capacity if stored_samples is None else stored_samples
            keys, pool = _table_bytes(rows, capacity, window, random, dup, stored, window_bytes)
            out["fixed"] += keys
            out["samples"] += pool
            out[kind] += keys + pool
    out["total"] = out["fixed"] + out["samples"]
    return out
