"""Indices of a mask's True entries when their count is already known: no host sync to learn it."""

from __future__ import annotations

import torch
from torch import Tensor


def indices_of(mask: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` True entries of a 1-D ``mask``, ascending, without a host sync (the count is known)."""
    try:
        return torch.nonzero_static(mask, size=count).view(-1)
    except (NotImplementedError, RuntimeError):  # a device without nonzero_static
        place = torch.where(mask, torch.cumsum(mask, 0) - 1, count)
        out = torch.empty(count + 1, dtype=torch.int64, device=mask.device)
        return out.scatter_(0, place, torch.arange(len(mask), device=mask.device))[:count]


def indices_of_rows(masks: Tensor, counts: list[int]) -> list[Tensor]:
    """:func:`indices_of` each row of a 2-D ``masks``, whose True entries number ``counts``, found all at once.

    One search over the stacked rows instead of one per row (each a kernel launch on a GPU).
    """
    total = sum(counts)
    try:
        column = torch.nonzero_static(masks, size=total)[:, 1].contiguous()
    except (NotImplementedError, RuntimeError):  # a device without nonzero_static
        column = indices_of(masks.view(-1), total) % masks.shape[1]
    return list(column.split(counts))
