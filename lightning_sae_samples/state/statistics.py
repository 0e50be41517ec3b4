"""Per-feature statistics and feature ranking, computed from a collector state dict.

One place decides how features are ranked and how each statistic is derived from the streaming
sums, so the writer, the analyzer and the reports agree.
"""

from __future__ import annotations

import math
from typing import Any, Optional, get_args

import torch
from torch import Tensor

from lightning_sae_samples.config import RankBy
from lightning_sae_samples.state.schema import EMPTY
from lightning_sae_samples.state.tables import dense_counts, kept_per_latent, row_samples

#: How features can be ranked (the choices of `rank_features_by`).
RANK_CHOICES: tuple[str, ...] = get_args(RankBy)


def _mean_std(state: dict, idx: Tensor) -> tuple[Tensor, Tensor]:
    count = state["count"][idx].to(torch.float64)
    safe = count.clamp(min=1)
    mean = state["sum"][idx] / safe
    var = (state["sum_sq"][idx] / safe - mean * mean).clamp(min=0)
    fired = count > 0
    return torch.where(fired, mean, 0.0), torch.where(fired, var.sqrt(), 0.0)


def rank_features(state: dict, by: str = "max_activation", limit: Optional[int] = None) -> Tensor:
    """Indices of latents that fired, best first by ``by``; ties go to the lower index.

    Args:
        state: A collector state dict.
        by: One of ``"max_activation"``, ``"activation_count"``, ``"frequency"``.
        limit: Keep at most this many.
    """
    ids, keys = ranking_keys(state, by)
    return best_first(ids, keys, limit)


def ranking_keys(state: dict, by: str) -> tuple[Tensor, Tensor]:
    """The latents that fired, in index order, and the key ``by`` ranks them on (float64)."""
    if by not in RANK_CHOICES:
        raise ValueError(f"`rank_features_by` must be one of {RANK_CHOICES}, got {by!r}.")
    count = state["count"]
    fired = (count > 0).nonzero(as_tuple=True)[0]
    return fired, state["max"][fired].double() if by == "max_activation" else count[fired].double()


def best_first(ids: Tensor, keys: Tensor, limit: Optional[int] = None) -> Tensor:
    """``ids`` ordered by ``keys``, highest first, ties to the lower id (the ranking of :func:`rank_features`).

    Candidates from several shards of latents rank as one state's latents do.
    """
    by_id = torch.argsort(ids, stable=True)
    ids, keys = ids[by_id], keys[by_id]
    ranked = ids[torch.argsort(keys, descending=True, stable=True)]
    return ranked if limit is None else ranked[:limit]


def feature_statistics(state: dict, idx: int) -> dict[str, Any]:
    """The JSON statistics of one latent (see ``docs/format.md``) from a compact state."""
    index = torch.tensor([idx])
    count = int(state["count"][idx])
    tokens_seen = int(state["tokens_seen"])
    mean, std = _mean_std(state, index)
    top_values = row_samples(state["top"], idx, limit=1)["values"]
    kept = int(state["top"]["count"][idx])
    fired = count > 0
    top = float(top_values[0]) if kept else None
    first, last = int(state["first_step"][idx]), int(state["last_step"][idx])
    return {
        "feature_idx": int(idx),
        "num_samples": kept,
        "max_activation": top if top is not None else 0.0,
        "mean_activation": float(mean[0]),
        "std_activation": float(std[0]),
        "min_activation": float(state["min"][idx]) if fired else 0.0,
        "activation_count": count,
        "all_time_max": float(state["max"][idx]) if fired else 0.0,
        "tokens_seen": tokens_seen,
        "frequency": count / tokens_seen if tokens_seen else 0.0,
        "first_step": first if first != EMPTY else None,
        "last_step": last if last != EMPTY else None,
        "histogram": {
            "bin_edges": [float(e) for e in state["hist_edges"]],
            "counts": dense_counts(state["hist"], slice(idx, idx + 1))[0].tolist(),
        },
    }


