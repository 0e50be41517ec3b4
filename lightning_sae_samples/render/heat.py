"""Colour of a token by the latent's activation on it, relative to the feature's maximum."""

from __future__ import annotations

from typing import Optional

_LOW = (255, 243, 214)
_HIGH = (234, 88, 12)


def strength(activation: Optional[float], feature_max: float) -> float:
    """``activation / feature_max`` clipped to ``[0, 1]`` (0 when the maximum is not positive or it is unknown)."""
    if activation is None or feature_max <= 0 or activation <= 0:
        return 0.0
    return min(1.0, activation / feature_max)


def rgb(level: float) -> tuple[int, int, int]:
    """Background colour for a strength in ``[0, 1]``: pale amber to deep orange."""
    return tuple(round(lo + (hi - lo) * level) for lo, hi in zip(_LOW, _HIGH))  # type: ignore[return-value]


def css_background_level(level: float) -> str:
    """CSS declaration for the background of a strength in ``[0, 1]`` (transparent at 0)."""
    if level == 0:
        return "background-color: transparent"
    r, g, b = rgb(level)
    return f"background-color: rgb({r}, {g}, {b})"


def needs_light_text(level: float) -> bool:
    """Whether text on this background reads better in white."""
    return level > 0.7
