"""What ``explain`` shows while it runs: latents explained and scored, requests answered, their rate, time left.

On a terminal, a rich progress display (transient, as :mod:`lightning_sae_samples.render.progress`): one row per
stage over latents (explained, scored) and one over requests with the rate, the time elapsed and the time left.
Elsewhere (a log file, a pipe, CI) a rich display prints nothing until the end, so it writes one line at the
start and then one every :data:`LINE_EVERY_SHARE` of the requests or :data:`LINE_EVERY_SECONDS`, whichever comes
first. A local model loads before its first answer, so the elapsed time moves while the counts do not.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

#: A progress line (outside a terminal) at least every this share of the requests ...
LINE_EVERY_SHARE = 0.05
#: ... or at the first answer after this many seconds without one.
LINE_EVERY_SECONDS = 60.0


def time_left(remaining: int, rate: float) -> str:
    """``about 3 min 20 s left`` at ``rate`` per second; empty when unknown or done."""
    seconds = int(remaining / rate + 0.5) if rate > 0 and remaining > 0 else 0
    if seconds < 1:
        return ""
    return f"about {seconds // 60} min {seconds % 60} s left" if seconds >= 60 else f"about {seconds} s left"


class ExplainProgress:
    """Progress of one ``explain`` run on ``console`` (none: silent).

    Args:
        console: A rich console (the command passes one on stderr), or ``None``.
        requests: Requests the run will send.
        to_explain: Latents it asks an explanation for.
        to_score: Latents it scores.
        clock: Seconds, monotonic (default ``time.monotonic``); the rate and the time left are measured on it.
        unit: What is counted: ``"requests"`` (answered), or ``"texts"`` (embedded, for the embedding score).
        title: What the first line says is done (default: ``"<requests> <unit> for <latents>"``).
    """

    def __init__(self, console: Any, requests: int, to_explain: int, to_score: int,
                 clock: Optional[Callable[[], float]] = None, unit: str = "requests",
                 title: Optional[str] = None) -> None:
        self.console, self.requests, self.clock, self.unit = console, requests, clock or time.monotonic, unit
        self.done = 0
        self.counts = {"explained": 0, "scored": 0}
        self.totals = {"explained": to_explain, "scored": to_score}
        self.start = self.last_line_time = self.clock()
        self.last_line_done = 0
        self.every = max(1, int(requests * LINE_EVERY_SHARE))
        self._bar: Optional[Any] = None
        if console is None or requests == 0:
            self.console = None
        elif console.is_terminal:
            self._start_bar()
        else:
            what = title or f"{requests} {unit}" + (f" for {self._latents_text()}" if to_explain or to_score else "")
            self._line(f"{what}; a line every {self.every} {unit} or {LINE_EVERY_SECONDS:.0f} s")

    def _start_bar(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("elapsed"), TimeRemainingColumn(),
            TextColumn("left"),
            console=self.console, transient=True, get_time=self.clock,
        )
        self._tasks = {stage: self._bar.add_task(f"Latents {stage}", total=total, rate="")
                       for stage, total in self.totals.items() if total}
        self._requests = self._bar.add_task(self.unit.capitalize(), total=self.requests, rate=f"- {self.unit}/s")
        self._bar.start()

    @property
    def display(self) -> Optional[Any]:
        """The rich ``Progress`` shown on a terminal, else ``None``."""
        return self._bar

    def rate(self) -> float:
        """Requests answered (or texts embedded) per second since the start."""
        elapsed = self.clock() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _latents_text(self) -> str:
        parts = [f"{self.counts[stage]}/{total} latents {stage}" for stage, total in self.totals.items() if total]
        return ", ".join(parts)

    def _line(self, text: str) -> None:
        self.console.print(f"explain: {text}", markup=False, highlight=False, soft_wrap=True)

    def advance(self, latent_stage: Optional[str] = None, count: int = 1) -> None:
        """``count`` requests answered (or texts embedded); with ``latent_stage``, one latent done too.

        ``latent_stage``: ``"explained"`` or ``"scored"``.
        """
        if self.console is None:
            return
        self.done += count
        if latent_stage is not None:
            self.counts[latent_stage] += 1
        if self._bar is not None:
            self._bar.update(self._requests, advance=count, rate=f"{self.rate():.2f} {self.unit}/s")
            if latent_stage is not None:
                self._bar.update(self._tasks[latent_stage], advance=1)
            return
        if (self.done - self.last_line_done >= self.every or self.clock() - self.last_line_time >= LINE_EVERY_SECONDS
                or self.done == self.requests):
            self._report()

    def expect(self, more: int) -> None:
        """From now on, ``more`` requests are left (the total counted at the start was an upper bound)."""
        if self.console is None:
            return
        self.requests = self.done + more
        if self._bar is not None:
            self._bar.update(self._requests, total=self.requests)

    def _report(self) -> None:
        self.last_line_time, self.last_line_done = self.clock(), self.done
        rate = self.rate()
        left = time_left(self.requests - self.done, rate)
        latents = self._latents_text()
        self._line(f"{self.done}/{self.requests} {self.unit}, " + (f"{latents}, " if latents else "")
                   + f"{rate:.2f} {self.unit}/s" + (f", {left}" if left else ""))

    def pause(self) -> None:
        """Take a terminal display down while the embedding shows its own (rich 13 allows one live display)."""
        if self._bar is not None:
            self._bar.stop()

    def resume(self) -> None:
        """Show a display :meth:`pause` took down again."""
        if self._bar is not None:
            self._bar.start()

    def stop(self) -> None:
        """Take the display down, or write the last line (the command then prints its one-line summary)."""
        if self._bar is not None:
            self._bar.stop()
        elif self.console is not None and self.done > self.last_line_done:
            self._report()
