"""Number formatting shared by the console, Markdown and HTML renderers."""

from __future__ import annotations

from typing import Optional


def value(number: float) -> str:
    """An activation value with four significant digits (``7.5``, ``0.1234``, ``1.235e+04``)."""
    return f"{number:.4g}"


def signed(number: float) -> str:
    """A logit change with its sign and four significant digits (``+1.234``, ``-0.5``)."""
    return f"{number:+.4g}"


def count(number: int) -> str:
    """An integer with thousands separators."""
    return f"{int(number):,}"


def frequency(number: float) -> str:
    """A firing frequency as a percentage (``1.65%``, ``0.0012%``)."""
    percent = 100.0 * number
    if percent == 0:
        return "0%"
    return f"{percent:.3g}%"


def step(number: Optional[int]) -> str:
    """A training step, or ``–`` when there is none."""
    return "–" if number is None else str(int(number))


def edge_label(low: float, high: float) -> str:
    """Label of a histogram bin ``[low, high)``."""
    return f"{low:.3g}–{high:.3g}"


def interval(low: float, high: Optional[float], low_open: bool = False) -> str:
    """An activation interval in interval notation: ``(0.5, 1.581)``, ``[1.581, 5)``, ``[1581, ∞)``."""
    opening = "(" if low_open else "["
    return f"{opening}{value(low)}, {'∞' if high is None else value(high)})"


def overlap(number: Optional[float]) -> str:
    """A recent overlap (a share in ``[0, 1]``) with two decimals, or ``–`` when there is none."""
    return "–" if number is None else f"{number:.2f}"


def step_range(steps: Optional[tuple[int, int]]) -> str:
    """``first–last`` of a step window, or ``–``."""
    return "–" if steps is None else f"{steps[0]}–{steps[1]}"


DRIFT_FLAG = "low recent overlap"


def drift_note(recent_overlap: Optional[float], num_recent: int, threshold: float) -> Optional[str]:
    """The flag of a latent whose recent top samples share few activating tokens with its all-time top.

    Args:
        recent_overlap: Its recent overlap, or ``None`` (no recent window).
        num_recent: Recent samples it has (0: it did not fire in the recent window).
        threshold: Overlaps below this are flagged.

    Returns:
        ``None`` when not flagged, else a sentence starting with :data:`DRIFT_FLAG`.
    """
    if recent_overlap is None or recent_overlap >= threshold:
        return None
    head = f"{DRIFT_FLAG} {overlap(recent_overlap)} < {threshold:g}"
    if num_recent == 0:
        return f"{head}: it did not fire in the recent window"
    return f"{head}: meaning may have moved"
