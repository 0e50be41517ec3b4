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
