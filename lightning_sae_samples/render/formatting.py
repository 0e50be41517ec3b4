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
