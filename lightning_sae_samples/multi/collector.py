"""Many SAEs in one collection: named one-SAE collectors that share each step's checked tokens.

A run of several SAEs (one per layer or hookpoint, transcoders, ...) is a thin layer above one: each SAE has its
own :class:`~lightning_sae_samples.ActivationSampleCollector` (today's engine, unchanged, with its own ``F``,
dense or sparse latents and settings), and a step's token ids (or refs) and mask are checked once for all of
them. State, resume and the DDP merge are keyed by SAE name and exact per SAE. A save writes the run folder
``DIR/<name>/`` (each a samples directory in the one-SAE format, readable alone) and, last, the run index
``DIR/sae_samples_run.json``, under one lock (see ``docs/format.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from filelock import FileLock
from torch import Tensor, nn

from lightning_sae_samples.arguments import positive_int
from lightning_sae_samples.collector import ActivationSampleCollector
from lightning_sae_samples.config import CollectionConfig
from lightning_sae_samples.engine.sample_table import MergePolicy
from lightning_sae_samples.engine.windows import padding_positions
from lightning_sae_samples.inputs import (
    DEFAULT_KEYS,
    InputKeys,
    LatentBatch,
    LatentInputError,
    check_attention_mask,
    check_latents,
    check_refs,
    check_rows,
    check_token_ids,
    check_tokens,
)
from lightning_sae_samples.multi.capture import LatentCapture, latents_of
from lightning_sae_samples.samples_dir.run_folder import check_sae_names, lock_run_dir, write_run_index
from lightning_sae_samples.state.validate import check_state
from lightning_sae_samples.token_sources import TokenSource, load_token_source
from lightning_sae_samples.tokens import describe_tokenizer, load_tokenizer

#: Version of a run's checkpoint entry ``{"version", "saes": {name: one SAE's state}}``.
MULTI_STATE_VERSION = 1
#: Settings that describe the shared batch, so one SAE cannot change them.
SHARED_SETTINGS = ("tokens_key", "token_refs_key", "attention_mask_key")
SAEs = Union[Sequence[str], Mapping[str, Optional[Mapping[str, Any]]]]


@dataclass(frozen=True)
class SAESpec:
    """One SAE of a run: its name, where a hook finds it, and the settings it changes for itself."""

    name: str
    """Names its folder ``DIR/<name>/`` and its entries in checkpoints and logged metrics."""

    module: Optional[str] = None
    """The callback's hook route: the name (or fnmatch pattern matching one) of the SAE's module on the
    LightningModule, whose ``forward`` returns its latents."""

    logit_effects: Any = None
    """The callback's ``logit_effects`` for this SAE (a function of the LightningModule, or its import path)."""

    settings: dict[str, Any] = field(default_factory=dict)
    """Fields of the run's settings this SAE sets for itself (``num_latents``, ``max_samples_per_feature``, ...)."""


def sae_specs(saes: SAEs, config_type: type, owner: str, extras: tuple[str, ...] = ()) -> list[SAESpec]:
    """``saes`` (names, or name -> its own settings) as specs, checked.

    Args:
        saes: SAE names, or a mapping of each name to ``None`` or its settings: fields of ``config_type`` and the
            keys in ``extras`` (``module``, ``logit_effects``).
        config_type: The settings class whose fields an SAE may set.
        owner: Who takes them, for messages.
        extras: Non-setting keys allowed per SAE.

    Raises:
        ValueError: A name is invalid or repeated, or an SAE sets a shared setting.
        TypeError: An SAE sets something that is no setting (the message names the closest).
    """
    if isinstance(saes, str) or not isinstance(saes, (Sequence, Mapping)):
        raise ValueError(
            f"{owner}: `saes` must list the SAE names, or map each name to its own settings, e.g."
            " {'layer3': {'num_latents': 4096}, 'layer5': {}}; got " + repr(saes)
        )
    entries = saes.items() if isinstance(saes, Mapping) else ((name, None) for name in saes)
    specs = []
    for name, own in entries:
        own = dict(own or {})
        if not isinstance(own, dict):
            raise ValueError(f"{owner}: the settings of SAE {name!r} must be a mapping, got {type(own).__name__}.")
        shared = [key for key in SHARED_SETTINGS if key in own]
        if shared:
            raise ValueError(
                f"{owner}: SAE {name!r} sets {shared}, which the SAEs of a run share (one batch of tokens); set"
                " them once, for the run."
            )
        extra = {key: own.pop(key) for key in extras if key in own}
        config_type.check_names(own, f"{owner}'s SAE {name!r}")
        specs.append(SAESpec(name=name, settings=own, **extra))
    check_sae_names([spec.name for spec in specs])
    return specs


