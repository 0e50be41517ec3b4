"""Fixed bin edges: the activation histogram's and the sampled activation intervals'."""

from __future__ import annotations

import math

import torch
from torch import Tensor

HISTOGRAM_BINS = 40


HISTOGRAM_MAX = 1e4


HISTOGRAM_MIN_FLOOR = 1e-3


INTERVAL_RATIO = math.sqrt(10.0)


def interval_edges(threshold: float, num_intervals: int) -> Tensor:
    """Edges of the activation intervals sampled per latent: half-decades up from the threshold.

    The last interval is open above; values below the first edge (threshold 0) fall into the first.
    """
    low = max(float(threshold), HISTOGRAM_MIN_FLOOR)
    return low * INTERVAL_RATIO ** torch.arange(num_intervals + 1, dtype=torch.float64)


def histogram_edges(threshold: float, num_bins: int = HISTOGRAM_BINS) -> Tensor:
    """Fixed log-spaced bin edges for activation histograms.

    The edges run from ``max(threshold, 1e-3)`` to ``1e4``; values outside fall into the first or
    last bin. Fixed edges make histograms of different processes and resumed runs add up exactly.
    """
    low = max(float(threshold), HISTOGRAM_MIN_FLOOR)
    if low >= HISTOGRAM_MAX:
        low = HISTOGRAM_MAX / 10
    return torch.logspace(math.log10(low), math.log10(HISTOGRAM_MAX), num_bins + 1, dtype=torch.float64)


def float32_edges(edges: Tensor) -> Tensor:
    """The smallest float32 at or above each edge.

    A float32 value lies at or above it exactly when it lies at or above the edge, so bucketing float32 values by
    these edges gives the bins of the float64 edges.
    """
    rounded = edges.to(torch.float32)
    below = rounded.to(edges.dtype) < edges
    return torch.where(below, torch.nextafter(rounded, torch.tensor(math.inf)), rounded)
