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


class BinLookup:
    """Bins of float32 values by sorted float64 edges, as ``torch.bucketize(values, edges, right=True)``.

    A binary search per value is slow on the CPU; instead a value's float32 bits, shifted, pick a cell of a
    small table, which holds the bin of the cell's lowest value and the one edge (if any) inside the cell: one
    comparison finishes the search. The cells are as coarse as leaves at most one edge in each; where edges lie
    closer than the finest cell allows, the lookup falls back to ``torch.bucketize``.
    """

    #: Shifts of the float32 bits tried, coarsest first (a shift of ``s`` makes ``2**(23 - s)`` cells an octave).
    SHIFTS = (20, 19, 18, 17)

    def __init__(self, edges: Tensor, device: torch.device | str = "cpu") -> None:
        self.edges = edges.to(device=device, dtype=torch.float64)
        self.float32_edges = float32_edges(self.edges)
        self.shift: int | None = None
        for shift in self.SHIFTS:
            table = _cell_table(self.float32_edges.cpu(), shift)
            if table is not None:
                self.shift = shift
                self.lowest_bin, self.inner_edge = (t.to(device) for t in table)
                break

    def __call__(self, values: Tensor) -> Tensor:
        """The bin of each value (int64); float32 values take the fast path."""
        if values.dtype != torch.float32:
            return torch.bucketize(values.double(), self.edges, right=True)
        if self.shift is None:
            return torch.bucketize(values, self.float32_edges, right=True)
        cell = (values.view(torch.int32) >> self.shift) & (len(self.lowest_bin) - 1)  # negative values: last cells
        return self.lowest_bin.index_select(0, cell).add_(values >= self.inner_edge.index_select(0, cell))


def _cell_table(edges: Tensor, shift: int) -> tuple[Tensor, Tensor] | None:
    """Per cell of float32 bits ``>> shift``, the bin of its lowest value and its one inner edge (NaN if none).

    Cells of negative values come last (their bits are negative). ``None`` if a cell holds two edges.
    """
    cells = 1 << (32 - shift)
    key = torch.arange(cells, dtype=torch.int64)
    key = torch.where(key < cells // 2, key, key - cells)
    first = (key << shift).to(torch.int32).view(torch.float32)
    last = ((key << shift) + (1 << shift) - 1).to(torch.int32).view(torch.float32)
    # A cell's values lie between its ends; an end that is NaN (past an infinity) gives way to the other.
    first, last = torch.where(first.isnan(), last, first), torch.where(last.isnan(), first, last)
    low, high = torch.minimum(first, last), torch.maximum(first, last)
    lowest_bin = torch.bucketize(low, edges, right=True)
    edges_inside = torch.bucketize(high, edges, right=True) - lowest_bin
    if bool((edges_inside > 1).any()):
        return None
    inner = edges[lowest_bin.clamp(max=len(edges) - 1)] if len(edges) else torch.zeros(cells)
    return lowest_bin, torch.where(edges_inside == 1, inner, math.nan)
