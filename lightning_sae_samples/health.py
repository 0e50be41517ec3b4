"""Feature health metrics logged to the trainer's loggers at each collection step.

On every collected optimizer step, :class:`FeatureHealthMonitor` reduces the collector's per-latent
counters to a handful of numbers and hands them to every logger of the trainer
(``logger.log_metrics``), plus a histogram of log10 firing frequencies to loggers whose experiment has
``add_histogram`` (TensorBoard). Nothing is computed or logged on other steps.

Metrics (all shares are over the ``F`` latents):

* ``feature_health/never_fired_frac``: latents that have not fired once since the collection began;
* ``feature_health/dead_frac``: latents that did not fire at any collected step of the last
  ``dead_window_steps`` optimizer steps (logged only once the collection covers a whole window);
* ``feature_health/dense_frac``: latents whose firing frequency ``count / tokens_seen`` exceeds
  ``dense_threshold`` (10% of tokens by default);
* ``feature_health/alive_frac``: latents that have fired at least once;
* ``feature_health/l0``: mean number of latents above the activation threshold per token, over this
  step's collected batches;
* ``feature_health/log10_frequency`` (histogram): log10 firing frequency of the latents that fired.

"Fired" means an activation strictly above the callback's ``activation_threshold``, as everywhere else.
Under DDP the numbers are global rank 0's local view (its own batches; no collective is run for them).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

PREFIX = "feature_health/"
DENSE_FREQUENCY = 0.1
#: ``CallbackConfig.dead_window_steps``'s default, recorded in a plain loop's history (the collector has no health).
DEFAULT_DEAD_WINDOW_STEPS = 10_000


def health_metrics(
    count: Tensor,
    last_step: Tensor,
    tokens_seen: int,
    step: int,
    dead_window_steps: int,
    first_collected_step: Optional[int] = None,
    dense_threshold: float = DENSE_FREQUENCY,
) -> dict[str, float]:
    """Feature-health shares from a collector's per-latent counters.

    Args:
        count: Activations above threshold per latent, ``[F]``.
        last_step: Last step each latent fired at (``-1`` if never), ``[F]``.
        tokens_seen: Tokens in the collected batches.
        step: The current (collected) optimizer step.
        dead_window_steps: A latent is dead if it did not fire in steps ``step - dead_window_steps + 1``
            to ``step``.
        first_collected_step: First collected step; ``dead_frac`` is left out while the window starts
            before it (``None``: assume the collection began at step 0).
        dense_threshold: Firing frequency above which a latent counts as dense.

    Returns:
        ``{"feature_health/never_fired_frac": ..., "feature_health/alive_frac": ...,
        "feature_health/dense_frac": ..., "feature_health/dead_frac": ...}`` as Python floats.
    """
    num_latents = max(int(count.numel()), 1)
    window_start = step - dead_window_steps + 1
    first = 0 if first_collected_step is None or first_collected_step < 0 else first_collected_step
    parts = [
        (count == 0).sum(),
        (count > 0).sum(),
        (count.double() > dense_threshold * tokens_seen).sum() if tokens_seen else torch.zeros_like(count[0]),
        (last_step < window_start).sum(),
    ]
    # One host transfer for all counts.
    never, alive, dense, dead = torch.stack(parts).tolist()
    metrics = {
        f"{PREFIX}never_fired_frac": never / num_latents,
        f"{PREFIX}alive_frac": alive / num_latents,
        f"{PREFIX}dense_frac": dense / num_latents,
    }
    if window_start >= first:
        metrics[f"{PREFIX}dead_frac"] = dead / num_latents
    return metrics


def health_counts(
    count: Tensor, last_step: Tensor, tokens_seen: int, dead_before: Optional[int],
    dense_threshold: float = DENSE_FREQUENCY,
) -> tuple[int, int, int]:
    """How many latents are alive (fired once), dead and dense, as a saved collection's reader counts them.

    Dead: never fired, or (``dead_before`` not ``None``) last fired before step ``dead_before``. Dense: firing
    frequency ``count / tokens_seen`` above ``dense_threshold``. One host transfer.
    """
    dead = count == 0
    if dead_before is not None:
        dead = dead | (last_step < dead_before)
    dense = count.double() > dense_threshold * tokens_seen if tokens_seen else torch.zeros_like(dead)
    alive, dead_n, dense_n = torch.stack([(count > 0).sum(), dead.sum(), dense.sum()]).tolist()
    return alive, dead_n, dense_n


def log10_frequencies(count: Tensor, tokens_seen: int) -> Tensor:
    """log10 firing frequency of the latents that fired (empty if none did), on the CPU."""
    fired = count[count > 0].double()
    if not tokens_seen or fired.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.log10(fired / tokens_seen).cpu()


class FeatureHealthMonitor:
    """Accumulates L0 over a collected step's micro-batches and logs the health metrics once per step.

    Used by :class:`~lightning_sae_samples.ActivationSampleCallback`; it only ever runs on global rank 0.

    Args:
        dead_window_steps: Window, in optimizer steps, of the ``dead_frac`` metric.
        dense_threshold: Firing frequency above which a latent counts as dense.
    """

    def __init__(self, dead_window_steps: int, dense_threshold: float = DENSE_FREQUENCY) -> None:
        self.dead_window_steps = dead_window_steps
        self.dense_threshold = dense_threshold
        self._step: Optional[int] = None
        self._active: Optional[int] = None
        self._tokens = 0

    @property
    def pending_step(self) -> Optional[int]:
        """The collected step whose metrics are not logged yet."""
        return self._step

    def observe(self, step: int, active: int, num_tokens: int) -> None:
        """Add one collected batch's count of active latents (activations above the threshold).

        Args:
            step: The optimizer step the batch belongs to.
            active: Finite activations above the threshold in the batch (the collector counts them).
            num_tokens: Tokens in the batch.
        """
        if self._step != step or self._active is None:
            self._step, self._active, self._tokens = step, 0, 0
        self._active += int(active)
        self._tokens += int(num_tokens)

    def log(self, trainer: Any, collector: Any) -> Optional[dict[str, float]]:
        """Log the pending step's metrics to every logger of ``trainer``; returns them (``None`` if none).

        Args:
            trainer: The Lightning trainer (its ``loggers`` receive the metrics).
            collector: The :class:`~lightning_sae_samples.engine.SampleCollector` after the step.
        """
        step, active, tokens = self._step, self._active, self._tokens
        self._step, self._active, self._tokens = None, None, 0
        if step is None or collector is None or not trainer.loggers:
            return None
        tokens_seen = int(collector.tokens_seen)
        metrics = health_metrics(
            collector.count,
            collector.last_step,
            tokens_seen,
            step,
            self.dead_window_steps,
            collector.first_collected_step,
            self.dense_threshold,
        )
        if active is not None and tokens:
            metrics[f"{PREFIX}l0"] = float(active) / tokens
        frequencies: Optional[Tensor] = None
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            add_histogram = getattr(getattr(logger, "experiment", None), "add_histogram", None)
            if callable(add_histogram):
                if frequencies is None:
                    frequencies = log10_frequencies(collector.count, tokens_seen)
                if frequencies.numel():
                    add_histogram(f"{PREFIX}log10_frequency", frequencies, global_step=step)
        return metrics
