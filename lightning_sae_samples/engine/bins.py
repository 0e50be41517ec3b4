"""Fixed bin edges: the activation histogram's and the sampled activation intervals'."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    """Bins of float32 values by sets of sorted float64 edges, each as ``torch.bucketize(values, edges, right=True)``.

    A binary search per value is slow on the CPU; instead a value's float32 bits, shifted, pick a cell, and a
    small table per set of edges holds the bin of the cell's lowest value and the one edge (if any) inside the
    cell: one comparison finishes the search. The cells (one cut of the bits for every set) are as coarse as
    leaves at most one edge of a set in each; where edges lie closer than the finest cell allows, the lookup
    falls back to ``torch.bucketize``.
    """

    #: Shifts of the float32 bits tried, coarsest first (a shift of ``s`` makes ``2**(23 - s)`` cells an octave).
    SHIFTS = (20, 19, 18, 17)

    def __init__(self, edge_sets: Sequence[Tensor], device: torch.device | str = "cpu") -> None:
        self.edge_sets = [edges.to(device=device, dtype=torch.float64) for edges in edge_sets]
        self.float32_edge_sets = [float32_edges(edges) for edges in self.edge_sets]
        self.shift: int | None = None
        self.tables: list[tuple[Tensor, Tensor]] = []
        for shift in self.SHIFTS:
            tables = [_cell_table(edges.cpu(), shift) for edges in self.float32_edge_sets]
            if all(table is not None for table in tables):
                self.shift = shift
                self.tables = [(lowest.to(device), inner.to(device)) for lowest, inner in tables]
                break

    def __call__(self, values: Tensor) -> list[Tensor]:
        """The bins of each value (int64) by each set of edges; float32 values take the fast path."""
        if values.dtype != torch.float32:
            return [torch.bucketize(values.double(), edges, right=True) for edges in self.edge_sets]
        if self.shift is None:
            return [torch.bucketize(values, edges, right=True) for edges in self.float32_edge_sets]
        cells = 1 << (32 - self.shift)
        cell = (values.view(torch.int32) >> self.shift) & (cells - 1)  # negative values: the last cells
        return [lowest.index_select(0, cell).add_(values >= inner.index_select(0, cell))
                for lowest, inner in self.tables]


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
