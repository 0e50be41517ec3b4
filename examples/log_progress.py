"""Progress of the example's long steps that also shows when the output goes to a file.

On a terminal, Lightning's rich bar, labelled with steps (Lightning's own label reads ``Epoch 3/-2`` when a run
is bounded by ``max_steps`` and ``max_epochs`` is -1). Elsewhere (a log file, a pipe, CI), a rich bar prints
nothing until the end, so :class:`LineProgressBar` logs one line every few percent of the work or every
``every_seconds``, whichever comes first, through Lightning's progress-bar hooks and ``rank_zero_info``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info

#: A line at least every this share of the work ...
LINE_EVERY_SHARE = 0.05
#: ... or after this many seconds without one.
LINE_EVERY_SECONDS = 60.0


def progress_bar_for(stream: Any = None) -> ProgressBar:
    """The rich bar on a terminal, else :class:`LineProgressBar` (``stream``: default stdout)."""
    stream = sys.stdout if stream is None else stream
    return StepRichProgressBar() if stream.isatty() else LineProgressBar()


def train_label(trainer: Any) -> str:
    """``Epoch 3 · step 990/1500`` under ``max_steps``; ``Epoch 3/9`` under ``max_epochs``."""
    label = f"Epoch {trainer.current_epoch}"
    if trainer.max_steps is not None and trainer.max_steps > 0:
        return f"{label} · step {trainer.global_step}/{trainer.max_steps}"
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        return f"{label}/{trainer.max_epochs - 1}"
    return label


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar with :func:`train_label` as the training description."""

    def _get_train_description(self, current_epoch: int) -> str:
        return train_label(self.trainer)


class Ticker:
    """Says when the next progress line is due: every ``share`` of ``total`` units or ``seconds``."""

    def __init__(self, total: Optional[float], share: float = LINE_EVERY_SHARE, seconds: float = LINE_EVERY_SECONDS):
        finite = total is not None and total != float("inf") and total > 0
        self.every = max(1, int(total * share)) if finite else None
        self.seconds, self.start = seconds, time.monotonic()
        self.last_time, self.last_done = self.start, 0

    def due(self, done: int) -> bool:
        now = time.monotonic()
        if (self.every is not None and done - self.last_done >= self.every) or now - self.last_time >= self.seconds:
            self.last_time, self.last_done = now, done
            return True
        return False

    def rate(self, done: int) -> float:
        elapsed = time.monotonic() - self.start
        return done / elapsed if elapsed > 0 else 0.0


def _eta(remaining: float, rate: float) -> str:
    seconds = int(remaining / rate) if rate > 0 and remaining > 0 else 0
    if seconds < 1:
        return ""
    return f", about {seconds // 60} min {seconds % 60} s left" if seconds >= 60 else f", about {seconds} s left"


class LineProgressBar(ProgressBar):
    """One log line per few percent of training or validation (or per minute), for output that is not a terminal."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._train: Optional[Ticker] = None
        self._val: Optional[Ticker] = None
        self._val_done = 0
        self._val_total: float = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self._train = Ticker(total)
        if self._enabled:
            rank_zero_info(f"training: {train_label(trainer)} (a line every {self._train.every or '-'} steps or"
                           f" {LINE_EVERY_SECONDS:.0f} s)")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._enabled or self._train is None or not self._train.due(step):
            return
        metrics = self.get_metrics(trainer, pl_module)
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                          if k != "v_num")
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        rate = self._train.rate(step)
        eta = _eta(total - step, rate) if total else ""
        rank_zero_info(f"training: {train_label(trainer)}{', ' + shown if shown else ''}, {rate:.2f} steps/s{eta}")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._enabled and self._train is not None:
            rank_zero_info(f"training: done, {trainer.global_step} steps in"
                           f" {time.monotonic() - self._train.start:.0f} s")

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or self._val is not None:
            return
        # The totals are known from the first batch; ``total_val_batches`` counts only validation within fit.
        batches = trainer.num_val_batches
        self._val_total = sum(batches) if isinstance(batches, list) else batches
        self._val, self._val_done = Ticker(self._val_total), 0
        if self._enabled:
            rank_zero_info(f"validation: {self._val_total} batches")

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or self._val is None:
            return
        self._val_done += 1
        if self._enabled and self._val.due(self._val_done):
            rank_zero_info(f"validation: batch {self._val_done}/{self._val_total}")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self._val is None:
            return
        if self._enabled:
            metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
            shown = ", ".join(f"{k} {float(v):.4g}" for k, v in metrics.items())
            rank_zero_info(f"validation: done, {self._val_done} batches{', ' + shown if shown else ''}")
        self._val = None