def sae_keys(name: str, keys: InputKeys = DEFAULT_KEYS) -> InputKeys:
    """How messages name SAE ``name``'s entries, with the run's token keys."""
    return dataclasses.replace(
        keys, latents=f"latents of SAE {name!r}", latent_indices=f"latent indices of SAE {name!r}",
        latent_values=f"latent values of SAE {name!r}",
    )


@dataclass
class SharedTokens:
    """A step's tokens (or refs) and mask, checked once for every SAE of the run."""

    tokens: Optional[Tensor] = None
    token_refs: Optional[Tensor] = None
    attention_mask: Optional[Tensor] = None

    @classmethod
    def check(cls, tokens: Any, token_refs: Any, attention_mask: Any, keys: InputKeys = DEFAULT_KEYS) -> SharedTokens:
        """Check the ids (their dtype, shape and range) and the mask once.

        Raises:
            LatentInputError: Naming the entry and a fix.
        """
        if token_refs is not None and tokens is None:
            return cls(token_refs=check_refs(token_refs, keys.token_refs), attention_mask=attention_mask)
        tokens = check_tokens(tokens, keys.tokens)
        mask = check_attention_mask(attention_mask, tokens, keys.attention_mask)
        check_token_ids(tokens, ~padding_positions(tokens, mask), keys.tokens)
        return cls(tokens=tokens, attention_mask=mask)

    def batch(self, dense: Any, indices: Any, values: Any, keys: InputKeys) -> LatentBatch:
        """One SAE's latents checked against these tokens (whose ids need no second check)."""
        if self.token_refs is not None:
            return check_rows(self.token_refs, dense, indices, values, self.attention_mask, keys)
        checked = check_latents(self.tokens, dense, indices, values, self.attention_mask, keys)
        checked.ids_checked = True
        return checked


