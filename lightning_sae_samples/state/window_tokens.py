"""Sparse (latent, token id) activation counts of a history window: sorted distinct keys and their counts.

A key is ``latent << TOKEN_BITS | token``: no ``[F, vocab]`` tensor is ever made, only the pairs that occurred.
Two count sets merge exactly by summing the counts of equal keys (associative and commutative).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lightning_sae_samples.state.schema import TOKEN_BITS


def empty_pairs(device: Union[torch.device, str] = "cpu") -> dict[str, Tensor]:
    """No pairs."""
    return {"key": torch.empty(0, dtype=torch.int64, device=device),
            "count": torch.empty(0, dtype=torch.int64, device=device)}


def pair_keys(latent: Tensor, token: Tensor) -> Tensor:
    """Keys of (latent, token id) pairs (int64)."""
    return (latent.to(torch.int64) << TOKEN_BITS) | token.to(torch.int64)


def compact_pairs(keys: Tensor, counts: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Distinct sorted keys and their summed counts (``counts`` default: one per key)."""
    if counts is None:
        unique, summed = torch.unique(keys, sorted=True, return_counts=True)
        return {"key": unique, "count": summed.to(torch.int64)}
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    summed = torch.zeros(len(unique), dtype=torch.int64, device=keys.device).index_add_(0, inverse, counts.long())
    return {"key": unique, "count": summed}


def merge_pairs(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Exactly merge two pair count sets."""
    if not len(b["key"]):
        return {"key": a["key"].clone(), "count": a["count"].clone()}
    if not len(a["key"]):
        return {"key": b["key"].clone(), "count": b["count"].clone()}
    return compact_pairs(torch.cat([a["key"], b["key"].to(a["key"].device)]),
                         torch.cat([a["count"], b["count"].to(a["count"].device)]))


def top_tokens(pairs: dict[str, Tensor], latents: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """Per latent of ``latents`` (ascending), its ``limit`` most frequent token ids and their counts.

    Ties go to the smaller token id. Returns ``(ids int32 [n, limit], counts int64 [n, limit])``, padded
    with ``-1`` ids and ``0`` counts.
    """
    key, count = pairs["key"].cpu(), pairs["count"].cpu()
    latents = latents.to(torch.int64).cpu()
    ids = torch.full((len(latents), limit), -1, dtype=torch.int32)
    counts = torch.zeros((len(latents), limit), dtype=torch.int64)
    if not len(key) or not len(latents):
        return ids, counts
    latent = key >> TOKEN_BITS
    # Keys are sorted by (latent, token): a stable sort by count descending, then by latent, gives
    # (latent asc, count desc, token asc).
    by_count = torch.argsort(-count, stable=True)
    order = by_count[torch.argsort(latent[by_count], stable=True)]
    latent, key, count = latent[order], key[order], count[order]
    first = torch.ones(len(latent), dtype=torch.bool)
    first[1:] = latent[1:] != latent[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(latent)), 0), 0).values
    rank = torch.arange(len(latent)) - start
    row = torch.searchsorted(latents, latent)
    keep = (rank < limit) & (row < len(latents))
    keep &= latents[row.clamp(max=len(latents) - 1)] == latent
    ids[row[keep], rank[keep]] = (key[keep] & ((1 << TOKEN_BITS) - 1)).to(torch.int32)
    counts[row[keep], rank[keep]] = count[keep]
    return ids, counts
