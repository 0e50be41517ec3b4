"""When to collect: every N-th optimizer step, or a piecewise schedule ``{start_step: N, ...}``."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Union

Frequency = Union[int, Mapping[int, int]]


class CollectionSchedule:
    """Decides which optimizer steps are collected.

    Args:
        frequency: ``N`` to collect steps ``0, N, 2N, ...``; or a mapping ``{start: N}`` where, from
            ``start`` on (until the next key), steps ``start, start + N, ...`` are collected. Steps before
            the smallest key are not collected.

    Raises:
        ValueError: Non-positive frequencies, negative or non-integer starts, or an empty mapping.
    """

    def __init__(self, frequency: Frequency) -> None:
        if isinstance(frequency, Mapping):
            if not frequency:
                raise ValueError("`collection_freq` schedule is empty; give e.g. {0: 5000, 20000: 1000}.")
            items = sorted((self._int(k, "a schedule start step", 0), self._int(v, "a frequency", 1))
                           for k, v in frequency.items())
        else:
            items = [(0, self._int(frequency, "`collection_freq`", 1))]
        self.starts = [s for s, _ in items]
        self.freqs = [f for _, f in items]

    @staticmethod
    def _int(value: object, what: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(
                f"`collection_freq`: {what} must be an integer >= {minimum}, got {value!r}."
                " Use e.g. collection_freq=1000 or collection_freq={0: 5000, 20000: 1000}."
            )
        return value

    def is_due(self, step: int) -> bool:
        """Whether ``step`` is collected."""
        seg = bisect.bisect_right(self.starts, step) - 1
        return seg >= 0 and (step - self.starts[seg]) % self.freqs[seg] == 0

    def next_due(self, step: int) -> int:
        """The first collected step ``>= step``."""
        seg = bisect.bisect_right(self.starts, step) - 1
        if seg < 0:
            return self.starts[0]
        start, freq = self.starts[seg], self.freqs[seg]
        candidate = start + -(-(step - start) // freq) * freq
        if seg + 1 < len(self.starts) and candidate >= self.starts[seg + 1]:
            return self.starts[seg + 1]
        return candidate

    def as_config(self) -> Union[int, dict[int, int]]:
        """The schedule as given (an int or a dict), for summaries and YAML."""
        if len(self.starts) == 1 and self.starts[0] == 0:
            return self.freqs[0]
        return dict(zip(self.starts, self.freqs))