class MultiSAECollector:
    r"""Exact top activating contexts of the latents of several SAEs trained together, for any training loop.

    Each named SAE has its own :class:`~lightning_sae_samples.ActivationSampleCollector`; a step's token ids
    (or refs) are checked once and shared. Feed each collected step with :meth:`update` (the latents of each
    SAE by name), or catch them by forward hooks with :meth:`capture`; :meth:`save` writes the run folder,
    ``DIR/<name>/`` per SAE plus the run index; keep :meth:`state_dict` in your checkpoint for an exact resume.
    Under ``torch.distributed`` every process feeds its own batches; ``state_dict`` and ``save`` are collectives.

    Args:
        saes: The SAE names, or a mapping of each name to the settings it sets for itself (fields of
            :class:`~lightning_sae_samples.CollectionConfig`, e.g. ``{"num_latents": 4096}`` for sparse latents).
            Names are 1-100 characters of letters, digits, ``.``, ``_``, ``-`` (``layers.3.mlp`` fits).
        config: The settings every SAE shares, as one :class:`~lightning_sae_samples.CollectionConfig`.
        merge_policy: See :class:`~lightning_sae_samples.ActivationSampleCollector`.
        token_source: Where shuffled rows' ``token_refs`` find their tokens (shared by the SAEs).
        process_local: Under ``torch.distributed``, each process holds other SAEs, which no other process
            collects (sparsify's ``distribute_modules``): each is merged with nothing, ``state_dict`` holds this
            process's SAEs, and ``save`` writes each SAE's folder from its process and, on rank 0, the run index
            naming the SAEs of every process.
        **settings: Fields of :class:`~lightning_sae_samples.CollectionConfig` every SAE shares.

    Example::

        >>> import torch
        >>> from lightning_sae_samples import MultiSAECollector
        >>> collector = MultiSAECollector({"l3": {}, "l5": {"num_latents": 32}}, context_size=4)
        >>> tokens = torch.randint(0, 100, (2, 8))
        >>> values, indices = torch.rand(2, 8, 32).topk(4)
        >>> collector.update(tokens, latents={"l3": torch.rand(2, 8, 16), "l5": (indices, values)}, step=0)
        >>> collector.collectors["l3"].num_latents, collector.collectors["l5"].num_latents
        (16, 32)
    """

    def __init__(
        self,
        saes: SAEs,
        *,
        config: Optional[CollectionConfig] = None,
        merge_policy: Optional[MergePolicy] = None,
        token_source: Optional[Union[TokenSource, str]] = None,
        process_local: bool = False,
        **settings: Any,
    ) -> None:
        owner = type(self).__name__
        if config is None:
            CollectionConfig.check_names(settings, owner)
            config = CollectionConfig(**settings)
        elif settings:
            raise TypeError(f"Pass {owner} either `config` or keyword settings, not both.")
        self.settings = config
        self.specs = sae_specs(saes, CollectionConfig, owner)
        self.token_source = load_token_source(token_source, owner)
        self.collectors: dict[str, ActivationSampleCollector] = {
            spec.name: ActivationSampleCollector(
                config=dataclasses.replace(config, **spec.settings), merge_policy=merge_policy,
                token_source=self.token_source,
            )
            for spec in self.specs
        }
        self.process_local = bool(process_local)
        for collector in self.collectors.values():
            collector.process_local = self.process_local
        self._capture: Optional[LatentCapture] = None
        self._lock: Optional[FileLock] = None

    @property
    def names(self) -> list[str]:
        """The SAE names, in the order given."""
        return list(self.collectors)

    def exclude_tokens(self, ids: Sequence[int]) -> None:
        """Also exclude these token ids from every SAE's collection (e.g. a tokenizer's ``all_special_ids``)."""
        for collector in self.collectors.values():
            collector.exclude_tokens(ids)

    # ------------------------------------------------------------------ collection
    def capture(self, modules: Mapping[str, nn.Module]) -> LatentCapture:
        """Forward hooks on each SAE's module (by SAE name), for ``with collector.capture(...): model(...)``.

        The hooks exist only inside the ``with`` block: open it on the steps you collect. The next
        :meth:`update` reads what each module returned (a dense tensor, an ``(indices, values)`` pair, sparsify's
        ``ForwardOutput``, ...; see :func:`~lightning_sae_samples.multi.capture.latents_of`); latents passed to
        ``update`` take precedence.

        Raises:
            ValueError: A name is not an SAE of this collector.
        """
        unknown = [name for name in modules if name not in self.collectors]
        if unknown:
            raise ValueError(f"capture: {unknown} are not SAEs of this collector ({self.names}).")
        self._capture = LatentCapture(modules)
        return self._capture

    def update(
        self,
        tokens: Optional[Tensor] = None,
        *,
        token_refs: Optional[Tensor] = None,
        latents: Optional[Mapping[str, Any]] = None,
        step: int,
        attention_mask: Optional[Tensor] = None,
    ) -> None:
        """Fold one batch of every SAE given into its collection.

        Args:
            tokens: Token ids ``[B, T]`` shared by the SAEs (negative ids are padding).
            token_refs: Or, for shuffled rows, each row's ref into ``token_source`` ``[N]``.
            latents: SAE name -> its latents: dense ``[B, T, F]`` / ``[B*T, F]`` (``[N, F]`` for rows), an
                ``(indices, values)`` pair, sparsify's ``ForwardOutput``, or a mapping with ``latents`` or
                ``latent_indices`` + ``latent_values``. SAEs left out (and not caught by :meth:`capture`) are not
                folded this step.
            step: The optimizer step (an integer >= 0); see :meth:`ActivationSampleCollector.update`.
            attention_mask: ``[B, T]`` (``[N]`` for rows), 0/False at padding.

        Raises:
            LatentInputError: Tokens or some SAE's latents are unusable (named); the SAEs are then left as they
                were, unless the engine refuses an SAE's sparse indices, which leaves the SAEs before it folded.
        """
        found = self._capture.take() if self._capture is not None else {}
        found.update(latents or {})
        unknown = [name for name in found if name not in self.collectors]
        if unknown:
            raise LatentInputError(f"`latents` names {unknown}, which are not SAEs of this collector ({self.names}).")
        if (tokens is None) == (token_refs is None):
            raise LatentInputError(
                "Pass exactly one of `tokens` [B, T] (sequences) or `token_refs` [N] (shuffled rows with a"
                " `token_source`)."
            )
        step = positive_int(step, "step", "Pass the optimizer step (0, 1, ...).", 0)
        shared = SharedTokens.check(tokens, token_refs, attention_mask)
        batches = {name: shared.batch(*latents_of(value, name), sae_keys(name)) for name, value in found.items()}
        for name, batch in batches.items():
            self.collectors[name].fold(batch, step, sae_keys(name))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Each SAE's :meth:`ActivationSampleCollector.state_dict`, by name (a collective under DDP)."""
        return {"version": MULTI_STATE_VERSION, "saes": {name: c.state_dict() for name, c in self.collectors.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every SAE from :meth:`state_dict` (on every process).

        Raises:
            ValueError: The checkpoint holds other SAEs than this collector, or an SAE cannot resume (named).
        """
        saved = state.get("saes") if isinstance(state, Mapping) else None
        if not isinstance(saved, Mapping) or set(saved) != set(self.collectors):
            names = sorted(saved) if isinstance(saved, Mapping) else None
            raise ValueError(
                f"Cannot resume: the checkpoint's {type(self).__name__} holds the SAEs {names}, this one {self.names}."
                " Resume with the same SAE names, or start a new collection without the checkpoint."
            )
        for name, collector in self.collectors.items():
            collector.load_state_dict(saved[name], owner=f"{type(self).__name__}'s SAE {name!r}")

    # ------------------------------------------------------------------ saving
    def save(
        self,
        dirpath: Union[str, Path],
        tokenizer: Any = None,
        *,
        global_step: Optional[int] = None,
        full_state: bool = True,
        decoders: Optional[Mapping[str, Tensor]] = None,
    ) -> dict[str, list[int]]:
        """Write the run folder: each SAE's samples directory ``dirpath/<name>/``, then the run index.

        A collective under ``torch.distributed``: every process calls it, rank 0 writes. The first save takes the
        run folder's lock (and each SAE folder's) and keeps them until :meth:`close`.

        Args:
            dirpath: The run folder (created if missing).
            tokenizer: A tokenizer object, a Hugging Face name or path (loaded once), or ``None`` for token ids.
            global_step: Recorded as the save's step (default: each SAE's last collected step).
            full_state: Also write each SAE's ``full_state.pt``.
            decoders: SAE name -> its decoder ``W_dec`` ``[F, d_model]`` (see :meth:`ActivationSampleCollector.save`).

        Returns:
            Each SAE's saved feature indices, best first (empty on other ranks).

        Raises:
            SamplesDirectoryError: Another writer holds the run folder, or it (or an SAE's folder) is not ours.
        """
        dirpath = Path(dirpath)
        spread = self.process_local and _distributed()
        run_names = _names_of_every_process(self.names) if spread else self.names
        if spread:
            _on_rank_zero_for_all(lambda: self._lock_run(dirpath, run_names))
        merged = {}
        for name, collector in self.collectors.items():
            state = collector.merged_state()
            if collector._rank() == 0:
                state = collector.with_windows(state)
            merged[name] = state
            step = global_step if global_step is not None else (
                int(state["last_collected_step"]) if state is not None else None)
            if step is None and collector.collector is not None:
                step = collector.collector.last_collected_step
            collector.reset_window(step)
        if next(iter(self.collectors.values()))._rank() != 0:
            return {}
        if not spread:
            self._lock_run(dirpath, run_names)
        tokenizer = load_tokenizer(tokenizer)
        described = describe_tokenizer(tokenizer)
        config_of = {name: {**c.config(), "tokenizer": described} for name, c in self.collectors.items()}
        saved = {}
        for name, collector in self.collectors.items():
            if merged[name] is not None:
                collector._lock_dirpath(dirpath / name)
            saved[name] = collector.write(
                dirpath / name, merged[name], tokenizer=tokenizer, config=config_of[name], global_step=global_step,
                full_state=full_state, decoder=(decoders or {}).get(name),
                owner=f"{type(self).__name__}'s SAE {name!r}",
            )
        if spread:
            # The index comes last, once every process has committed its SAEs' folders.
            _on_rank_zero_for_all(lambda: write_run_index(dirpath, run_names))
        else:
            write_run_index(dirpath, run_names)
        return saved

    def _lock_run(self, dirpath: Path, names: Sequence[str]) -> None:
        if self._lock is not None and Path(self._lock.lock_file).parent == dirpath:
            return
        self.close()
        self._lock = lock_run_dir(dirpath, names)

    def close(self) -> None:
        """Release the locks on the run folder and the SAEs' folders (saving again takes them again)."""
        lock, self._lock = self._lock, None
        for collector in self.collectors.values():
            collector.close()
        if lock is not None:
            lock.release()


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _names_of_every_process(names: list[str]) -> list[str]:
    """The SAE names of every process, in rank order (a collective); a name held twice is refused."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, names)
    every = [name for held in gathered for name in held]
    check_sae_names(every)
    return every


def _on_rank_zero_for_all(work: Any) -> None:
    """Run ``work`` on rank 0 after every process got here; every process raises what it raised (a collective)."""
    torch.distributed.barrier()
    failure: Optional[Exception] = None
    if torch.distributed.get_rank() == 0:
        try:
            work()
        except Exception as err:  # noqa: BLE001 - every process must hear of it, or the others wait forever
            failure = err
    said = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    torch.distributed.broadcast_object_list(said, src=0)
    if failure is not None:
        raise failure
    if said[0] is not None:
        raise RuntimeError(f"Rank 0 could not write the run folder: {said[0]}")


def load_trainer_state_file(collector: MultiSAECollector, file: Path, counter: str) -> int:
    """Load a trainer integration's state file (``version``, a step ``counter``, ``collector``) into ``collector``.

    The file is untrusted input: it is loaded tensors-only, and each SAE's state is checked before any is loaded.

    Returns:
        The file's ``counter`` (the trainer's steps or batches when it was written).

    Raises:
        ValueError: The file cannot be read, is not a state a multi-SAE integration wrote, or holds other SAEs (the
            message names the file, the field and the SAE).
    """
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{file} cannot be read as a collector state: {err}") from None
    if not isinstance(state, dict) or state.get("version") != MULTI_STATE_VERSION:
        raise ValueError(f"{file}: `version` must be {MULTI_STATE_VERSION}; it is not a state this class wrote.")
    count = state.get(counter)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{file}: `{counter}` must be an integer >= 0, found {count!r}.")
    collected = state.get("collector")
    saes = collected.get("saes") if isinstance(collected, dict) else None
    try:
        for name, entry in (saes if isinstance(saes, dict) else {}).items():
            if isinstance(entry, dict) and entry.get("collector") is not None:
                try:
                    check_state(entry["collector"])
                except ValueError as err:
                    raise ValueError(f"SAE {name!r}: {err}") from None
        collector.load_state_dict(collected if isinstance(collected, dict) else {})
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    return count
