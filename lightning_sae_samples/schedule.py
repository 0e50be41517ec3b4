"""When to collect: every N-th optimizer step, or a piecewise schedule ``{start_step: N, ...}``."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Optional, Union

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

    def num_due_before(self, stop: int) -> int:
        """How many steps in ``[0, stop)`` are collected (arithmetic over the segments, no loop over steps)."""
        total = 0
        ends = self.starts[1:] + [stop]
        for start, freq, end in zip(self.starts, self.freqs, ends):
            end = min(end, stop)
            if end > start:
                total += -(-(end - start) // freq)
        return total

    def sparse_run_warning(self, max_steps: int, minimum: int = 2) -> Optional[str]:
        """A message saying what to change when fewer than ``minimum`` steps before ``max_steps`` are collected.

        ``None`` when the schedule collects enough (or every step of a run shorter than ``minimum``), or when
        ``max_steps`` is not set (``-1``: the run's length is not known in steps).
        """
        if max_steps is None or max_steps <= 0:
            return None
        count = self.num_due_before(max_steps)
        if count >= min(minimum, max_steps):  # a 1-step run cannot collect 2 steps: nothing to fix
            return None
        which = "no step" if count == 0 else f"only step {self.next_due(0)}"
        suggestion = max(1, max_steps // 20)
        return (
            f"`collection_freq`={self.as_config()!r} collects {which} before `max_steps`={max_steps}, so the saved"
            " samples say little about the trained SAE (and may come from its untrained start). Give a schedule"
            f" that fits the run, e.g. `collection_freq={suggestion}` (or lower the start steps of yours),"
            " or raise `max_steps`."
        )

    def as_config(self) -> Union[int, dict[int, int]]:
        """The schedule as given (an int or a dict), for summaries and YAML."""
        if len(self.starts) == 1 and self.starts[0] == 0:
            return self.freqs[0]
        return dict(zip(self.starts, self.freqs))
