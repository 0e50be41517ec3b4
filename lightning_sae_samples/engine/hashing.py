"""64-bit integer hashing on int64 tensors (wrapping arithmetic), shared by sampling and de-duplication."""

from __future__ import annotations

from torch import Tensor

_MASK64 = (1 << 64) - 1


def signed64(value: int) -> int:
    """A Python int reduced modulo 2**64 and read as a signed int64, to use as a tensor constant."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: Tensor) -> Tensor:
    """The SplitMix64 finalizer: spreads every input bit over all 64 output bits."""
    x = x ^ shift_right(x, 30)
    x = x * signed64(0xBF58476D1CE4E5B9)
    x = x ^ shift_right(x, 27)
    x = x * signed64(0x94D049BB133111EB)
    return x ^ shift_right(x, 31)
