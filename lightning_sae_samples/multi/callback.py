"""MultiSAECallback: collect the top activating contexts of several SAEs trained in one LightningModule.

Each named SAE is served by its own :class:`~lightning_sae_samples.ActivationSampleCallback` (its collection,
health metrics, saves and snapshots, unchanged); this callback drives them from one set of Lightning hooks, checks
each step's token ids once for all of them, finds each SAE's latents (in the ``training_step`` outputs, or by a
forward hook on its module while the step is collected), and writes the run folder ``DIR/<name>/`` plus the run
index under one lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from filelock import FileLock
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_sae_samples.callback import ActivationSampleCallback, default_dirpath
from lightning_sae_samples.config import CallbackConfig
from lightning_sae_samples.engine.sample_table import MergePolicy
from lightning_sae_samples.inputs import InputKeys, LatentInputError, find_num_latents
from lightning_sae_samples.multi.capture import FoundLatents, LatentCapture, find_module, latents_of, match_modules
from lightning_sae_samples.multi.collector import MULTI_STATE_VERSION, SAEs, SAESpec, SharedTokens, sae_keys, sae_specs
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError
from lightning_sae_samples.samples_dir.run_folder import check_sae_names, lock_run_dir, write_run_index
from lightning_sae_samples.serve import serve_command
from lightning_sae_samples.token_sources import TokenSource, load_token_source
from lightning_sae_samples.tokens import load_tokenizer

_log = logging.getLogger("lightning.pytorch").getChild(__name__)
_OWN_LATENT_KEYS = ("latents_key", "latent_indices_key", "latent_values_key")
#: Where a sparse SAE without a module of its own looks for its latent count: nowhere (it must say ``num_latents``).
_NO_MODULE = nn.Module()


class MultiSAECallback(Callback):
    r"""Keep, for every latent of each of several SAEs, its exact top activating token contexts.

    Args:
        saes: The SAE names, or a mapping of each name to its own entries: ``module`` (the name, or an fnmatch
            pattern matching one, of the SAE's module on the LightningModule: its ``forward`` output is caught by
            a hook on collected steps), ``logit_effects`` (see :class:`ActivationSampleCallback`), and any
            setting of :class:`~lightning_sae_samples.config.CallbackConfig` it sets for itself
            (``num_latents``, ``max_samples_per_feature``, ``latents_key``, ...; not the shared token keys).
            Without ``module`` or its own ``*_key`` settings, an SAE's latents are the ``training_step`` outputs'
            entry of its name: a dense tensor, an ``(indices, values)`` pair, sparsify's ``ForwardOutput`` or a
            mapping with ``latents`` or ``latent_indices`` + ``latent_values``. Outputs take precedence over hooks.
        modules: Instead of ``saes``: an fnmatch pattern over the LightningModule's module names (e.g.
            ``"saes.*"``); every match is an SAE named by its module name, caught by a hook.
        dirpath: The run folder; default ``<trainer.log_dir or default_root_dir>/activation_samples``. Each SAE
            writes ``dirpath/<name>/`` (a samples directory readable alone) and the run index
            ``dirpath/sae_samples_run.json`` is written after them; one lock covers the folder.
        tokenizer: As :class:`ActivationSampleCallback`'s (shared; a name is loaded once).
        token_source: As :class:`ActivationSampleCallback`'s (shared).
        config: The settings every SAE shares, as one :class:`~lightning_sae_samples.config.CallbackConfig`.
        merge_policy: See :class:`ActivationSampleCallback`.
        **settings: Fields of :class:`~lightning_sae_samples.config.CallbackConfig` every SAE shares.

    Health metrics are logged per SAE as ``feature_health/<name>/l0`` and so on.

    Example::

        >>> from lightning_sae_samples import MultiSAECallback
        >>> callback = MultiSAECallback(modules="saes.*", collection_freq=100)
    """

    def __init__(
        self,
        saes: Optional[SAEs] = None,
        dirpath: Optional[Union[str, Path]] = None,
        tokenizer: Optional[Any] = None,
        token_source: Optional[Union[TokenSource, str]] = None,
        *,
        modules: Optional[str] = None,
        config: Optional[CallbackConfig] = None,
        merge_policy: Optional[MergePolicy] = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if config is None:
            CallbackConfig.check_names(settings, owner)
            config = CallbackConfig(**settings)
        elif settings:
            raise TypeError(f"Pass {owner} either `config` or keyword settings, not both.")
        if (saes is None) == (modules is None):
            raise ValueError(
                f"Pass {owner} either `saes` (the SAE names, or each name's settings) or `modules` (a pattern"
                " over the LightningModule's module names, e.g. 'saes.*'), not both or neither."
            )
        if modules is not None and not (isinstance(modules, str) and modules):
            raise ValueError(f"`modules` must be a non-empty fnmatch pattern, e.g. 'saes.*'; got {modules!r}.")
        self.settings = config
        self.modules_pattern = modules
        self.keys = InputKeys.of(config)
        self.dirpath: Optional[Path] = ActivationSampleCallback._check_dirpath(dirpath)
        self._dirpath_arg = None if dirpath is None else os.fspath(dirpath)
        self.tokenizer = ActivationSampleCallback._check_tokenizer(tokenizer)
        self.token_source = load_token_source(token_source, owner)
        self.merge_policy = merge_policy
        self.specs: dict[str, SAESpec] = {}
        #: Each SAE's one-SAE callback, by name (for ``modules``, filled in ``setup``).
        self.members: dict[str, ActivationSampleCallback] = {}
        if saes is not None:
            self._add_members(sae_specs(saes, CallbackConfig, owner, extras=("module", "logit_effects")))
        self._sae_modules: dict[str, nn.Module] = {}
        self._capture = LatentCapture({})
        self._lock: Optional[FileLock] = None

    def _add_members(self, specs: list[SAESpec]) -> None:
        for spec in specs:
            member = ActivationSampleCallback(
                tokenizer=self.tokenizer, logit_effects=spec.logit_effects, token_source=self.token_source,
                config=dataclasses.replace(self.settings, log_serve_command=False, **spec.settings),
                merge_policy=self.merge_policy,
            )
            if member._health is not None:
                member._health.prefix = f"feature_health/{spec.name}/"
            self.specs[spec.name], self.members[spec.name] = spec, member

    @property
    def names(self) -> list[str]:
        """The SAE names, in the order given (for ``modules``, known from ``setup`` on)."""
        return list(self.members)

    @property
    def uses_default_dirpath(self) -> bool:
        """Whether this callback was given no ``dirpath`` (two such samples callbacks in one Trainer are refused)."""
        return self._dirpath_arg is None

    @property
    def state_key(self) -> str:
        """Stable checkpoint key: the SAE names (or the module pattern) and the ``dirpath`` given."""
        parts = {"saes": ",".join(self.specs)} if self.modules_pattern is None else {"modules": self.modules_pattern}
        if self._dirpath_arg is not None:
            parts["dirpath"] = self._dirpath_arg
        return self._generate_state_key(**parts)

    # ------------------------------------------------------------------ setup and teardown
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the SAEs' modules, take the run folder (ours, locked), then set up each SAE in ``dirpath/<name>``."""
        if self.dirpath is None:
            self.dirpath = default_dirpath(self, trainer)
        if self.modules_pattern is not None and not self.members:
            found = match_modules(pl_module, self.modules_pattern)
            check_sae_names(list(found))
            self._add_members([SAESpec(name=name, module=name) for name in found])
        self._sae_modules = {
            name: find_module(pl_module, spec.module, name) for name, spec in self.specs.items() if spec.module
        }
        self._capture = LatentCapture(self._sae_modules)
        if stage == "fit" or stage in self.settings.collect_in:
            problem = self._take_run_dir() if trainer.is_global_zero else None
            problem = trainer.strategy.broadcast(problem)
            if problem:
                raise ValueError(problem)
        for name, member in self.members.items():
            member.dirpath = self.dirpath / name
            member.setup(trainer, self._sae_modules.get(name, _NO_MODULE), stage)
        if stage == "fit" and self.settings.log_serve_command:
            rank_zero_info(f"MultiSAECallback: browse the samples live: {serve_command(self.dirpath)}")

    def _take_run_dir(self) -> Optional[str]:
        """On global rank 0: load a named tokenizer once, and take the run folder (ours, locked)."""
        self._release_lock()
        if isinstance(self.tokenizer, (str, os.PathLike)):
            try:
                loaded = load_tokenizer(self.tokenizer)
            except (ImportError, OSError, ValueError) as err:
                return f"MultiSAECallback cannot load `tokenizer`: {err}"
            for member in self.members.values():
                member.tokenizer = member._resolved_tokenizer = loaded
        try:
            self._lock = lock_run_dir(self.dirpath, self.names)
        except SamplesDirectoryError as err:
            return f"MultiSAECallback will not write into `dirpath`: {err}"
        except OSError as err:
            return (
                f"MultiSAECallback cannot write to `dirpath` {str(self.dirpath)!r}: {err.strerror or err}. Pass a"
                " writable directory as `dirpath`."
            )
        return None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Each SAE's fit start (token source, special ids; the tokenizer resolved once), and its latent count."""
        resolved = None
        for name, member in self.members.items():
            if resolved is not None and member._resolved_tokenizer is None:
                member._resolved_tokenizer = resolved
            member.on_fit_start(trainer, pl_module)
            resolved = resolved or member._resolved_tokenizer
            module = self._sae_modules.get(name)
            member._found_num_latents = find_num_latents(module) if module is not None else None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove any hook and release the locks."""
        self._capture.close()
        for member in self.members.values():
            member.teardown(trainer, pl_module, stage)
        self._release_lock()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove any hook and release the locks when the run fails."""
        self._capture.close()
        for member in self.members.values():
            member.on_exception(trainer, pl_module, exception)
        self._release_lock()

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    # ------------------------------------------------------------------ collection
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Decide each SAE's collection; hook the modules of those collected (only on those steps)."""
        for member in self.members.values():
            member.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        due = self._due(lambda member: member._collecting)
        if any(name in self._sae_modules for name in due):
            self._capture.open(due)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold each collected SAE's latents, the step's tokens checked once; log health once per step."""
        captured = self._take_captured()
        due = self._due(lambda member: member._collecting)
        if not due:
            return
        shared = self._shared_tokens(outputs, batch)
        for name in due:
            member = self.members[name]
            member._fold(self._sae_modules.get(name, _NO_MODULE), self._batch_of(name, shared, outputs, captured))
            if member._health is not None and trainer.is_global_zero and trainer.global_step != member._batch_step:
                member._health.log(trainer, member.collector)

    def _due(self, collecting: Any) -> list[str]:
        return [name for name, member in self.members.items() if collecting(member)]

    def _take_captured(self) -> dict[str, Any]:
        if not self._capture.is_open:
            return {}
        self._capture.close()
        return self._capture.take()

    def _shared_tokens(self, outputs: Any, batch: Any) -> SharedTokens:
        outputs = outputs if isinstance(outputs, Mapping) else {}

        def lookup(key: str) -> Any:
            if key in outputs:
                return outputs[key]
            return batch[key] if isinstance(batch, Mapping) and key in batch else None

        tokens = lookup(self.keys.tokens)
        refs = lookup(self.keys.token_refs) if tokens is None else None
        if tokens is None and refs is None:
            raise LatentInputError(
                f"No token ids found: expected `{self.keys.tokens}` (or shuffled rows' `{self.keys.token_refs}`) in"
                " the training_step outputs or in the batch. Return them, or set `tokens_key` (`token_refs_key`)."
            )
        return SharedTokens.check(tokens, refs, lookup(self.keys.attention_mask), self.keys)

    def _batch_of(self, name: str, shared: SharedTokens, outputs: Any, captured: Mapping[str, Any]) -> Any:
        """SAE ``name``'s latents, checked against the shared tokens: its own keys, its outputs entry, its hook."""
        outputs = outputs if isinstance(outputs, Mapping) else {}
        spec, member = self.specs[name], self.members[name]
        if any(key in spec.settings for key in _OWN_LATENT_KEYS):
            keys = member.keys
            found = FoundLatents(outputs.get(keys.latents), outputs.get(keys.latent_indices),
                                 outputs.get(keys.latent_values))
            if found.dense is not None or found.indices is not None:
                return shared.batch(*found, keys)
        keys = sae_keys(name, self.keys)
        if name in outputs:
            return shared.batch(*latents_of(outputs[name], name), keys)
        if name in captured:
            return shared.batch(*latents_of(captured[name], name), keys)
        raise LatentInputError(
            f"No latents for SAE {name!r}: return them in the training_step outputs as {name!r} (a tensor, an"
            " (indices, values) pair or the SAE's output), set its own `latents_key` (or `latent_indices_key` and"
            " `latent_values_key`), or name its `module` so that a hook catches them."
        )

    # ------------------------------------------------------------------ checkpoints and saves
    def state_dict(self) -> dict[str, Any]:
        """Each SAE's collection merged over all processes (collective), by name."""
        return {"version": MULTI_STATE_VERSION, "saes": {name: m.state_dict() for name, m in self.members.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore each SAE's collection; an SAE the checkpoint lacks starts afresh (with a warning)."""
        saved = state_dict.get("saes") if isinstance(state_dict, Mapping) else None
        if not isinstance(saved, Mapping):
            raise ValueError("Cannot resume MultiSAECallback: its checkpoint entry holds no `saes` mapping.")
        for name, member in self.members.items():
            if name in saved:
                member.engine.load_state_dict(saved[name], owner=f"MultiSAECallback's SAE {name!r}")
            else:
                rank_zero_warn(f"MultiSAECallback: the checkpoint holds no collection of SAE {name!r}; it starts anew.")
        extra = sorted(set(saved) - set(self.members))
        if extra:
            rank_zero_warn(f"MultiSAECallback: the checkpoint's SAEs {extra} are not in this run; they are left out.")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Write each SAE's samples directory, then the run index; a failed SAE save keeps its window open."""
        merged = {}
        for name, member in self.members.items():
            merged[name], member._merged = member._merged, None
        saved = {name: True for name in self.members}
        if trainer.is_global_zero:
            saved = {name: member._save(trainer, pl_module, merged[name]) for name, member in self.members.items()}
            self._write_index(trainer)
        if trainer.world_size > 1:
            saved = trainer.strategy.broadcast(saved, src=0)
        entry = checkpoint.get("callbacks", {}).get(self.state_key)
        for name, member in self.members.items():
            if saved[name]:
                member.engine.reset_window(trainer.global_step)
            elif merged[name] is not None and entry is not None:
                entry["saes"][name]["collector"] = merged[name]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write each SAE's final samples directory, then the run index."""
        for member in self.members.values():
            if member._health is not None and trainer.is_global_zero and member._health.pending_step is not None:
                member._health.log(trainer, member.collector)
            merged = member._merged_state()
            if trainer.is_global_zero:
                member._save(trainer, pl_module, merged, final=True)
            member.engine.reset_window(trainer.global_step)
        if trainer.is_global_zero:
            self._write_index(trainer)

    def _write_index(self, trainer: pl.Trainer) -> None:
        try:
            write_run_index(self.dirpath, self.names)
        except OSError as err:
            if self.settings.on_save_error == "raise":
                raise
            _log.error("MultiSAECallback could not write the run index of %s at step %d: %s", self.dirpath,
                       trainer.global_step, err)

    # ------------------------------------------------------------------ evaluation snapshots
    def _start_snapshots(self, trainer: pl.Trainer, loop: str) -> None:
        for member in self.members.values():
            member._start_snapshot(trainer, loop)
        due = self._due(lambda member: member._snapshot is not None)
        if any(name in self._sae_modules for name in due):
            self._capture.open(due)

    def _snapshot_batches(self, pl_module: pl.LightningModule, outputs: Any, batch: Any) -> None:
        captured = self._take_captured_keep_open()
        due = self._due(lambda member: member._snapshot is not None)
        if not due:
            return
        shared = self._shared_tokens(outputs, batch)
        for name in due:
            member = self.members[name]
            snapshot = member._snapshot
            latents = self._batch_of(name, shared, outputs, captured)
            if latents.dense is None and snapshot.settings.num_latents is None:
                module = self._sae_modules.get(name)
                found = member.settings.num_latents or (find_num_latents(module) if module is not None else None)
                if found is None:
                    raise LatentInputError(
                        f"Sparse latents of SAE {name!r} do not tell the latent count: give it `num_latents`."
                    )
                snapshot.settings.num_latents = found
            snapshot.fold(latents, member._snapshot_step, member.keys)

    def _take_captured_keep_open(self) -> dict[str, Any]:
        return self._capture.take() if self._capture.is_open else {}

    def _end_snapshots(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._capture.close()
        for member in self.members.values():
            member._end_snapshot(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start each SAE's snapshot when validation runs are collected (see ``collect_in``)."""
        self._start_snapshots(trainer, "validate")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Fold the batch into each SAE's snapshot."""
        self._snapshot_batches(pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write each SAE's snapshot to ``dirpath/<name>/snapshots/step_<global_step>/``."""
        self._end_snapshots(trainer, pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_start`."""
        self._start_snapshots(trainer, "test")

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """See :meth:`on_validation_batch_end`."""
        self._snapshot_batches(pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_end`."""
        self._end_snapshots(trainer, pl_module)

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_start`."""
        self._start_snapshots(trainer, "predict")

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """See :meth:`on_validation_batch_end`."""
        self._snapshot_batches(pl_module, outputs, batch)

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`on_validation_epoch_end`."""
        self._end_snapshots(trainer, pl_module)
