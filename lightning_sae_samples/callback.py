"""ActivationSampleCallback: collect every latent's top activating contexts while an SAE trains."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_sae_samples.analyzer import write_report
from lightning_sae_samples.collector import RANK_SHIFT, CollectorConfig, SampleCollector
from lightning_sae_samples.distributed import gather_merged_state
from lightning_sae_samples.health import FeatureHealthMonitor
from lightning_sae_samples.inputs import InputKeys, LatentInputError, check_indices_in_range, read_latents
from lightning_sae_samples.logit_effects import logit_effect_extras, resolve_logit_effects_fn
from lightning_sae_samples.schedule import CollectionSchedule
from lightning_sae_samples.statistics import RANK_CHOICES
from lightning_sae_samples.storage import REPORT_NAME, write_samples_dir
from lightning_sae_samples.tokens import describe_tokenizer, load_tokenizer

STATE_VERSION = 1
_NUM_LATENTS_ATTRS = ("num_latents", "d_sae", "n_latents", "dict_size")


def _positive_int(value: Any, name: str, fix: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}. {fix}")
    return value


class ActivationSampleCallback(Callback):
    r"""Keep, for every SAE latent, its exact top activating token contexts and streaming statistics.

    On every collected optimizer step the callback reads the SAE's latents from the ``training_step``
    outputs (dense ``latents`` ``[B, T, F]`` / ``[B*T, F]``, or TopK ``latent_indices`` + ``latent_values``
    ``[B, T, k]``) and the token ids (outputs' or batch's ``tokens`` ``[B, T]``), and folds them into a
    tensor state on the latents' device with one vectorized pass. At each checkpoint and at the end of
    training it writes the samples directory (see ``docs/format.md``); its state travels in the checkpoint
    so a resumed run ends with exactly what an uninterrupted one would.

    Args:
        collection_freq: Collect every N-th optimizer step (all micro-batches of that step), or a schedule
            ``{start_step: N, ...}`` such as ``{0: 5000, 20000: 1000}``.
        max_samples_per_feature: Top samples kept in memory per latent.
        context_size: Context tokens kept around the activating one (``context_size // 2`` on each side,
            clipped at the sequence's edges).
        activation_threshold: An activation counts only if strictly greater than this.
        top_features_to_save: Features written as JSON files at each save, best first by ``rank_features_by``.
        samples_per_feature_to_save: Samples written per feature file (the full-state file keeps all).
        dirpath: Where to write; default ``<trainer.log_dir or default_root_dir>/activation_samples``.
        tokenizer: A tokenizer object (``convert_ids_to_tokens`` / ``decode``), a Hugging Face name or path
            (loaded lazily at the first save), or ``None`` to use ``datamodule.tokenizer`` or
            ``pl_module.tokenizer`` when present, else to show token ids.
        rank_features_by: ``"max_activation"``, ``"activation_count"`` or ``"frequency"``.
        num_latents: Latent count ``F``; needed for sparse latents unless the LightningModule has a
            ``num_latents`` (or ``d_sae``) attribute or hyperparameter.
        latents_key: Outputs key of dense latents.
        latent_indices_key: Outputs key of sparse latent indices.
        latent_values_key: Outputs key of sparse latent values.
        tokens_key: Outputs or batch key of the token ids.
        write_report: Also write ``interpretability_report.md`` into ``dirpath`` at each save.
        samples_per_interval: Besides the top, keep this many samples per latent from each activation interval
            (half-decades above the threshold), drawn uniformly at random among the activations that fell in
            it, reproducibly for a ``seed`` and across processes and resumes; 0 turns it off.
        num_intervals: Number of activation intervals for ``samples_per_interval``.
        recent_window_steps: Also keep, per latent, the top samples of the recent steps: those of the current
            and the previous block of this many optimizer steps (``None`` turns it off). Feature files then
            show them and ``recent_overlap``, the share of activating tokens they have in common with the
            all-time top (low when the latent's meaning moved).
        recent_samples_per_feature: Samples kept per latent for the recent window (default:
            ``samples_per_feature_to_save``).
        seed: Seed of the interval sampling.
        deduplicate_contexts: A latent keeps no two top (or recent) samples whose context windows overlap in
            the same sequence or whose context tokens are identical; the kept set is the exact top-k under
            that rule (see :mod:`lightning_sae_samples.dedup`). Useful on repetitive text.
        log_feature_health: At each collected step (and only then), log ``feature_health/never_fired_frac``,
            ``dead_frac``, ``dense_frac``, ``alive_frac`` and ``l0`` to ``trainer.loggers``, and a histogram of
            log10 firing frequencies to loggers with ``experiment.add_histogram`` (TensorBoard); see
            :mod:`lightning_sae_samples.health`. Under DDP these are global rank 0's local view.
        dead_window_steps: A latent counts as dead if it did not fire in the last this many optimizer steps;
            make it span several collection steps. ``dead_frac`` is logged once the collection covers a
            whole window.
        logit_effects: A function taking the LightningModule and returning ``(W_dec [F, d_model],
            W_U [d_model, vocab])``, or its import path ``"package.module:function"`` (for YAML configs).
            Each saved feature file then gets a ``logit_effects`` key: the ``logit_effects_k`` tokens its
            decoder direction promotes and suppresses most (``W_dec[j] @ W_U``).
        logit_effects_k: Tokens per side in ``logit_effects``.

    Raises:
        ValueError: If an argument is out of range; the message names the argument and a fix.

    Example::

        >>> from lightning import Trainer
        >>> from lightning_sae_samples import ActivationSampleCallback
        >>> trainer = Trainer(callbacks=[ActivationSampleCallback(collection_freq=100)])
    """

    def __init__(
        self,
        collection_freq: Union[int, dict[int, int]] = 1000,
        max_samples_per_feature: int = 100,
        context_size: int = 20,
        activation_threshold: float = 0.1,
        top_features_to_save: int = 100,
        samples_per_feature_to_save: int = 10,
        dirpath: Optional[Union[str, Path]] = None,
        tokenizer: Optional[Any] = None,
        rank_features_by: str = "max_activation",
        num_latents: Optional[int] = None,
        latents_key: str = "latents",
        latent_indices_key: str = "latent_indices",
        latent_values_key: str = "latent_values",
        tokens_key: str = "tokens",
        write_report: bool = True,
        samples_per_interval: int = 2,
        num_intervals: int = 8,
        recent_window_steps: Optional[int] = None,
        recent_samples_per_feature: Optional[int] = None,
        seed: int = 0,
        deduplicate_contexts: bool = False,
        log_feature_health: bool = True,
        dead_window_steps: int = 10_000,
        logit_effects: Optional[Union[Callable[[pl.LightningModule], tuple[torch.Tensor, torch.Tensor]], str]] = None,
        logit_effects_k: int = 10,
    ) -> None:
        super().__init__()
        self.schedule = CollectionSchedule(collection_freq)
        self.max_samples_per_feature = _positive_int(
            max_samples_per_feature, "max_samples_per_feature", "Keep at least one sample per latent, e.g. 100."
        )
        self.context_size = _positive_int(
            context_size, "context_size", "Use 0 for the activating token alone, e.g. 20 for ten each side.", 0
        )
        if isinstance(activation_threshold, bool) or not isinstance(activation_threshold, (int, float)) or not (
            math.isfinite(activation_threshold)
        ):
            raise ValueError(
                f"`activation_threshold` must be a finite number, got {activation_threshold!r}. Use e.g. 0.1;"
                " only activations strictly above it count."
            )
        self.activation_threshold = float(activation_threshold)
        self.top_features_to_save = _positive_int(
            top_features_to_save, "top_features_to_save", "It is how many feature files each save writes.", 0
        )
        self.samples_per_feature_to_save = _positive_int(
            samples_per_feature_to_save, "samples_per_feature_to_save", "Use e.g. 10."
        )
        if self.samples_per_feature_to_save > self.max_samples_per_feature:
            raise ValueError(
                f"`samples_per_feature_to_save` ({samples_per_feature_to_save}) cannot exceed"
                f" `max_samples_per_feature` ({max_samples_per_feature}): raise the latter or lower the former."
            )
        if rank_features_by not in RANK_CHOICES:
            raise ValueError(f"`rank_features_by` must be one of {RANK_CHOICES}, got {rank_features_by!r}.")
        self.rank_features_by = rank_features_by
        if num_latents is not None:
            num_latents = _positive_int(num_latents, "num_latents", "It is the SAE's latent count F.")
        self.num_latents = num_latents
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"`dirpath` must be a path or None, got {type(dirpath).__name__}.")
        self.dirpath: Optional[Path] = Path(dirpath) if dirpath is not None else None
        self.tokenizer = tokenizer
        keys = (latents_key, latent_indices_key, latent_values_key, tokens_key)
        if not all(isinstance(k, str) and k for k in keys):
            raise ValueError("`latents_key`, `latent_indices_key`, `latent_values_key` and `tokens_key` must be"
                             " non-empty strings naming entries of the training_step outputs or batch.")
        self.keys = InputKeys(*keys)
        self.write_report = bool(write_report)
        self.samples_per_interval = _positive_int(
            samples_per_interval, "samples_per_interval", "Use 0 to keep no interval samples, e.g. 2.", 0
        )
        self.num_intervals = _positive_int(num_intervals, "num_intervals", "Use e.g. 8 half-decade intervals.")
        if recent_window_steps is not None:
            recent_window_steps = _positive_int(
                recent_window_steps, "recent_window_steps", "Use a window of several collection steps, or None."
            )
        self.recent_window_steps = recent_window_steps
        if recent_samples_per_feature is None:
            recent_samples_per_feature = self.samples_per_feature_to_save
        self.recent_samples_per_feature = _positive_int(
            recent_samples_per_feature, "recent_samples_per_feature", "Use e.g. 10."
        )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an integer, got {seed!r}.")
        self.seed = seed
        self.deduplicate_contexts = bool(deduplicate_contexts)
        dead_window_steps = _positive_int(
            dead_window_steps, "dead_window_steps", "Use a window of several collection steps, e.g. 10000."
        )
        self._health = FeatureHealthMonitor(dead_window_steps) if log_feature_health else None
        self.logit_effects = resolve_logit_effects_fn(logit_effects)
        self.logit_effects_k = _positive_int(logit_effects_k, "logit_effects_k", "Use e.g. 10 tokens per side.")

        self.collector: Optional[SampleCollector] = None
        self._pending_state: Optional[dict] = None
        self._collecting = False
        self._due_step = self.schedule.next_due(0)
        self._batch_step = 0
        self._offset_step = -1
        self._token_offset = 0
        self._rank = 0
        self._strategy: Any = None
        self._merged: Optional[dict] = None
        self._warned_nonfinite = 0
        self._resolved_tokenizer: Any = None

    # ------------------------------------------------------------------ identity and config
    @property
    def state_key(self) -> str:
        """Stable checkpoint key; distinct for callbacks reading different outputs."""
        return self._generate_state_key(
            latents_key=self.keys.latents, latent_indices_key=self.keys.latent_indices, tokens_key=self.keys.tokens
        )

    def config(self) -> dict[str, Any]:
        """The configuration as JSON-friendly values."""
        return {
            "collection_freq": self.schedule.as_config(),
            "max_samples_per_feature": self.max_samples_per_feature,
            "context_size": self.context_size,
            "activation_threshold": self.activation_threshold,
            "top_features_to_save": self.top_features_to_save,
            "samples_per_feature_to_save": self.samples_per_feature_to_save,
            "rank_features_by": self.rank_features_by,
            "num_latents": self.num_latents,
            "latents_key": self.keys.latents,
            "latent_indices_key": self.keys.latent_indices,
            "latent_values_key": self.keys.latent_values,
            "tokens_key": self.keys.tokens,
            "tokenizer": describe_tokenizer(self.tokenizer),
            "samples_per_interval": self.samples_per_interval,
            "num_intervals": self.num_intervals,
            "recent_window_steps": self.recent_window_steps,
            "recent_samples_per_feature": self.recent_samples_per_feature,
            "seed": self.seed,
            "deduplicate_contexts": self.deduplicate_contexts,
        }

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve ``dirpath`` and check it is writable before the first step."""
        self._rank = trainer.global_rank
        self._strategy = trainer.strategy
        if self.dirpath is None:
            root = trainer.log_dir or trainer.default_root_dir
            self.dirpath = Path(root) / "activation_samples"
        if stage != "fit":
            return
        problem = self._check_dirpath() if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise ValueError(problem)
        sparse = self.schedule.sparse_run_warning(trainer.max_steps)
        if sparse:
            rank_zero_warn(f"ActivationSampleCallback: {sparse}")

    def _check_dirpath(self) -> Optional[str]:
        path = self.dirpath
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write_probe_{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            return (
                f"ActivationSampleCallback cannot write to `dirpath` {str(path)!r}: {err.strerror or err}."
                " Pass a writable directory as `dirpath`."
            )
        return None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Decide whether this batch's optimizer step is collected."""
        step = trainer.global_step
        if step > self._due_step:
            self._due_step = self.schedule.next_due(step)
        self._collecting = step == self._due_step
        self._batch_step = step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold this batch's latents into the state when its step is due."""
        if not self._collecting:
            return
        self._collect(pl_module, outputs, batch)
        # Health metrics: once per collected optimizer step, after its last micro-batch (the step counter moved).
        if self._health is not None and trainer.is_global_zero and trainer.global_step != self._batch_step:
            self._health.log(trainer, self.collector)

    def state_dict(self) -> dict[str, Any]:
        """Merge all processes' collections (collective) and return what exact resume needs."""
        self._merged = self._merged_state()
        return {
            "version": STATE_VERSION,
            "config": self.config(),
            "collector": self._merged if self._rank == 0 else None,
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Write the samples directory for the state merged in :meth:`state_dict`."""
        merged, self._merged = self._merged, None
        if trainer.is_global_zero:
            self._write(trainer, pl_module, merged)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the final samples directory."""
        if self._health is not None and trainer.is_global_zero and self._health.pending_step is not None:
            self._health.log(trainer, self.collector)
        merged = self._merged_state()
        if trainer.is_global_zero:
            self._write(trainer, pl_module, merged)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the collection from a checkpoint; the merged state resumes on global rank 0."""
        config = state_dict.get("config", {})
        for name in (
            "max_samples_per_feature", "context_size", "samples_per_interval", "num_intervals",
            "recent_window_steps", "recent_samples_per_feature", "seed", "deduplicate_contexts",
        ):
            saved, current = config.get(name), getattr(self, name)
            if name in config and saved != current:
                raise ValueError(
                    f"Cannot resume: the checkpoint's ActivationSampleCallback has {name}={saved}, this one has"
                    f" {name}={current}. Use the same value, or start a new collection without `ckpt_path`."
                )
        state = state_dict.get("collector")
        if state is not None and self.num_latents is not None and int(state["num_latents"]) != self.num_latents:
            raise ValueError(
                f"Cannot resume: the checkpoint collected {int(state['num_latents'])} latents, this callback has"
                f" num_latents={self.num_latents}. Resume the same SAE or start a new collection."
            )
        if state is not None and float(state["threshold"]) != self.activation_threshold:
            rank_zero_warn(
                f"Resuming a collection made with activation_threshold={state['threshold']}; this callback has"
                f" {self.activation_threshold}. Statistics mix both thresholds."
            )
        self._pending_state = state
        self.collector = None

    # ------------------------------------------------------------------ collection
    def _collect(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        if outputs is None:
            return
        latents = read_latents(outputs, batch, self.keys)
        source = latents.dense if latents.dense is not None else latents.values
        num_latents = latents.num_latents or self._sparse_num_latents(pl_module)
        collector = self._collector_for(num_latents, source.device)
        step = self._batch_step
        if step != self._offset_step:
            self._offset_step, self._token_offset = step, 0
        order_base = (self._rank << RANK_SHIFT) + self._token_offset
        tokens = latents.tokens.to(source.device)
        self._token_offset += tokens.numel()
        if latents.dense is not None:
            collector.update_dense(tokens, latents.dense, step, order_base)
        else:
            check_indices_in_range(latents.indices, num_latents, self.keys.latent_indices)
            collector.update_sparse(tokens, latents.indices, latents.values, step, order_base)
        if self._health is not None and self._rank == 0:
            self._health.observe(step, collector.last_active, tokens.numel())

    def _sparse_num_latents(self, pl_module: pl.LightningModule) -> int:
        if self.num_latents is not None:
            return self.num_latents
        hparams = getattr(pl_module, "hparams", {})
        for name in _NUM_LATENTS_ATTRS:
            value = getattr(pl_module, name, None)
            if value is None and name in hparams:
                value = hparams[name]
            if isinstance(value, int) and not isinstance(value, bool):
                self.num_latents = value
                return value
        if self._pending_state is not None:
            return int(self._pending_state["num_latents"])
        raise LatentInputError(
            "Sparse latents do not tell the latent count: pass `num_latents=F` to ActivationSampleCallback or"
            f" give the LightningModule a `num_latents` attribute (one of {_NUM_LATENTS_ATTRS})."
        )

    def _collector_for(self, num_latents: int, device: torch.device) -> SampleCollector:
        collector = self.collector
        if collector is not None:
            if collector.config.num_latents != num_latents:
                raise LatentInputError(
                    f"The latent count changed from {collector.config.num_latents} to {num_latents} between"
                    " steps. Return latents of the same SAE at every step."
                )
            return collector
        if self._pending_state is not None:
            saved = int(self._pending_state["num_latents"])
            if saved != num_latents:
                raise ValueError(
                    f"Cannot resume: the checkpoint collected {saved} latents but this run's latents have"
                    f" {num_latents}. Resume the same SAE, or start a new collection without `ckpt_path`."
                )
        self.collector = self._materialize(num_latents, device)
        return self.collector

    def _materialize(self, num_latents: int, device: torch.device) -> SampleCollector:
        pending, self._pending_state = self._pending_state, None
        if pending is None:
            config = CollectorConfig(
                num_latents,
                self.max_samples_per_feature,
                self.context_size,
                self.activation_threshold,
                samples_per_interval=self.samples_per_interval,
                num_intervals=self.num_intervals,
                recent_window_steps=self.recent_window_steps,
                recent_samples=self.recent_samples_per_feature,
                seed=self.seed,
                deduplicate_contexts=self.deduplicate_contexts,
            )
            return SampleCollector(config, device)
        restored = SampleCollector.from_state_dict(pending, device)
        # Every process loads the same merged checkpoint; keeping it on one process only makes the next
        # merge count each sample once.
        return restored if self._rank == 0 else restored.empty_like()

    # ------------------------------------------------------------------ saving
    def _merged_state(self) -> Optional[dict]:
        if self.collector is None and self._pending_state is not None:
            device = self._strategy.root_device if self._strategy is not None else torch.device("cpu")
            self.collector = self._materialize(int(self._pending_state["num_latents"]), device)
        if self.collector is None:
            return None
        strategy = self._strategy
        if strategy is None or strategy.world_size == 1:
            return self.collector.state_dict()
        return gather_merged_state(self.collector, strategy, is_root=self._rank == 0)

    def _tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self._resolved_tokenizer is None:
            candidate = self.tokenizer
            if candidate is None:
                candidate = getattr(trainer.datamodule, "tokenizer", None) or getattr(pl_module, "tokenizer", None)
            self._resolved_tokenizer = load_tokenizer(candidate)
        return self._resolved_tokenizer

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: Optional[dict]) -> None:
        if merged is None:
            rank_zero_info("ActivationSampleCallback: nothing collected yet, no samples written.")
            return
        skipped = int(merged["nonfinite_skipped"])
        if skipped > self._warned_nonfinite:
            rank_zero_warn(
                f"ActivationSampleCallback skipped {skipped} non-finite latent values (NaN/Inf) so far; they are"
                " not counted or stored. Check the SAE for overflow (e.g. fp16) or diverging training."
            )
            self._warned_nonfinite = skipped
        tokenizer = self._tokenizer(trainer, pl_module)
        write_samples_dir(
            self.dirpath,
            merged,
            config=self.config(),
            tokenizer=tokenizer,
            top_features=self.top_features_to_save,
            samples_per_feature=self.samples_per_feature_to_save,
            rank_by=self.rank_features_by,
            global_step=trainer.global_step,
            feature_extras=logit_effect_extras(
                self.logit_effects, pl_module, merged, self.rank_features_by, self.top_features_to_save,
                self.logit_effects_k, tokenizer,
            ),
        )
        if self.write_report:
            try:
                write_report(self.dirpath, tokenizer=tokenizer)
            except Exception as err:  # noqa: BLE001 - a report must never stop training
                rank_zero_warn(f"ActivationSampleCallback could not write {REPORT_NAME}: {err}")
