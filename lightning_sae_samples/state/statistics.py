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
    if by not in RANK_CHOICES:
        raise ValueError(f"`rank_features_by` must be one of {RANK_CHOICES}, got {by!r}.")
    count = state["count"]
    fired = (count > 0).nonzero(as_tuple=True)[0]
    key = state["max"][fired].double() if by == "max_activation" else count[fired].double()
    order = torch.argsort(key, descending=True, stable=True)
    ranked = fired[order]
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


def frequency_histogram(state: dict, bins_per_decade: int = 2) -> dict[str, list]:
    """Histogram of log10 firing frequency over latents that fired."""
    tokens_seen = int(state["tokens_seen"])
    count = state["count"]
    fired = count[count > 0].double()
    if not tokens_seen or fired.numel() == 0:
        return {"bin_edges": [], "counts": []}
    log_freq = torch.log10(fired / tokens_seen)
    # At least one bin below 0: when every latent that fired did so on every token, log10 is 0 everywhere.
    low = min(math.floor(float(log_freq.min()) * bins_per_decade), -1) / bins_per_decade
    num_bins = math.ceil(-low * bins_per_decade)
    edges = torch.linspace(low, 0.0, num_bins + 1, dtype=torch.float64)
    counts = torch.histc(log_freq, bins=num_bins, min=low, max=0.0).long()
    return {"bin_edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def run_summary(state: dict) -> dict[str, Any]:
    """Run-level counts derived from a state dict."""
    num_latents = int(state["num_latents"])
    kept = kept_per_latent(state, "top")
    alive = int((state["count"] > 0).sum())
    stored = int(kept.sum())
    return {
        "total_samples_seen": int(state["count"].sum()),
        "total_samples_stored": stored,
        "num_features_tracked": num_latents,
        "avg_samples_per_feature": stored / num_latents if num_latents else 0.0,
        "features_with_samples": int((kept > 0).sum()),
        "alive_features": alive,
        "never_fired_features": num_latents - alive,
        "steps_collected": int(state["steps_collected"]),
        "tokens_seen": int(state["tokens_seen"]),
        "nonfinite_skipped": int(state["nonfinite_skipped"]),
        "first_collected_step": _step_or_none(int(state["first_collected_step"])),
        "last_collected_step": _step_or_none(int(state["last_collected_step"])),
        "histogram_bin_edges": [float(e) for e in state["hist_edges"]],
        "frequency_histogram": frequency_histogram(state),
    }


def _step_or_none(step: int) -> Optional[int]:
    return None if step == EMPTY else step
