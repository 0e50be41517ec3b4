"""ActivationSampleCallback: collect every latent's top activating contexts while an SAE trains."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_sae_samples.analysis.logit_effects import (
    logit_effect_extras,
    module_matrices,
    resolve_logit_effects_fn,
)
from lightning_sae_samples.collector import STATE_VERSION, ActivationSampleCollector
from lightning_sae_samples.config import CallbackConfig, seed_settings
from lightning_sae_samples.engine.distributed import gather_merged_state
from lightning_sae_samples.engine.sample_collector import SampleCollector
from lightning_sae_samples.engine.sample_table import MergePolicy
from lightning_sae_samples.health import FeatureHealthMonitor
from lightning_sae_samples.inputs import (
    NUM_LATENTS_ATTRS,
    InputKeys,
    LatentBatch,
    LatentInputError,
    find_num_latents,
    read_latents,
)
from lightning_sae_samples.samples_dir.commit import claim_samples_dir, foreign_entries
from lightning_sae_samples.samples_dir.files import lstat_or_none
from lightning_sae_samples.samples_dir.history_file import history_from_tensors, history_to_tensors, join_histories
from lightning_sae_samples.samples_dir.names import LOCK_NAME, SNAPSHOTS_DIR, SamplesDirectoryError, snapshot_dirname
from lightning_sae_samples.samples_dir.shards import ShardedSaveError, ShardPart
from lightning_sae_samples.serve import serve_command
from lightning_sae_samples.sharding import ShardLayout, join_shards
from lightning_sae_samples.state.history import reset_window_entries
from lightning_sae_samples.state.slices import concat_states
from lightning_sae_samples.state.split import empty_tensors, join_tensors, split_tensors
from lightning_sae_samples.token_sources import TokenSource, load_token_source, row_windows_for
from lightning_sae_samples.tokens import check_tokenizer, describe_tokenizer, load_tokenizer

# A child of Lightning's own logger: error-level records go where Lightning's messages go.
#: Trainer stages of the evaluation loops, by the name ``collect_in`` gives them.
_EVAL_LOOPS = {"validate": "validate", "test": "test", "predict": "predict"}
_log = logging.getLogger("lightning.pytorch").getChild(__name__)
#: Where a checkpoint's callback state says its collection is in parts of the distributed checkpoint.
_PARTS_KEY = "collector_parts"


class ActivationSampleCallback(Callback):
    r"""Keep, for every SAE latent, its exact top activating token contexts and streaming statistics.

    On every collected optimizer step the callback reads the SAE's latents from the ``training_step``
    outputs (dense ``latents`` ``[B, T, F]`` / ``[B*T, F]``, or TopK ``latent_indices`` + ``latent_values``
    ``[B, T, k]``) and the token ids (outputs' or batch's ``tokens`` ``[B, T]``), and folds them into a
    tensor state on the latents' device with one vectorized pass. At each checkpoint and at the end of
    training it writes the samples directory (see ``docs/format.md``); its state travels in the checkpoint
    so a resumed run ends with exactly what an uninterrupted one would.

    Args:
        dirpath: Where to write; default ``<trainer.log_dir or default_root_dir>/activation_samples``. The
            directory must be empty or hold an earlier save of this callback (its manifest); only one run may
            write it at a time (a lock file held from ``setup`` to ``teardown``).
        tokenizer: A tokenizer object (``convert_ids_to_tokens`` / ``decode``), a Hugging Face name or path
            (loaded in ``setup``: local files or the cache first, the Hub only when reachable and not offline),
            or ``None`` to use ``datamodule.tokenizer`` or ``pl_module.tokenizer`` when present, else to show
            token ids.
        logit_effects: A function taking the LightningModule and returning ``(W_dec [F, d_model],
            W_U [d_model, vocab])``, or its import path ``"package.module:function"`` (for YAML configs).
            Each saved feature file then gets a ``logit_effects`` key: the ``logit_effects_k`` tokens its
            decoder direction promotes and suppresses most (``W_dec[j] @ W_U``), and saves that write
            ``full_state.pt`` (and the last one) write ``W_dec`` as ``decoder_directions.pt`` for each latent's
            neighbours (``save_decoder_directions``).
        token_source: For shuffled activation rows: where their ``token_refs`` (outputs' or batch's
            ``token_refs_key``) find their tokens, an :class:`~lightning_sae_samples.token_sources.ArrayTokenSource`
            or :class:`~lightning_sae_samples.token_sources.TokenRing`, or its import path
            ``"package.module:attribute"`` (an object, or a function returning one; for YAML); default the
            datamodule's or module's ``token_source`` attribute, if any. With an array source the checkpoint keeps
            each sample's ref, not its window, and saves read the windows there (``row_windows``). See
            ``docs/rows.md``.
        shard_layout: This process's shard of the latents under tensor parallelism, a
            :class:`~lightning_sae_samples.sharding.ShardLayout` or a function of the trainer returning one (called
            in ``setup``). Not needed with ``ModelParallelStrategy``: there the latents of a ``DTensor`` sharded on
            the latent dimension, or each process's even share of ``num_latents``, tell it (see
            ``docs/integrations.md``).
        config: All other settings as one :class:`~lightning_sae_samples.config.CallbackConfig` (instead of
            keywords).
        merge_policy: When the engine's sample tables merge what they staged (tuning and tests; the kept
            samples never depend on it).
        **settings: Any field of :class:`~lightning_sae_samples.config.CallbackConfig`, which documents,
            defaults and checks each one: the collection's (``collection_freq``, ``max_samples_per_feature``,
            ``context_size``, ``activation_threshold``, ...) and the callback's (``latents_key``, ...,
            ``save_full_state``). LightningCLI and ``--help`` list them as this class's arguments.

    Raises:
        ValueError: If an argument is out of range; the message names the argument and a fix.

    Example::

        >>> from lightning import Trainer
        >>> from lightning_sae_samples import ActivationSampleCallback
        >>> trainer = Trainer(callbacks=[ActivationSampleCallback(collection_freq=100)])
    """

    def __init__(
        self,
        dirpath: Optional[Union[str, Path]] = None,
        tokenizer: Optional[Any] = None,
        logit_effects: Optional[Union[Callable[[pl.LightningModule], tuple[torch.Tensor, torch.Tensor]], str]] = None,
        token_source: Optional[Union[TokenSource, str]] = None,
        *,
        shard_layout: Optional[Union[ShardLayout, Callable[[pl.Trainer], ShardLayout]]] = None,
        config: Optional[CallbackConfig] = None,
        merge_policy: Optional[MergePolicy] = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if config is None:
            CallbackConfig.check_names(settings, type(self).__name__)
            config = CallbackConfig(**settings)
        elif settings:
            raise TypeError(f"Pass {type(self).__name__} either `config` or keyword settings, not both.")
        self.settings = config
        self.token_source = load_token_source(token_source, type(self).__name__)
        self.engine = ActivationSampleCollector(
            config=config, merge_policy=merge_policy, token_source=self.token_source
        )
        self.schedule = config.schedule
        self.keys = InputKeys.of(config)
        self._health = FeatureHealthMonitor(config.dead_window_steps) if config.log_feature_health else None
        self.dirpath: Optional[Path] = self._check_dirpath(dirpath)
        self._dirpath_arg = None if dirpath is None else os.fspath(dirpath)
        self.tokenizer = self._check_tokenizer(tokenizer)
        self.logit_effects = resolve_logit_effects_fn(logit_effects)
        self.shard_layout = self._check_shard_layout(shard_layout)
        self._tensor_parallel = 1

        self._found_num_latents: Optional[int] = None
        self._collecting = False
        self._due_step = self.schedule.next_due(0)
        self._batch_step = 0
        self._rank = 0
        self._strategy: Any = None
        self._trainer: Optional[pl.Trainer] = None
        self._merged: Optional[dict] = None
        self._shard_part: Optional[ShardPart] = None  # a sharded collection's share, from state_dict to its save
        self._checkpoint_states: Optional[tuple[dict, dict]] = None  # a root's shard for a per-rank checkpoint
        self._parts_pending = False  # state_dict chose a per-rank checkpoint: its history goes in parts too
        self._warned_sharded_extras = False
        self._last_written: Optional[tuple[int, ...]] = None  # the collection the directory holds (this process)
        self._last_full_state = False
        self._last_save_step: Optional[int] = None
        self._last_decoder = False
        self._snapshot: Optional[ActivationSampleCollector] = None
        self._snapshot_loop = "validate"
        self._snapshot_step = 0
        #: Where the last evaluation snapshot was written (``None`` before the first).
        self.last_snapshot_dir: Optional[Path] = None
        self._warned_nonfinite = 0
        self._resolved_tokenizer: Any = None
        self._lock: Optional[FileLock] = None

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> Optional[ActivationSampleCallback]:
        """The callback a configuration of the tool this project replaces asks for, or ``None``.

        Reads ``save_activation_samples`` (false: returns ``None``, with an info line), ``sample_collection_freq``,
        ``max_samples_per_feature``, ``sample_context_size``, ``sample_activation_threshold``,
        ``top_features_to_save`` and ``samples_per_feature_to_save`` from a mapping or an object with those
        attributes (see :data:`lightning_sae_samples.config.SEED_KEYS`); ``overrides`` are further arguments.

        Raises:
            ValueError: A key that looks like one of these but is not; the message names the closest.
        """
        settings = seed_settings(cfg)
        if settings is None:
            rank_zero_info("ActivationSampleCallback.from_config: save_activation_samples is false; no callback.")
            return None
        return cls(**{**settings, **overrides})

    @staticmethod
    def _check_dirpath(dirpath: Any) -> Optional[Path]:
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"`dirpath` must be a path or None, got {type(dirpath).__name__}.")
        return Path(dirpath) if dirpath is not None else None

    @staticmethod
    def _check_shard_layout(layout: Any) -> Any:
        if layout is not None and not isinstance(layout, ShardLayout) and not callable(layout):
            raise ValueError(
                f"`shard_layout` must be a ShardLayout, a function of the trainer returning one, or None; got"
                f" {type(layout).__name__}."
            )
        return layout

    @staticmethod
    def _check_tokenizer(tokenizer: Any) -> Any:
        try:
            check_tokenizer(tokenizer)
        except TypeError as err:
            raise ValueError(str(err)) from None
        return tokenizer

    @property
    def uses_default_dirpath(self) -> bool:
        """Whether this callback was given no ``dirpath`` (two such callbacks in one Trainer are refused)."""
        return self._dirpath_arg is None

    @property
    def collector(self) -> Optional[SampleCollector]:
        """The tensor state of this process's collection (``None`` before the first collected batch)."""
        return self.engine.collector

    # ------------------------------------------------------------------ identity and config
    @property
    def state_key(self) -> str:
        """Stable checkpoint key; distinct for callbacks reading different outputs or given different ``dirpath``."""
        return self._generate_state_key(**self._state_key_parts())

    def _state_key_parts(self) -> dict[str, str]:
        parts = {
            "latents_key": self.keys.latents,
            "latent_indices_key": self.keys.latent_indices,
            "latent_values_key": self.keys.latent_values,
            "tokens_key": self.keys.tokens,
        }
        if self._dirpath_arg is not None:
            parts["dirpath"] = self._dirpath_arg
        return parts

    def config(self) -> dict[str, Any]:
        """The configuration as JSON-friendly values: the collection's, plus what the callback decides."""
        tokenizer = self.tokenizer if self.tokenizer is not None else self._resolved_tokenizer
        return {**self.engine.config(), "tokenizer": describe_tokenizer(tokenizer)}

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve ``dirpath``, take it (writable, ours, locked) and load a named tokenizer before the first step."""
        self._rank = trainer.global_rank
        self._strategy = trainer.strategy
        self._trainer = trainer
        self._shard_latents(trainer, self.settings.num_latents or find_num_latents(pl_module))
        if self.dirpath is None:
            self.dirpath = default_dirpath(self, trainer)
        if stage != "fit":
            if _EVAL_LOOPS.get(stage) in self.settings.collect_in:
                self._take_dirpath_everywhere(trainer, replaces=False)
            return
        weights_only = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "save_weights_only", False)]
        if weights_only:
            rank_zero_warn(
                "ModelCheckpoint(save_weights_only=True) saves no callback state: its checkpoints do not hold the"
                " ActivationSampleCallback collection, so resuming from them starts the collection afresh, and no"
                " samples are written at those saves (only at the end of training). Use save_weights_only=False,"
                " or add a ModelCheckpoint without it, to resume the collection."
            )
        num_latents = self.settings.num_latents or find_num_latents(pl_module)
        if num_latents is not None:
            self.engine.check_memory(num_latents, trainer.strategy.root_device, owner="ActivationSampleCallback")
        self._take_dirpath_everywhere(trainer)
        sparse = self.schedule.sparse_run_warning(trainer.max_steps)
        if sparse:
            rank_zero_warn(f"ActivationSampleCallback: {sparse}")
        if self.settings.log_serve_command:
            rank_zero_info(f"ActivationSampleCallback: browse the samples live: {serve_command(self.dirpath)}")

    def _take_dirpath_everywhere(self, trainer: pl.Trainer, replaces: bool = True) -> None:
        problem = self._take_dirpath(replaces) if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise ValueError(problem)

    @staticmethod
    def _locked_message(path: Path) -> str:
        return (
            f"Another run is writing samples to `dirpath` {str(path)!r}: it holds the lock {path / LOCK_NAME}."
            " Give each run its own `dirpath`, or wait for the other run to end (a lock of a process that"
            " died is released with it)."
        )

    def _take_dirpath(self, replaces: bool = True) -> Optional[str]:
        """On global rank 0: load a named tokenizer, check ``dirpath`` is writable and ours, and lock it.

        ``replaces``: whether this run's saves replace an earlier save there (fit), or only add snapshots (the
        evaluation loops, which then have nothing to warn about).
        """
        self._release_lock()  # a lock still held from an earlier fit of this callback that did not end cleanly
        if isinstance(self.tokenizer, (str, os.PathLike)):
            try:
                self._resolved_tokenizer = load_tokenizer(self.tokenizer)
            except (ImportError, OSError, ValueError) as err:
                return f"ActivationSampleCallback cannot load `tokenizer`: {err}"
        path = self.dirpath
        try:
            path.mkdir(parents=True, exist_ok=True)
            # Before writing anything into a directory that may not be ours. Where our lock file is there, the lock
            # comes first: a run holding it may be mid-save, which this check would misread as not ours.
            if lstat_or_none(path / LOCK_NAME) is None:
                claim_samples_dir(path)
        except SamplesDirectoryError as err:
            return f"ActivationSampleCallback will not write into `dirpath`: {err}"
        except OSError:
            pass  # reported below, with the fix
        try:
            probe = path / f".write_probe_{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            return (
                f"ActivationSampleCallback cannot write to `dirpath` {str(path)!r}: {err.strerror or err}."
                " Pass a writable directory as `dirpath`."
            )
        lock = FileLock(path / LOCK_NAME)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return self._locked_message(path)
        try:
            reused = claim_samples_dir(path)  # again under the lock
        except (SamplesDirectoryError, OSError) as err:
            lock.release()
            return f"ActivationSampleCallback will not write into `dirpath`: {err}"
        self._lock = lock
        if reused and replaces:
            rank_zero_warn(
                f"Samples directory {path} exists and is not empty: it holds an earlier save of"
                " ActivationSampleCallback, which this run's saves replace. Files that save did not write are"
                " left alone."
            )
        for entry in foreign_entries(path):
            rank_zero_warn(f"{entry} was not written by ActivationSampleCallback; it is left alone.")
        return None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the latent count on the module, a token source and the tokenizer's special ids before the first step."""
        self._found_num_latents = find_num_latents(pl_module)
        if self.token_source is None:
            places = (getattr(trainer, "datamodule", None), pl_module)
            found = next((s for s in (getattr(p, "token_source", None) for p in places) if s is not None), None)
            self.token_source = self.engine.token_source = load_token_source(found, type(self).__name__)
            row_windows_for(self.settings.row_windows, self.token_source, type(self).__name__)
        if self.settings.exclude_special_tokens:
            tokenizer = self._tokenizer(trainer, pl_module)
            special = getattr(tokenizer, "all_special_ids", None)
            if special is None:
                raise ValueError(
                    "`exclude_special_tokens=True` needs a tokenizer with `all_special_ids`: pass `tokenizer=`"
                    " (or give the datamodule or LightningModule a `tokenizer`), or list the ids in"
                    " `exclude_token_ids`."
                )
            self.engine.exclude_tokens(special)

    def _shard_latents(self, trainer: pl.Trainer, num_latents: Optional[int]) -> None:
        """Tell the collection this process's shard of the latents: given, or from ``ModelParallelStrategy``'s mesh.

        Under tensor parallelism the processes of one tensor-parallel group train on the same batch, each holding a
        share of the latents; the data-parallel group holds the same share for other batches, and merges.
        """
        layout = self.shard_layout(trainer) if callable(self.shard_layout) else self.shard_layout
        strategy = trainer.strategy
        if isinstance(strategy, ModelParallelStrategy):
            tensor, data = strategy.device_mesh["tensor_parallel"], strategy.device_mesh["data_parallel"]
            self._tensor_parallel = tensor.size()
            if tensor.size() > 1:
                self.engine.replica_group = data.get_group() if data.size() > 1 else None
                if layout is None and num_latents is not None:
                    layout = ShardLayout.even(num_latents, tensor.size(), tensor.get_local_rank(),
                                              self.engine.replica_group)
        if layout is not None:
            self.engine.shard_layout = layout

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Release the lock on ``dirpath``."""
        self._release_lock()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Release the lock on ``dirpath`` when the run fails (``teardown`` is not called then)."""
        self._release_lock()

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Decide whether this batch's optimizer step is collected."""
        step = trainer.global_step
        if step > self._due_step:
            self._due_step = self.schedule.next_due(step)
        self._collecting = step == self._due_step and "train" in self.settings.collect_in
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
        """Merge all processes' collections (collective) and return what exact resume needs.

        Lightning keeps only global rank 0's callback state in a checkpoint, so the whole collection is joined
        there; except for a sharded collection under ``ModelParallelStrategy``'s distributed checkpoint, where each
        shard's root puts its own shard into the checkpoint's ``state_dict`` (see :meth:`on_save_checkpoint`) and
        this state only says where. A sharded collection keeps each shard on its root for the samples save that
        follows (which gathers nothing).
        """
        step = self._trainer.global_step if self._trainer is not None else None
        if self.engine.sharded:
            self._shard_part = part = self.engine.merged_shard(self._device())
            if part is not None and step is not None and self._checkpoints_per_rank():
                self._parts_pending = True
                return {"version": STATE_VERSION, "config": self.config(), "collector": None,
                        _PARTS_KEY: self._checkpoint_parts(part, step)}
            self._merged = None if part is None else join_shards(self.engine.shard_layout, part.state)
        else:
            self._merged = self._merged_state()
        # The save that follows writes the current history window: the checkpoint goes on with a new one, and so
        # does this run once that save has committed (on_save_checkpoint).
        collected = self._merged
        if collected is not None and step is not None:
            collected = reset_window_entries(collected, step)
        return {
            "version": STATE_VERSION,
            "config": self.config(),
            "collector": collected if self._rank == 0 else None,
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Write the samples directory for the state merged in :meth:`state_dict`.

        A save that fails (and is logged) leaves the history window open, in this run and in this checkpoint, so
        the next save writes it: every process learns the outcome from rank 0 (one small broadcast a save).
        """
        merged, self._merged = self._merged, None
        part, self._shard_part = self._shard_part, None
        if part is not None:
            saved = self._save(trainer, pl_module, merged, part=part)
        else:
            saved = self._save(trainer, pl_module, merged) if trainer.is_global_zero else True
        if trainer.world_size > 1:
            saved = trainer.strategy.broadcast(saved, src=0)
        if saved:
            self.engine.reset_window(trainer.global_step)
        ours = checkpoint.get("callbacks", {}).get(self.state_key)
        states, self._checkpoint_states = self._checkpoint_states, None
        if states is not None:  # this shard's state goes into the distributed checkpoint, from its root
            checkpoint["state_dict"][self._part_key(part.number + 1)] = split_tensors(states[0 if saved else 1])[1]
        per_rank, self._parts_pending = self._parts_pending, False
        if per_rank:  # each shard's root puts its part of the history into the distributed checkpoint
            history, located = None, self._checkpoint_history(checkpoint, part)
        else:  # a collective when sharded: each shard's root holds its part
            history, located = self.engine.whole_history(), None
        if ours is not None:
            ours["history"] = history  # as this save committed it: resumed into any dirpath, it goes on
            if located is not None:
                ours[_PARTS_KEY]["history"] = located
            if not saved and merged is not None:
                ours["collector"] = merged
            if not saved and _PARTS_KEY in ours:
                ours[_PARTS_KEY]["skeletons"] = ours[_PARTS_KEY].pop("skeletons_unsaved")
            elif _PARTS_KEY in ours:
                ours[_PARTS_KEY].pop("skeletons_unsaved")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the final samples directory."""
        if self._health is not None and trainer.is_global_zero and self._health.pending_step is not None:
            self._health.log(trainer, self.collector)
        if self.engine.sharded:
            part = self.engine.merged_shard(self._device())
            if part is not None:
                self._save(trainer, pl_module, None, final=True, part=part)
        else:
            merged = self._merged_state()
            if trainer.is_global_zero:
                self._save(trainer, pl_module, merged, final=True)
        self.engine.reset_window(trainer.global_step)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Find this callback's state when it was saved under another ``dirpath`` (resuming into a new directory).

        The state is adopted when exactly one unclaimed entry of the checkpoint reads the same outputs.
        """
        states = checkpoint.get("callbacks")
        if not states or self.state_key in states:
            return
        inputs = {k: v for k, v in self._state_key_parts().items() if k != "dirpath"}
        claimed = {cb.state_key for cb in trainer.callbacks}
        candidates = [key for key in states if key not in claimed and self._reads_same_inputs(key, inputs)]
        if len(candidates) == 1:
            states[self.state_key] = states[candidates[0]]
            rank_zero_info(f"ActivationSampleCallback resumes the collection saved as {candidates[0]}.")
        elif candidates:
            rank_zero_warn(
                f"The checkpoint holds {len(candidates)} ActivationSampleCallback collections this callback could"
                f" resume ({candidates}); it starts afresh. Pass each callback the `dirpath` it had."
            )

    def _reads_same_inputs(self, key: Any, inputs: dict[str, str]) -> bool:
        prefix = type(self).__qualname__
        if not isinstance(key, str) or not key.startswith(prefix + "{"):
            return False
        try:
            parts = ast.literal_eval(key[len(prefix) :])
        except (ValueError, SyntaxError):
            return False
        return isinstance(parts, dict) and all(parts.get(k, v) == v for k, v in inputs.items())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the collection from a checkpoint; the merged state resumes on global rank 0.

        A collection kept in parts of a distributed checkpoint is read back from ``trainer.ckpt_path`` (a collective).
        """
        parts = state_dict.get(_PARTS_KEY)
        span = None
        if parts is not None and state_dict.get("collector") is None:
            collected, span, history = self._load_checkpoint_parts(parts)
            state_dict = {**state_dict, "collector": collected}
            if history is not None:  # the parts of the history this process's shard needs, joined
                state_dict["history"] = history
        self.engine.load_state_dict(state_dict, owner="ActivationSampleCallback", span=span)

    # ------------------------------------------------------------------ per-rank checkpoints
    def _checkpoints_per_rank(self) -> bool:
        """Whether each shard's root can put its own state in the checkpoint: a distributed checkpoint.

        ``ModelParallelStrategy`` hands the checkpoint's ``state_dict`` to ``torch.distributed.checkpoint``, where
        every process writes its own entries; any other checkpoint keeps global rank 0's alone.
        """
        strategy = self._strategy
        return isinstance(strategy, ModelParallelStrategy) and bool(
            getattr(strategy, "_save_distributed_checkpoint", False))

    def _part_key(self, number: int) -> str:
        digest = hashlib.sha256(self.state_key.encode("utf-8")).hexdigest()[:12]
        return f"activation_samples-{digest}-part{number}"

    def _checkpoint_parts(self, part: ShardPart, step: int) -> dict[str, Any]:
        """Keep this root's shard for the checkpoint, and say where the parts are (a collective).

        A root keeps its shard as the save leaves it and as it stays if the save fails; the returned entry lists
        every root's skeleton for both, while the tensors go into the distributed checkpoint with the model's.
        """
        states = None if part.state is None else (reset_window_entries(part.state, step), part.state)
        self._checkpoint_states = states
        mine = None if states is None else (part.number, *(split_tensors(state)[0] for state in states))
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        roots = sorted(item for item in gathered if item is not None)
        return {"keys": [self._part_key(number + 1) for number, _, _ in roots], "ranges": part.ranges,
                "skeletons": [saved for _, saved, _ in roots], "skeletons_unsaved": [kept for _, _, kept in roots]}

    def _history_key(self, number: int) -> str:
        return self._part_key(number).replace("-part", "-history", 1)

    def _checkpoint_history(self, checkpoint: dict, part: ShardPart) -> dict[str, Any]:
        """Put this root's part of the history into the checkpoint, and say where every root's is (a collective).

        Only each part's skeleton (its tensors' names and shapes, a few numbers) travels; the tensors go into the
        distributed checkpoint with the model's.
        """
        mine = None
        history = self.engine.shard_history() if part.state is not None else None
        if history is not None:
            skeleton, tensors = split_tensors(history_to_tensors(history))
            checkpoint["state_dict"][self._history_key(part.number + 1)] = tensors
            mine = (part.number, skeleton)
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        roots = sorted((item for item in gathered if item is not None), key=lambda item: item[0])
        return {"keys": [self._history_key(number + 1) for number, _ in roots],
                "ranges": [part.ranges[number] for number, _ in roots], "skeletons": [s for _, s in roots]}

    def _load_checkpoint_parts(
        self, parts: dict[str, Any]
    ) -> tuple[dict, Optional[tuple[int, int]], Optional[dict]]:
        """The parts of the collection a distributed checkpoint holds that this process needs, joined (a collective).

        Where this process's shard is known (``num_latents`` or ``shard_layout``), only the parts it overlaps;
        else all of them. Returns the joined state, for some parts ``(first latent, F)`` (else ``None``), and the
        history of the same parts joined (``None`` where the checkpoint keeps none in parts).
        """
        from torch.distributed.checkpoint import load

        path = self._trainer.ckpt_path if self._trainer is not None else None
        layout = self.engine.shard_layout
        try:
            chosen = list(zip(parts["keys"], parts["skeletons"], parts["ranges"]))
            total = int(chosen[-1][2][1])
            if layout is not None and layout.total == total:
                chosen = [item for item in chosen if item[2][0] < layout.stop and layout.offset < item[2][1]]
            located = parts.get("history") or {"keys": [], "skeletons": [], "ranges": []}
            spans = [tuple(item[2]) for item in chosen]
            stories = [item for item in zip(located["keys"], located["skeletons"], located["ranges"])
                       if tuple(item[2]) in spans]
            templates = {key: empty_tensors(skeleton) for key, skeleton, _ in chosen + stories}
            load({"state_dict": templates}, checkpoint_id=path)
            state = concat_states([join_tensors(skeleton, templates[key]) for key, skeleton, _ in chosen])
            history = join_histories([history_from_tensors(join_tensors(skeleton, templates[key]))
                                      for key, skeleton, _ in stories], path) if stories else None
            _log.info("ActivationSampleCallback on rank %d resumes from %d of the %d parts of its collection in %s.",
                      self._rank, len(chosen), len(parts["keys"]), path)
            first = int(chosen[0][2][0])
            return state, None if first == 0 and int(state["num_latents"]) == total else (first, total), history
        except Exception as err:
            raise ValueError(
                f"Cannot resume: the checkpoint {path} keeps ActivationSampleCallback's collection in parts"
                f" ({parts.get('keys')}) in its distributed checkpoint, which could not be read back: {err}. Resume"
                " from the distributed checkpoint folder with ModelParallelStrategy, or without its collection."
            ) from err

    # ------------------------------------------------------------------ evaluation snapshots
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start an empty snapshot collection when validation runs are collected (not the sanity check)."""
        self._start_snapshot(trainer, "validate")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Fold the batch's latents into the snapshot (with the step of the weights)."""
        self._snapshot_batch(trainer, pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge the ranks' snapshot exactly and write it to ``snapshots/step_<global_step>/``."""
        self._end_snapshot(trainer, pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_start`."""
        self._start_snapshot(trainer, "test")

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """See :meth:`on_validation_batch_end`."""
        self._snapshot_batch(trainer, pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_end`."""
        self._end_snapshot(trainer, pl_module)

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_start`."""
        self._start_snapshot(trainer, "predict")

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """See :meth:`on_validation_batch_end`."""
        self._snapshot_batch(trainer, pl_module, outputs, batch)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_end`."""
        self._end_snapshot(trainer, pl_module)

    def _start_snapshot(self, trainer: pl.Trainer, loop: str) -> None:
        self._snapshot = None
        if loop not in self.settings.collect_in or trainer.sanity_checking:
            return
        self._rank, self._strategy = trainer.global_rank, trainer.strategy
        snapshot = ActivationSampleCollector(config=dataclasses.replace(self.settings),
                                             merge_policy=self.engine.merge_policy, token_source=self.token_source,
                                             shard_layout=self.engine.shard_layout,
                                             replica_group=self.engine.replica_group)
        snapshot.rank = self._rank
        self._snapshot, self._snapshot_loop, self._snapshot_step = snapshot, loop, self._weights_step(trainer)

    @staticmethod
    def _weights_step(trainer: pl.Trainer) -> int:
        """The optimizer step of the weights being evaluated: the trainer's, or that of the checkpoint loaded.

        ``trainer.validate(ckpt_path=...)`` restores the weights but not the trainer's step counter.
        """
        if trainer.state.fn == "fit" or not trainer.ckpt_path:
            return trainer.global_step
        try:
            checkpoint = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            return int(checkpoint["global_step"])
        except Exception as err:  # noqa: BLE001 - any unreadable step falls back to the trainer's
            if trainer.global_step == 0:  # after a fit of this trainer its counter is the step of "last"
                rank_zero_warn(
                    f"ActivationSampleCallback could not read the step of {trainer.ckpt_path} ({err}); the snapshot"
                    " is recorded at step 0."
                )
            return trainer.global_step

    def _snapshot_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        snapshot = self._snapshot
        if snapshot is None or outputs is None:
            return
        latents = read_latents(outputs, batch, self.keys)
        if latents.dense is None and snapshot.settings.num_latents is None:
            found = self.settings.num_latents or find_num_latents(pl_module)
            if found is None:
                raise LatentInputError(
                    "Sparse latents do not tell the latent count: pass `num_latents=F` to ActivationSampleCallback"
                    f" or give the LightningModule (or its SAE submodule, or their `cfg`) one of {NUM_LATENTS_ATTRS}."
                )
            snapshot.settings.num_latents = found
        snapshot.fold(latents, self._snapshot_step, self.keys)

    def _end_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        dirpath = self.dirpath / SNAPSHOTS_DIR / snapshot_dirname(self._snapshot_step)
        # After a fit, the trainer's counter is the run's last training step, which ckpt_path may predate.
        kept = dict(global_step=self._snapshot_step, full_state=self.settings.save_full_state != "never",
                    owner="ActivationSampleCallback", source=self._snapshot_loop, trained_step=trainer.global_step)
        if snapshot.sharded:
            part = snapshot.merged_shard(self._device())
            if part is None:
                return
            part = snapshot.shard_with_windows(part)
            tokenizer = self._tokenizer(trainer, pl_module) if part.state is not None else None
            self.last_snapshot_dir = dirpath
            snapshot.write_shards(dirpath, part, tokenizer=tokenizer, config=self.config(), **kept)
            return
        merged = self._merged_state(snapshot)
        if not trainer.is_global_zero or merged is None:
            return
        dirpath.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = self._tokenizer(trainer, pl_module)
        self.last_snapshot_dir = dirpath
        snapshot.write(dirpath, merged, tokenizer=tokenizer, config=self.config(), **kept)

    # ------------------------------------------------------------------ collection
    def _collect(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        if outputs is None:
            return
        self._fold(pl_module, read_latents(outputs, batch, self.keys))

    def _fold(self, pl_module: Any, latents: LatentBatch) -> None:
        """Fold one checked batch (``pl_module``: where a sparse batch's latent count is looked for)."""
        if self._tensor_parallel > 1 and latents.shard is None and self.engine.shard_layout is None:
            raise LatentInputError(
                f"Under ModelParallelStrategy with tensor_parallel_size={self._tensor_parallel} the processes of a"
                " tensor-parallel group train on the same batch, so latents that are not sharded would count each"
                f" token {self._tensor_parallel} times. Return `{self.keys.latents}` as a DTensor sharded on the"
                " latent dimension (e.g. ColwiseParallel(use_local_output=False) on the encoder), or give"
                " ActivationSampleCallback `num_latents` (or the module a `num_latents`) and return each process's"
                " share of the latents."
            )
        if latents.dense is None and self.settings.num_latents is None:
            self._sparse_num_latents(pl_module)
        self.engine.rank = self._rank
        self.engine.fold(latents, self._batch_step, self.keys)
        collector = self.collector
        if self._health is not None and self._rank == 0 and collector is not None and (
            latents.tokens.numel() or latents.token_refs is not None
        ):
            self._health.observe(self._batch_step, collector.last_active, int(collector.last_seen))

    def _sparse_num_latents(self, pl_module: pl.LightningModule) -> None:
        found = self._found_num_latents or find_num_latents(pl_module)
        if found is not None:
            self.settings.num_latents = found
        elif not self.engine.has_collection:
            raise LatentInputError(
                "Sparse latents do not tell the latent count: pass `num_latents=F` to ActivationSampleCallback or"
                f" give the LightningModule (or its SAE submodule, or their `cfg`) one of {NUM_LATENTS_ATTRS}."
            )

    # ------------------------------------------------------------------ saving
    def _device(self) -> Optional[torch.device]:
        return self._strategy.root_device if self._strategy is not None else None

    def _merged_state(self, owner: Optional[ActivationSampleCollector] = None) -> Optional[dict]:
        strategy = self._strategy
        device = self._device()
        gather = None
        if strategy is not None and strategy.world_size > 1:
            def gather(collector: SampleCollector) -> Optional[dict]:
                return gather_merged_state(collector, strategy, is_root=self._rank == 0)
        owner = owner or self.engine
        owner.rank = self._rank
        return owner.merged_state(device, gather)

    def _tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self._resolved_tokenizer is None:
            candidate = self.tokenizer
            if candidate is None:
                candidate = getattr(trainer.datamodule, "tokenizer", None) or getattr(pl_module, "tokenizer", None)
            self._resolved_tokenizer = load_tokenizer(candidate)
        return self._resolved_tokenizer

    def _save(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: Optional[dict], final: bool = False,
        part: Optional[ShardPart] = None,
    ) -> bool:
        """Write the samples directory; a failure is logged (the model checkpoint still gets written) or raised.

        With ``part`` (a sharded collection's share, on every process) it is a sharded save, a collective whose
        outcome every process shares.

        Returns:
            Whether the directory holds this state now (written, or nothing new to write).
        """
        try:
            if part is not None:
                self._write_shards(trainer, pl_module, part, final)
            else:
                self._write(trainer, pl_module, merged, final)
            return True
        except Exception as err:
            if self.settings.on_save_error == "raise":
                raise
            if isinstance(err, ShardedSaveError) and not trainer.is_global_zero:
                return False  # another process failed: it and rank 0 log it, not every process
            _log.error(
                "ActivationSampleCallback could not save samples to %s at step %d: %s: %s. Training goes on: the"
                " collection stays in memory and in the model checkpoint, and the next save retries (pass"
                " on_save_error='raise' to stop training instead).",
                self.dirpath, trainer.global_step, type(err).__name__, str(err).rstrip("."), exc_info=err,
            )
            return False

    def _write_shards(self, trainer: pl.Trainer, pl_module: pl.LightningModule, part: ShardPart, final: bool) -> None:
        """A sharded save: each shard's root writes its own latents (no logit effects or decoder directions)."""
        full_state = self._full_state(final)
        skip = False
        if trainer.is_global_zero:  # rank 0 is a shard's root: the run counters are every shard's
            written = _collected_so_far(part.state)
            skip = written == self._last_written and (self._last_full_state or not full_state)
            if skip and trainer.global_step != self._last_save_step:
                rank_zero_info(
                    f"ActivationSampleCallback: nothing collected since the samples saved at step"
                    f" {self._last_save_step}; {self.dirpath} is not written again."
                )
        if trainer.strategy.broadcast(skip, src=0):
            return
        if self.logit_effects is not None and not self._warned_sharded_extras:
            self._warned_sharded_extras = True
            rank_zero_warn(
                "ActivationSampleCallback: a sharded collection's saves write no logit effects and no decoder"
                " directions yet (each process holds a shard of the latents); the samples are saved as usual."
            )
        part = self.engine.shard_with_windows(part)
        tokenizer = self._tokenizer(trainer, pl_module) if part.state is not None else None
        self.engine.write_shards(self.dirpath, part, tokenizer=tokenizer, config=self.config(),
                                 global_step=trainer.global_step, full_state=full_state,
                                 owner="ActivationSampleCallback")
        if trainer.is_global_zero:
            self._last_written, self._last_full_state = written, full_state
            self._last_save_step, self._last_decoder = trainer.global_step, False

    def _full_state(self, final: bool) -> bool:
        return self.settings.save_full_state == "every" or (final and self.settings.save_full_state == "end")

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: Optional[dict], final: bool) -> None:
        full_state = self._full_state(final)
        written = None if merged is None else _collected_so_far(merged)
        wants_decoder = self.logit_effects is not None and self.settings.save_decoder_directions and (
            full_state or final)
        if (written is not None and written == self._last_written and (self._last_full_state or not full_state)
                and (self._last_decoder or not wants_decoder)):
            if trainer.global_step != self._last_save_step:  # a second save of one step (save_last) says nothing
                rank_zero_info(
                    f"ActivationSampleCallback: nothing collected since the samples saved at step"
                    f" {self._last_save_step}; {self.dirpath} is not written again."
                )
            return
        tokenizer = extras = decoder = None
        if merged is not None:
            tokenizer = self._tokenizer(trainer, pl_module)
            matrices = module_matrices(self.logit_effects, pl_module, int(merged["num_latents"]))
            extras = logit_effect_extras(
                matrices, merged, self.settings.rank_features_by,
                self.settings.top_features_to_save, self.settings.logit_effects_k, tokenizer,
            )
            if matrices is not None and wants_decoder:
                decoder = matrices[0]
        self.engine.write(
            self.dirpath,
            merged,
            tokenizer=tokenizer,
            config=self.config(),
            global_step=trainer.global_step,
            full_state=full_state,
            feature_extras=extras,
            owner="ActivationSampleCallback",
            decoder=decoder,
        )
        if written is not None:
            self._last_written, self._last_full_state = written, full_state
            self._last_save_step = trainer.global_step
            self._last_decoder = decoder is not None


def default_dirpath(callback: Callback, trainer: pl.Trainer) -> Path:
    """``<trainer.log_dir or default_root_dir>/activation_samples``, when no other samples callback defaults to it.

    Raises:
        ValueError: Another samples callback of ``trainer`` has no ``dirpath`` either (both would write there).
    """
    path = Path(trainer.log_dir or trainer.default_root_dir) / "activation_samples"
    others = [cb for cb in trainer.callbacks if cb is not callback and getattr(cb, "uses_default_dirpath", False)]
    if others and getattr(callback, "uses_default_dirpath", False):
        names = ", ".join(type(cb).__name__ for cb in (callback, *others))
        raise ValueError(
            f"{names} in one Trainer all write to the default `dirpath` {str(path)!r}. Pass each its own"
            " `dirpath=`, or collect several SAEs with one MultiSAECallback(saes=...), which writes each to"
            " its own folder."
        )
    return path


def _collected_so_far(merged: dict) -> tuple[int, ...]:
    """What tells two merged states apart when nothing was collected in between: the run's counters."""
    return tuple(int(merged[name]) for name in ("steps_collected", "tokens_seen", "last_collected_step",
                                                "nonfinite_skipped"))
