"""Histogram bins for display: trimmed to the occupied range, with bar fractions and text bars."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_sae_samples.render import formatting

_EIGHTHS = " ▏▎▍▌▋▊▉"
FULL_BLOCK = "█"


@dataclass(frozen=True)
class DisplayBin:
    """One histogram bin ready to draw.

    Attributes:
        low: Lower edge.
        high: Upper edge.
        count: Values in the bin.
        fraction: ``count`` relative to the largest bin (0..1).
        label: Human-readable ``low–high``.
    """

    low: float
    high: float
    count: int
    fraction: float
    label: str


def display_bins(
    bin_edges: Sequence[float], counts: Sequence[int], *, log10_edges: bool = False
) -> list[DisplayBin]:
    """Bins from the first to the last non-empty one.

    Args:
        bin_edges: ``len(counts) + 1`` edges.
        counts: Count per bin.
        log10_edges: Edges are log10 of the quantity (the frequency histogram); labels show ``10**edge``.

    Returns:
        An empty list when every count is zero.
    """
    occupied = [i for i, c in enumerate(counts) if c > 0]
    if not occupied or len(bin_edges) != len(counts) + 1:
        return []
    top = max(counts)
    bins = []
    for i in range(occupied[0], occupied[-1] + 1):
        low, high = float(bin_edges[i]), float(bin_edges[i + 1])
        if log10_edges:
            low, high = 10.0**low, 10.0**high
        bins.append(DisplayBin(low, high, int(counts[i]), counts[i] / top, formatting.edge_label(low, high)))
    return bins


def text_bar(fraction: float, width: int = 30) -> str:
    """A bar of block characters ``fraction * width`` cells long, in eighths of a cell.

    A non-zero fraction always shows at least one eighth.
    """
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    if fraction > 0:
        eighths = max(eighths, 1)
    full, rest = divmod(eighths, 8)
    return FULL_BLOCK * full + (_EIGHTHS[rest] if rest else "")


def text_histogram(bins: Sequence[DisplayBin], width: int = 30) -> list[str]:
    """Aligned text lines ``label  bar  count``, one per bin."""
    if not bins:
        return []
    label_width = max(len(b.label) for b in bins)
    count_width = max(len(formatting.count(b.count)) for b in bins)
    return [
        f"{b.label:>{label_width}}  {text_bar(b.fraction, width):<{width}}  {formatting.count(b.count):>{count_width}}"
        for b in bins
    ]
