"""The reproducible random priority of interval samples."""

from __future__ import annotations

from torch import Tensor

from lightning_sae_samples.engine.hashing import mix64, shift_right, signed64


def sample_priority(step: int, order: Tensor, seed: int = 0) -> Tensor:
    """A pseudo-random priority in ``[0, 2**31)`` (as float64) for samples seen at ``(step, order)``.

    A SplitMix64 hash: the same sample gets the same priority in every process, run and resume, so
    keeping the largest priorities is a reproducible uniform sample that merges exactly.
    """
    x = mix64(order + signed64(step * 0x9E3779B97F4A7C15 + seed * 0xD1B54A32D192ED03))
    return shift_right(x, 33).double()