def _log_frequencies(state: dict) -> Tensor:
    count = state["count"]
    return torch.log10(count[count > 0].double() / int(state["tokens_seen"]))


def lowest_log_frequency(state: dict) -> Optional[float]:
    """log10 of the lowest firing frequency among latents that fired (``None``: none fired, or no tokens)."""
    if not int(state["tokens_seen"]) or not bool((state["count"] > 0).any()):
        return None
    return float(_log_frequencies(state).min())


def frequency_histogram(state: dict, bins_per_decade: int = 2, lowest: Optional[float] = None) -> dict[str, list]:
    """Histogram of log10 firing frequency over latents that fired.

    ``lowest``: the :func:`lowest_log_frequency` its bins start from (default: this state's); a shard of the
    latents passes the lowest of all shards, so that the shards' counts add up to the whole state's histogram.
    """
    lowest = lowest_log_frequency(state) if lowest is None else lowest
    if lowest is None:
        return {"bin_edges": [], "counts": []}
    # At least one bin below 0: when every latent that fired did so on every token, log10 is 0 everywhere.
    low = min(math.floor(lowest * bins_per_decade), -1) / bins_per_decade
    num_bins = math.ceil(-low * bins_per_decade)
    edges = torch.linspace(low, 0.0, num_bins + 1, dtype=torch.float64)
    if int(state["tokens_seen"]):
        counts = torch.histc(_log_frequencies(state), bins=num_bins, min=low, max=0.0).long()
    else:
        counts = torch.zeros(num_bins, dtype=torch.int64)
    return {"bin_edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


#: The counts of :func:`run_summary` that the shards of one collection add up.
SUMMED_COUNTS = ("total_samples_seen", "total_samples_stored", "features_with_samples", "alive_features",
                 "nonfinite_skipped")


def summary_counts(state: dict) -> dict[str, int]:
    """The run summary's counts over this state's latents (:data:`SUMMED_COUNTS`)."""
    kept = kept_per_latent(state, "top")
    return {
        "total_samples_seen": int(state["count"].sum()),
        "total_samples_stored": int(kept.sum()),
        "features_with_samples": int((kept > 0).sum()),
        "alive_features": int((state["count"] > 0).sum()),
        "nonfinite_skipped": int(state["nonfinite_skipped"]),
    }


def run_summary(
    state: dict,
    counts: Optional[dict[str, int]] = None,
    histogram: Optional[dict[str, list]] = None,
    num_latents: Optional[int] = None,
) -> dict[str, Any]:
    """Run-level counts derived from a state dict.

    For a shard of the latents: ``counts`` and ``histogram`` are those of every shard added up
    (:func:`summary_counts`, :func:`frequency_histogram`) and ``num_latents`` the SAE's; the run counters
    (tokens, steps) are the same in every shard.
    """
    counts = summary_counts(state) if counts is None else counts
    num_latents = int(state["num_latents"]) if num_latents is None else num_latents
    stored, alive = counts["total_samples_stored"], counts["alive_features"]
    return {
        "total_samples_seen": counts["total_samples_seen"],
        "total_samples_stored": stored,
        "num_features_tracked": num_latents,
        "avg_samples_per_feature": stored / num_latents if num_latents else 0.0,
        "features_with_samples": counts["features_with_samples"],
        "alive_features": alive,
        "never_fired_features": num_latents - alive,
        "steps_collected": int(state["steps_collected"]),
        "tokens_seen": int(state["tokens_seen"]),
        "nonfinite_skipped": counts["nonfinite_skipped"],
        "first_collected_step": _step_or_none(int(state["first_collected_step"])),
        "last_collected_step": _step_or_none(int(state["last_collected_step"])),
        "histogram_bin_edges": [float(e) for e in state["hist_edges"]],
        "frequency_histogram": frequency_histogram(state) if histogram is None else histogram,
    }


def _step_or_none(step: int) -> Optional[int]:
    return None if step == EMPTY else step
