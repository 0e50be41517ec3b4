"""ActivationSampleCollector: the sample collection of the callback, for any training loop.

Feed it each collected step's token ids and SAE latents with :meth:`~ActivationSampleCollector.update`,
call :meth:`~ActivationSampleCollector.save` to write the samples directory, and keep
:meth:`~ActivationSampleCollector.state_dict` in your checkpoints for an exact resume. Under
``torch.distributed`` every process feeds its own batches; ``state_dict`` and ``save`` merge all of them
exactly (both are collectives: call them on every process).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from filelock import FileLock
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sae_samples._moved import forwarder, homes_of
from lightning_sae_samples.analysis.reports import write_report
from lightning_sae_samples.arguments import (
    positive_int,
    token_ids,
)
from lightning_sae_samples.config import CollectionConfig
from lightning_sae_samples.engine.distributed import gather_merged_state
from lightning_sae_samples.engine.memory import estimate_state_bytes
from lightning_sae_samples.engine.rows import TokenWindows
from lightning_sae_samples.engine.sample_collector import RANK_SHIFT, SampleCollector
from lightning_sae_samples.engine.sample_table import MergePolicy
from lightning_sae_samples.engine.windows import padding_positions
from lightning_sae_samples.health import DEFAULT_DEAD_WINDOW_STEPS
from lightning_sae_samples.inputs import (
    DEFAULT_KEYS,
    InputKeys,
    LatentBatch,
    LatentInputError,
    check_distinct_indices,
    check_indices_in_range,
    check_latents,
    check_rows,
    check_token_ids,
    local_batch,
)
from lightning_sae_samples.memory import available_memory_bytes
from lightning_sae_samples.samples_dir.commit import claim_samples_dir, hold_lock
from lightning_sae_samples.samples_dir.decoder import unit_directions
from lightning_sae_samples.samples_dir.history_file import (
    check_history,
    history_of_latents,
    join_histories,
)
from lightning_sae_samples.samples_dir.names import REPORT_NAME
from lightning_sae_samples.samples_dir.shards import ShardPart, write_sharded_samples_dir
from lightning_sae_samples.samples_dir.writer import SaveOptions, write_samples_dir
from lightning_sae_samples.sharding import GroupGather, ShardLayout, Shards, join_shards, merge_replicas
from lightning_sae_samples.state.schema import TOKEN_SOURCE_KEY, keeps_refs
from lightning_sae_samples.state.slices import slice_state
from lightning_sae_samples.state.tables import kept_per_latent
from lightning_sae_samples.token_sources import (
    TokenSource,
    check_same_source,
    load_token_source,
    row_windows_for,
    with_windows,
)
from lightning_sae_samples.tokens import describe_tokenizer, load_tokenizer

STATE_VERSION = 1
# Which argument bounds each kind of sample table, for the out-of-memory message.
_TABLE_ARGUMENT = {
    "top": "max_samples_per_feature", "interval": "samples_per_interval", "recent": "recent_samples_per_feature",
    "window": "history_samples_per_feature",
}
PathLike = Union[str, Path]
Gather = Callable[[SampleCollector], Optional[dict]]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class ActivationSampleCollector:
    r"""Exact top activating contexts and streaming statistics of every SAE latent, for any training loop.

    The engine of :class:`~lightning_sae_samples.ActivationSampleCallback`, without Lightning: call
    :meth:`update` on the steps you want collected (it costs nothing on the others, since you do not call
    it), :meth:`save` to write the samples directory (``docs/format.md``) that the analyzer, the reports
    and ``lightning-sae-samples`` read, and keep :meth:`state_dict` in your checkpoint.

    Args:
        num_latents: Latent count ``F``; required for sparse latents, inferred from dense ones.
        config: The settings as one :class:`~lightning_sae_samples.CollectionConfig` (instead of keywords).
        merge_policy: When the engine's sample tables merge what they staged (tuning and tests; the kept
            samples never depend on it).
        token_source: Where shuffled rows' ``token_refs`` find their tokens (an
            :class:`~lightning_sae_samples.token_sources.ArrayTokenSource` or
            :class:`~lightning_sae_samples.token_sources.TokenRing`, or an import path to one); see ``docs/rows.md``.
            With an array source the kept samples hold their refs, not their windows (``row_windows``).
        shard_layout: Under tensor parallelism: this process's range of the latents and its data-parallel replica
            group (:class:`~lightning_sae_samples.sharding.ShardLayout`). Each process then collects only its own
            latents, dense ``[..., local]`` or sparse with global ids; not needed when the latents are a ``DTensor``
            sharded on the latent dimension. ``num_latents`` is the SAE's whole ``F``.
        replica_group: For latents that come as a ``DTensor``: the process group of the processes that hold the
            same shard for other tokens (data parallel); ``None``: no other process holds it.
        **settings: Any field of :class:`~lightning_sae_samples.CollectionConfig` (``max_samples_per_feature``,
            ``context_size``, ``activation_threshold``, ...), with its default and checks.

    Raises:
        ValueError: If an argument is out of range; the message names the argument and a fix.

    Example::

        >>> import torch
        >>> from lightning_sae_samples import ActivationSampleCollector
        >>> collector = ActivationSampleCollector(context_size=4)
        >>> tokens = torch.randint(0, 100, (2, 8))
        >>> collector.update(tokens, latents=torch.rand(2, 8, 16), step=0)
        >>> collector.num_latents
        16
    """

    def __init__(
        self,
        num_latents: Optional[int] = None,
        *,
        config: Optional[CollectionConfig] = None,
        merge_policy: Optional[MergePolicy] = None,
        token_source: Optional[Union[TokenSource, str]] = None,
        shard_layout: Optional[ShardLayout] = None,
        replica_group: Any = None,
        **settings: Any,
    ) -> None:
        if config is None:
            CollectionConfig.check_names(settings, type(self).__name__)
            config = CollectionConfig(num_latents=num_latents, **settings)
        elif settings or num_latents is not None:
            raise TypeError(f"Pass {type(self).__name__} either `config` or keyword settings, not both.")
        self.settings = config
        self.merge_policy = merge_policy or MergePolicy()
        self.token_source = load_token_source(token_source, type(self).__name__)
        row_windows_for(config.row_windows, self.token_source, type(self).__name__)  # refuses refs with a ring
        if shard_layout is not None and not isinstance(shard_layout, ShardLayout):
            raise ValueError(f"`shard_layout` must be a ShardLayout or None, got {type(shard_layout).__name__}.")
        #: This process's shard of the latents (``None``: all of them), given or told by a ``DTensor`` of latents.
        self.shard_layout = shard_layout
        self.replica_group = replica_group
        #: The shards' ``(start, stop)`` latent ranges at the last merge (``None``: not sharded); saves write the
        #: full state in these parts.
        self.shard_ranges: Optional[list[tuple[int, int]]] = None
        self.collector: Optional[SampleCollector] = None
        self.rank: Optional[int] = None
        #: Whether this process alone collects this SAE (sparsify's ``distribute_modules``): it then merges with no
        #: other process, keeps what it restores, and writes its own samples directory, as a single process does.
        self.process_local = False
        self._pending_state: Optional[dict] = None
        #: Of a restored state holding only some latents (the parts of a checkpoint around this shard): the global id
        #: of its first latent and the SAE's latent count; ``None`` when it holds them all.
        self._pending_span: Optional[tuple[int, int]] = None
        self._excluded: Optional[Tensor] = None
        self._offset_step = -1
        self._token_offset = 0
        self._warned_nonfinite = 0
        self._lock: Optional[FileLock] = None
        #: ``training_history.pt`` as the last save committed it, or as a checkpoint carried it: the next save
        #: appends to it (whatever ``dirpath`` holds), and :meth:`state_dict` carries it.
        self._history: Optional[dict] = None
        #: Whether ``_history`` is this shard's part (a sharded save's root), not the whole history.
        self._history_is_part = False

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        """The settings recorded in the summary and checkpoints, as JSON-friendly values."""
        return self.settings.summary()

    def exclude_tokens(self, ids: Sequence[int]) -> None:
        """Also exclude these token ids from collection (e.g. a tokenizer's ``all_special_ids``)."""
        self.settings.exclude_token_ids = token_ids((*self.settings.exclude_token_ids, *ids), "exclude_token_ids")
        self._excluded = None

    def _rank(self) -> int:
        if self.rank is None:
            self.rank = torch.distributed.get_rank() if _distributed() and not self.process_local else 0
        return self.rank

    def _order_rank(self) -> int:
        """The rank in token order keys and resumes: among the replicas of this process's shard, when sharded."""
        return self.shard_layout.replica_rank() if self.shard_layout is not None else self._rank()

    def _shard_of(self, batch: LatentBatch, keys: InputKeys) -> Optional[ShardLayout]:
        """This process's shard for ``batch``: the given layout, or the one its ``DTensor`` tells (then kept)."""
        told = batch.shard
        if told is None:
            return self.shard_layout
        if self.shard_layout is None:
            if self.collector is not None:  # a restored state not yet placed is cut to the shard when it is
                raise LatentInputError(
                    f"`{keys.latents}` came as a shard of the latents ({told.offset} to {told.stop - 1} of"
                    f" {told.total}) to a collection that began with all of them on this process. Give the collection"
                    " its `shard_layout` from the start (the callback: `num_latents`), or return the latents in one"
                    " form."
                )
            self.shard_layout = dataclasses.replace(told, replica_group=self.replica_group)
        elif not self.shard_layout.same_range(told):
            layout = self.shard_layout
            raise LatentInputError(
                f"`{keys.latents}` is a DTensor holding latents {told.offset} to {told.stop - 1} of {told.total} here,"
                f" and this process's shard_layout says {layout.offset} to {layout.stop - 1} of {layout.total}."
                " Pass the layout the latents have, or none with a DTensor."
            )
        return self.shard_layout

    # ------------------------------------------------------------------ collection
    def update(
        self,
        tokens: Optional[Tensor] = None,
        *,
        token_refs: Optional[Tensor] = None,
        latents: Optional[Tensor] = None,
        latent_indices: Optional[Tensor] = None,
        latent_values: Optional[Tensor] = None,
        step: int,
        attention_mask: Optional[Tensor] = None,
    ) -> None:
        """Fold one batch into the collection.

        Several calls with the same ``step`` are micro-batches of one optimizer step; steps must not go back.

        Args:
            tokens: Token ids ``[B, T]``. Negative ids are padding.
            token_refs: Or, for shuffled rows, where each row's token stands in ``token_source`` ``[N]``
                (int64); the latents are then rows ``[N, F]`` or ``[N, k]``, and ``attention_mask`` ``[N]``.
            latents: Dense latents ``[B, T, F]`` or ``[B*T, F]``.
            latent_indices: Or sparse (TopK) active latent indices ``[B, T, k]`` or ``[B*T, k]``, distinct per
                token; needs ``num_latents``.
            latent_values: Their activations, same shape.
            step: The optimizer step (an integer >= 0).
            attention_mask: ``[B, T]``, 0/False at padding: padding is not collected, not counted in
                ``tokens_seen``, and context windows stop at it as at a sequence edge.

        Raises:
            LatentInputError: The inputs have wrong shapes or dtypes, a sparse index is out of range or
                repeated within one token, a token id does not fit the stored int32, or a token ref is out of
                its source's range; nothing is folded then.
        """
        if (tokens is None) == (token_refs is None):
            raise LatentInputError(
                "Pass exactly one of `tokens` [B, T] (sequences) or `token_refs` [N] (shuffled rows with a"
                " `token_source`)."
            )
        if token_refs is not None:
            batch = check_rows(token_refs, latents, latent_indices, latent_values, attention_mask, DEFAULT_KEYS)
        else:
            batch = check_latents(tokens, latents, latent_indices, latent_values, attention_mask, DEFAULT_KEYS)
        step = positive_int(step, "step", "Pass the optimizer step (0, 1, ...).", 0)
        self.fold(batch, step)

    def fold(self, batch: LatentBatch, step: int, keys: InputKeys = DEFAULT_KEYS) -> None:
        """Fold an already checked batch (see :func:`~lightning_sae_samples.inputs.check_latents`)."""
        if batch.token_refs is not None:
            self._fold_rows(batch, step, keys)
            return
        if batch.tokens.numel() == 0:
            return
        if self._keeps_refs():
            raise LatentInputError(
                f"`{keys.tokens}` [B, T] came to a collection of shuffled rows that keeps their token refs"
                " (row_windows='refs' or 'auto' with an ArrayTokenSource), and a sequence has none. Collect rows"
                " only, or set row_windows='tokens'."
            )
        source = batch.dense if batch.dense is not None else batch.values
        device = source.device
        tokens = batch.tokens.to(device)
        mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
        real = ~padding_positions(tokens, mask)
        if not batch.ids_checked:
            check_token_ids(tokens, real, keys.tokens)
        layout = self._shard_of(batch, keys)
        num_latents = self._num_latents_of(batch, keys, layout)
        if batch.indices is not None:
            check_indices_in_range(batch.indices, num_latents, keys.latent_indices, real, batch.values)
            check_distinct_indices(batch.indices, real, keys.latent_indices)
        if layout is not None:
            batch = local_batch(batch, layout, keys.latents)
        collector = self._collector_for(num_latents, device, layout=layout)
        if collector.last_collected_step > step:
            raise LatentInputError(
                f"`step` went back from {collector.last_collected_step} to {step}. Pass the optimizer step, which"
                " never decreases; calls with the same step are micro-batches of that step."
            )
        # Micro-batches of one step (gradient accumulation, evaluation batches) may have any sequence lengths:
        # each token's order key is its offset among all tokens folded at this step, which stays exact.
        if step != self._offset_step:
            self._offset_step, self._token_offset = step, 0
        order_base = (self._order_rank() << RANK_SHIFT) + self._token_offset
        self._token_offset += tokens.numel()
        excluded = self._excluded_positions(tokens)
        if batch.dense is not None:
            collector.update_dense(tokens, batch.dense, step, order_base, attention_mask=mask, excluded=excluded)
        else:
            collector.update_sparse(
                tokens, batch.indices, batch.values, step, order_base, attention_mask=mask, excluded=excluded
            )

    def _fold_rows(self, batch: LatentBatch, step: int, keys: InputKeys) -> None:
        refs = batch.token_refs
        assert refs is not None
        if not len(refs):
            return
        if self.token_source is None:
            raise LatentInputError(
                f"`{keys.token_refs}` point into a token source, and none was given: pass `token_source=` (an"
                " ArrayTokenSource over the pretokenized data, or a TokenRing fed each token batch); see docs/rows.md."
            )
        source = batch.dense if batch.dense is not None else batch.values
        device = source.device
        # Every check comes before anything changes: a bad ref leaves the collection as it was.
        windows = self.token_source.windows(refs, self.settings.half_window, keys.token_refs).to(device)
        if batch.attention_mask is not None:
            mask = batch.attention_mask.to(device)
            windows = TokenWindows(torch.where(mask.unsqueeze(1), windows.tokens, -1), windows.position,
                                   windows.sequence)
        real = windows.tokens[:, self.settings.half_window] >= 0
        check_token_ids(windows.tokens, windows.tokens >= 0, f"the token source of `{keys.token_refs}`")
        layout = self._shard_of(batch, keys)
        num_latents = self._num_latents_of(batch, keys, layout)
        if batch.indices is not None:
            check_indices_in_range(batch.indices, num_latents, keys.latent_indices, real, batch.values)
            check_distinct_indices(batch.indices.unsqueeze(0), real.unsqueeze(0), keys.latent_indices)
        if layout is not None:
            batch = local_batch(batch, layout, keys.latents)
        if self.collector is not None and self.collector.last_collected_step > step:
            self._check_step(self.collector.last_collected_step, step)
        order = refs.to(device)
        if not getattr(self.token_source, "global_refs", True):
            if int(refs.max()) >= 1 << RANK_SHIFT:
                raise LatentInputError(
                    f"`{keys.token_refs}` reached {int(refs.max())}, beyond the 2**{RANK_SHIFT} refs a per-process"
                    " source can order; start a new TokenRing (and collection) for this run."
                )
            order = order + (self._order_rank() << RANK_SHIFT)
        collector = self._collector_for(num_latents, device, rows=True, layout=layout)
        self._check_step(collector.last_collected_step, step)
        excluded = self._excluded_positions(windows.tokens[:, self.settings.half_window])
        refs = refs.to(device) if collector.keeps_refs else None
        if batch.dense is not None:
            collector.update_rows_dense(windows, batch.dense, step, order, excluded, refs)
        else:
            collector.update_rows_sparse(windows, batch.indices, batch.values, step, order, excluded, refs)

    def _keeps_refs(self) -> bool:
        """Whether this collection's kept samples hold token refs (or will, once created)."""
        if self.collector is not None:
            return self.collector.keeps_refs
        if self._pending_state is not None:
            return keeps_refs(self._pending_state)
        return self.settings.row_windows == "refs"

    @staticmethod
    def _check_step(last: int, step: int) -> None:
        if last > step:
            raise LatentInputError(
                f"`step` went back from {last} to {step}. Pass the optimizer step, which"
                " never decreases; calls with the same step are micro-batches of that step."
            )

    def _excluded_positions(self, tokens: Tensor) -> Optional[Tensor]:
        if not self.settings.exclude_token_ids:
            return None
        if self._excluded is None or self._excluded.device != tokens.device:
            self._excluded = torch.tensor(self.settings.exclude_token_ids, dtype=tokens.dtype, device=tokens.device)
        return torch.isin(tokens, self._excluded.to(tokens.dtype))

    def _num_latents_of(self, batch: LatentBatch, keys: InputKeys, layout: Optional[ShardLayout] = None) -> int:
        """The SAE's latent count ``F`` (all shards')."""
        if layout is not None:
            if self.settings.num_latents is not None and self.settings.num_latents != layout.total:
                raise LatentInputError(
                    f"This process's shard is of an SAE of {layout.total} latents, and `num_latents` is"
                    f" {self.settings.num_latents}. Pass the whole SAE's latent count as `num_latents`."
                )
            return layout.total
        if batch.dense is not None:
            found = batch.dense.shape[-1]
            if self.collector is None and self.settings.num_latents is not None and found != self.settings.num_latents:
                raise LatentInputError(
                    f"`{keys.latents}` has {found} latents but `num_latents` is {self.settings.num_latents}. Pass the"
                    " SAE's latent count as `num_latents`, or leave it out for dense latents. If each process holds"
                    " a shard of the latents (tensor parallelism), return them as a DTensor sharded on the latent"
                    " dimension or give the collection its `shard_layout`."
                )
            return found
        if self.settings.num_latents is not None:
            return self.settings.num_latents
        if self.collector is not None:
            return self.collector.config.num_latents
        if self._pending_state is not None:
            return self._pending_total()
        raise LatentInputError(
            "Sparse latents do not tell the latent count: pass `num_latents=F` (the SAE's latent count)."
        )

    def _collector_for(
        self, num_latents: int, device: torch.device, rows: bool = False, layout: Optional[ShardLayout] = None
    ) -> SampleCollector:
        """The engine, created on the first batch; ``num_latents`` is the SAE's, the engine holds its shard's."""
        collector = self.collector
        if collector is not None:
            if collector.config.num_latents != (layout.local if layout is not None else num_latents):
                raise LatentInputError(
                    f"The latent count changed from {collector.config.num_latents} to {num_latents} between"
                    " steps. Return latents of the same SAE at every step."
                )
            return collector
        if self._pending_state is not None:
            saved = self._pending_total()
            if saved != num_latents:
                raise ValueError(
                    f"Cannot resume: the checkpoint collected {saved} latents but this run's latents have"
                    f" {num_latents}. Resume the same SAE, or start a new collection without the checkpoint."
                )
        self.collector = self._materialize(num_latents, self.settings.device or device, rows)
        return self.collector

    def engine_config(self, num_latents: int, rows: bool = False) -> CollectionConfig:
        """The settings with ``num_latents`` set, as the tensor engine takes them.

        ``row_windows`` is decided: ``"refs"`` for a collection of shuffled ``rows`` whose token source keeps its
        refs for good (or when asked for), ``"tokens"`` otherwise.
        """
        mode = row_windows_for(self.settings.row_windows, self.token_source, type(self).__name__)
        if not rows and self.settings.row_windows == "auto":
            mode = "tokens"
        return dataclasses.replace(self.settings, num_latents=num_latents, row_windows=mode)

    def check_memory(
        self, num_latents: int, device: Union[torch.device, str], owner: str = "", rows: bool = False
    ) -> None:
        """Refuse a state whose up-front part cannot fit ``device``, before allocating it.

        Raises:
            ValueError: Naming the bytes needed and available, and the argument to lower.
        """
        need = estimate_state_bytes(self.engine_config(num_latents, rows), stored_samples=0)
        device = self.settings.device or device
        available = available_memory_bytes(device)
        if available is None or need["total"] <= available:
            return
        argument = _TABLE_ARGUMENT[max(_TABLE_ARGUMENT, key=lambda kind: need.get(kind, 0))]
        raise ValueError(
            f"{owner or type(self).__name__}'s state for {num_latents} latents needs {need['total']:,} bytes up"
            f" front on {device}, which has {available:,} bytes available. Lower `{argument}` (now"
            f" {getattr(self.settings, argument)}), or collect on a device with more memory."
        )

    def _materialize(self, num_latents: int, device: torch.device, rows: bool = False) -> SampleCollector:
        owner = type(self).__name__
        if self._pending_state is not None:
            self._check_resumed_windows(self._pending_state)
        pending, self._pending_state = self._pending_state, None
        first, _ = self._pending_span or (0, 0)
        self._pending_span = None
        if self.settings.num_latents is None:
            self.settings.num_latents = num_latents
        layout = self.shard_layout
        if layout is not None:
            num_latents = layout.local
            pending = None if pending is None else slice_state(pending, layout.offset - first, layout.stop - first)
        if pending is None:
            self.check_memory(num_latents, device, rows=rows)
            created = SampleCollector(self.engine_config(num_latents, rows), device, policy=self.merge_policy)
            if created.keeps_refs:
                if self.token_source is None:
                    raise ValueError(f"{owner}: row_windows='refs' keeps token refs, and no token_source was given.")
                created.token_source = self.token_source.description()
            return created
        restored = SampleCollector.from_state_dict(pending, device, self.merge_policy)
        # Every process loads the same merged checkpoint; keeping it on one process (of those holding the shard) only
        # makes the next merge count each sample once.
        return restored if self._order_rank() == 0 else restored.empty_like()

    def _check_resumed_windows(self, state: dict, owner: Optional[str] = None) -> None:
        """Refuse a restored collection whose kind of windows (or whose token source) this one cannot go on with."""
        owner = owner or type(self).__name__
        refs = keeps_refs(state)
        setting = self.settings.row_windows
        if setting != "auto" and (setting == "refs") != refs:
            kept = "their token refs (row_windows='refs')" if refs else "their windows (row_windows='tokens')"
            raise ValueError(
                f"Cannot resume: the checkpoint's collection keeps {kept}, this {owner} has row_windows="
                f"{setting!r}. Pass row_windows={'refs' if refs else 'tokens'!r} (or 'auto') to continue it, or"
                " start a new collection without the checkpoint's collection."
            )
        if refs and self.token_source is not None:
            check_same_source(state.get(TOKEN_SOURCE_KEY), self.token_source, f"Cannot resume: {owner}")

    def with_windows(self, state: Optional[dict]) -> Optional[dict]:
        """A state (e.g. :meth:`merged_state`'s) with its kept samples' windows read from the token source.

        A collection of shuffled rows from an array source keeps each sample's token ref, not its window
        (``row_windows``); this gives the form every reader takes, the same windows a collection keeping them
        holds. A state keeping windows is returned as it is.

        Raises:
            ValueError: The token source is missing or not the one the refs point into.
        """
        return with_windows(state, self.token_source, type(self).__name__)

    # ------------------------------------------------------------------ state
    def merged_state(self, device: Optional[torch.device] = None, gather: Optional[Gather] = None) -> Optional[dict]:
        """The collection of all processes merged exactly (collective under ``torch.distributed``).

        Args:
            device: Where to rebuild a restored state that no :meth:`update` has placed yet (default: CPU).
            gather: Merges this process's collector with the others' and returns the result on rank 0;
                default: over ``torch.distributed``'s default group when its world size is above 1.

        Returns:
            The merged CPU state on rank 0 (``None`` elsewhere), or ``None`` if nothing was collected.
        """
        self._place_pending(device)
        if _distributed() and torch.distributed.get_world_size() > 1 and not self.process_local:
            shards = self._exchange()
            if shards is None:
                return None
            if shards.sharded:
                return join_shards(self.shard_layout, self._merge_replicas(shards).state)
            if gather is None:
                return gather_merged_state(self.collector, GroupGather(), is_root=self._rank() == 0)
        if self.collector is None:
            return None
        if gather is not None:
            return gather(self.collector)
        return self.collector.state_dict()

    @property
    def sharded(self) -> bool:
        """Whether this collection is a shard of the latents among processes: its saves are sharded saves."""
        return (self.shard_layout is not None and _distributed() and torch.distributed.get_world_size() > 1
                and not self.process_local)

    def merged_shard(self, device: Optional[torch.device] = None) -> Optional[ShardPart]:
        """This process's shard merged over its replicas, on the shard's root (a collective; see :attr:`sharded`).

        Nothing is gathered across shards: this is what a sharded save writes from. ``None`` when nothing was
        collected on any process.
        """
        self._place_pending(device)
        shards = self._exchange()
        return None if shards is None else self._merge_replicas(shards)

    def _place_pending(self, device: Optional[torch.device]) -> None:
        if self.collector is None and self._pending_state is not None:
            where = self.settings.device or device or torch.device("cpu")
            self.collector = self._materialize(self._pending_total(), where)

    def _exchange(self) -> Optional[Shards]:
        """Every process's part in a merge (a collective); ``None`` when no process has collected anything."""
        shards = Shards.exchange(self.shard_layout, self.collector is not None)
        if not any(shards.collecting):
            return None
        self._check_all_collect(shards.collecting)
        if shards.sharded:
            self.shard_ranges = [(offset, offset + local) for offset, local, _ in shards.ranges()]
        return shards

    def _merge_replicas(self, shards: Shards) -> ShardPart:
        assert self.shard_layout is not None and self.shard_ranges is not None
        merged = merge_replicas(self.collector, self.shard_layout, shards, gather_merged_state)
        return ShardPart(merged, self.shard_layout.offset, self.shard_ranges)

    @staticmethod
    def _check_all_collect(collecting: list[bool]) -> None:
        if not all(collecting):
            idle = [rank for rank, busy in enumerate(collecting) if not busy]
            raise RuntimeError(
                f"ActivationSampleCollector: rank(s) {idle} have not called `update` yet while others have;"
                " every process must collect at least one batch before `state_dict` or `save`."
            )

    def reset_window(self, step: Optional[int]) -> None:
        """Start a new history window at ``step`` (after a save wrote the current one); on every process."""
        if self.collector is not None and step is not None:
            self.collector.reset_window(int(step))

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs: the configuration and the merged collection.

        A collective under ``torch.distributed`` (every process calls it); the collection is held by rank 0's
        result only (``None`` elsewhere), and :meth:`load_state_dict` on every process restores it exactly.
        """
        return {"version": STATE_VERSION, "config": self.config(), "collector": self.merged_state(),
                "history": self.whole_history()}

    @property
    def history(self) -> Optional[dict]:
        """The history (``training_history.pt``'s payload) the last save committed, which a checkpoint carries.

        After a sharded save, each shard's root holds its own part (see :meth:`whole_history`).
        """
        return self._history

    def shard_history(self) -> Optional[dict]:
        """This process's shard's part of the history: a root's after a sharded save, else cut from the whole."""
        if self._history is None or self._history_is_part or self.shard_layout is None:
            return self._history
        return history_of_latents(self._history, self.shard_layout.offset, self.shard_layout.stop)

    def whole_history(self) -> Optional[dict]:
        """The whole history on global rank 0 (``None`` elsewhere when sharded): the shards' parts joined.

        A collective for a sharded collection: only what needs it whole (a checkpoint Lightning keeps on rank 0).
        """
        if not self.sharded:
            return self._history
        assert self.shard_layout is not None
        mine = (self.shard_layout.offset, self._history) if self._history_is_part else None
        rank = torch.distributed.get_rank()
        parts: Optional[list] = [None] * torch.distributed.get_world_size() if rank == 0 else None
        torch.distributed.gather_object(mine, parts, dst=0)
        if parts is None:
            return None
        parts = sorted((p for p in parts if p is not None), key=lambda p: p[0])
        if not parts:
            return self._history
        return join_histories([history for _, history in parts], "the shards' histories")

    @property
    def has_collection(self) -> bool:
        """Whether there is anything to save: collected batches or a restored state."""
        return self.collector is not None or self._pending_state is not None

    def _pending_total(self) -> int:
        """The latent count ``F`` of the restored state not yet placed."""
        assert self._pending_state is not None
        return self._pending_span[1] if self._pending_span is not None else int(self._pending_state["num_latents"])

    def load_state_dict(
        self, state: dict[str, Any], owner: str = "ActivationSampleCollector", span: Optional[tuple[int, int]] = None
    ) -> None:
        """Restore a collection from :meth:`state_dict` (on every process); the next update continues it exactly.

        Args:
            state: What :meth:`state_dict` returned.
            owner: Who restores, in messages.
            span: ``(first latent, F)`` when ``state["collector"]`` holds only the latents from ``first latent`` on
                (consecutive shards of a checkpoint), which must cover this process's ``shard_layout``.

        Raises:
            ValueError: The checkpoint was made with other sizes (named in the message), latent count or
                ``activation_threshold``.
        """
        mismatch = self.settings.resume_mismatch(state.get("config", {}))
        if mismatch is not None:
            name, saved, current = mismatch
            raise ValueError(
                f"Cannot resume: the checkpoint's {owner} has {name}={saved}, this one has {name}={current}."
                " Use the same value, or start a new collection without the checkpoint."
            )
        collected = state.get("collector")
        if collected is not None:
            self._check_resumed_windows(collected, owner)
        expected = self.settings.num_latents
        total = span[1] if span is not None else None if collected is None else int(collected["num_latents"])
        if collected is not None and expected is not None and total != expected:
            raise ValueError(
                f"Cannot resume: the checkpoint collected {total} latents, this {owner} has"
                f" num_latents={self.settings.num_latents}. Resume the same SAE or start a new collection."
            )
        layout = self.shard_layout
        if span is not None and collected is not None and (layout is None or not (
                span[0] <= layout.offset and layout.stop <= span[0] + int(collected["num_latents"]))):
            raise ValueError(
                f"Cannot resume: the restored latents {span[0]} to {span[0] + int(collected['num_latents']) - 1} do"
                f" not cover this process's shard ({'none' if layout is None else (layout.offset, layout.stop)})."
            )
        # The threshold is checked against the collection itself (what its counts were made with), not the config
        # block: a checkpoint that holds no collection yet resumes at the new threshold, since nothing was counted.
        if collected is not None and float(collected["threshold"]) != self.settings.activation_threshold:
            saved, current = float(collected["threshold"]), self.settings.activation_threshold
            raise ValueError(
                f"Cannot resume: the checkpoint's collection was made with activation_threshold={saved}, this"
                f" {owner} has activation_threshold={current}. Its counts, statistics and samples hold only"
                f" activations above {saved}, so it cannot go on at {current}. Pass"
                f" activation_threshold={saved} to continue it, or start a new collection at {current}"
                " without the checkpoint's collection."
            )
        self._pending_state = collected
        self._pending_span = None if collected is None else span
        self.collector = None
        self._offset_step, self._token_offset = -1, 0
        self._history = self._resumed_history(state.get("history"), owner)
        self._history_is_part = False

    @staticmethod
    def _resumed_history(history: Any, owner: str) -> Optional[dict]:
        """A checkpoint's history, checked (``None``: it has none, as older versions' checkpoints)."""
        if history is None:
            return None
        try:
            check_history(history)
        except ValueError as err:
            raise ValueError(f"Cannot resume: the checkpoint's {owner} history is not usable: {err}.") from None
        return history

    # ------------------------------------------------------------------ saving
    def save(
        self,
        dirpath: PathLike,
        tokenizer: Any = None,
        *,
        global_step: Optional[int] = None,
        full_state: bool = True,
        decoder: Optional[torch.Tensor] = None,
    ) -> list[int]:
        """Write the samples directory (and the Markdown report unless ``write_report=False``).

        A collective under ``torch.distributed``: every process calls it, rank 0 writes.

        Args:
            dirpath: The samples directory (created if missing; replaced atomically).
            tokenizer: A tokenizer object, a Hugging Face name or path, or ``None`` to show token ids.
            global_step: Recorded as the save's step (default: the last collected step).
            full_state: Also write ``full_state.pt`` (every latent's samples); a save without it removes the
                previous one, which would be older than the summary.
            decoder: The SAE's decoder ``W_dec`` ``[F, d_model]``: saved as ``decoder_directions.pt`` (unit rows,
                bfloat16) so that reports and ``serve`` list each latent's neighbours; a save without it removes
                the previous one.

        Returns:
            The saved feature indices, best first (empty on other ranks or when nothing was collected).

        Raises:
            SamplesDirectoryError: Another process (or collector) holds the directory's lock: the first save takes
                it and keeps it until :meth:`close`, as the callback holds it for its run. Or the directory is
                not ours to write.
        """
        if self.sharded:
            return self._save_shards(Path(dirpath), tokenizer, global_step, full_state, decoder)
        merged = self.merged_state()
        if self._rank() == 0:
            merged = self.with_windows(merged)  # before the window resets: a missing source changes nothing
        local = self.collector
        step = global_step if global_step is not None else (
            int(merged["last_collected_step"]) if merged is not None else None)
        if step is None and local is not None:
            step = local.last_collected_step  # other ranks: the merged window start is the largest
        self.reset_window(step)
        if self._rank() != 0:
            return []
        if merged is not None:
            self._lock_dirpath(Path(dirpath))
        tokenizer = load_tokenizer(tokenizer)
        return self.write(
            dirpath,
            merged,
            tokenizer=tokenizer,
            config={**self.config(), "tokenizer": describe_tokenizer(tokenizer)},
            global_step=global_step,
            full_state=full_state,
            decoder=decoder,
        )

    def _save_shards(self, dirpath: Path, tokenizer: Any, global_step: Optional[int], full_state: bool,
                     decoder: Optional[torch.Tensor]) -> list[int]:
        """:meth:`save` of a sharded collection: each shard's root writes its own latents (see ``docs/format.md``)."""
        part = self.merged_shard()
        if part is None:
            rank_zero_info(f"{type(self).__name__}: nothing collected yet, no samples written.")
            return []
        part = self.shard_with_windows(part)
        step = global_step
        if step is None:
            step = int(part.state["last_collected_step"]) if part.state is not None else (
                self.collector.last_collected_step if self.collector is not None else None)
        self.reset_window(step)
        tokenizer = load_tokenizer(tokenizer) if part.state is not None else None
        return self.write_shards(
            dirpath, part, tokenizer=tokenizer, config={**self.config(), "tokenizer": describe_tokenizer(tokenizer)},
            global_step=global_step, full_state=full_state, decoder=decoder, prepare=self._lock_dirpath,
        )

    def shard_with_windows(self, part: ShardPart) -> ShardPart:
        """A shard (of :meth:`merged_shard`) with its kept samples' windows read from the token source."""
        return dataclasses.replace(part, state=self.with_windows(part.state))

    def write_shards(
        self,
        dirpath: PathLike,
        part: ShardPart,
        *,
        tokenizer: Any,
        config: dict[str, Any],
        global_step: Optional[int] = None,
        full_state: bool = True,
        owner: Optional[str] = None,
        source: str = "train",
        trained_step: Optional[int] = None,
        decoder: Optional[torch.Tensor] = None,
        prepare: Optional[Callable[[Path], Any]] = None,
    ) -> list[int]:
        """Write a sharded save of :meth:`merged_shard`'s parts (a collective: every process calls it).

        Each shard's root writes its latents' feature files and its part of the full state; global rank 0 writes
        the run-level files and commits (``docs/format.md``). The processes must share a file system.

        Args:
            dirpath: The samples directory.
            part: This process's share (see :meth:`merged_shard` and :meth:`shard_with_windows`).
            tokenizer: A tokenizer object or ``None`` (used by the shards' roots).
            config: Recorded in the summary.
            global_step: Recorded as the save's step (default: the last collected step).
            full_state: Also write the full state (one part per shard and the index).
            owner: Who saves, in log messages (default: this class's name).
            source: ``"train"`` or an evaluation loop's name (a snapshot: no history), as in :meth:`write`.
            trained_step: Of a snapshot: the run's last training step (see :meth:`write`).
            decoder: The SAE's whole decoder ``[F, d_model]`` on global rank 0, for ``decoder_directions.pt``.
            prepare: Called on global rank 0 with ``dirpath`` before anything is written (takes the lock).

        Returns:
            The saved feature indices, best first, on global rank 0 (empty elsewhere).

        Raises:
            ShardedSaveError: Another process failed (every process raises; the one that failed its own error).
        """
        owner = owner or type(self).__name__
        state = part.state
        step = global_step if global_step is not None else int(state["last_collected_step"]) if state is not None \
            else None
        history = None if source != "train" else {**self._history_settings(), "previous": self._history}
        rank = torch.distributed.get_rank()
        directions = None if decoder is None or rank != 0 else unit_directions(decoder, part.num_latents)
        options = SaveOptions(config, tokenizer, self.settings.top_features_to_save,
                              self.settings.samples_per_feature_to_save, self.settings.rank_features_by,
                              int(step) if step is not None else -1, full_state=full_state, source=source,
                              trained_step=trained_step, history=history)
        ranked, summary, written = write_sharded_samples_dir(Path(dirpath), part, options, directions=directions,
                                                             prepare=prepare)
        if written is not None:  # this root's part of the history, as the save committed it
            self._history, self._history_is_part = written, True
        if rank != 0 or summary is None:
            return []
        self._warn_nonfinite(int(summary["nonfinite_skipped"]), owner)
        per_file = self.settings.samples_per_feature_to_save
        in_files = sum(min(entry["num_samples"], per_file) for entry in summary["top_features_by_activation"])
        rank_zero_info(
            f"{owner}: saved samples to {dirpath} at step {summary['global_step']} from {len(part.ranges)} shards:"
            f" {len(ranked)} feature files ({in_files} samples)"
            + (f" and the full state in parts ({summary['total_samples_stored']} samples of"
               f" {summary['num_features_tracked']} latents)." if full_state else ".")
        )
        self._write_report(dirpath, tokenizer, owner)
        return ranked

    def close(self) -> None:
        """Release the lock on the samples directory this collector saved to (see :meth:`save`).

        Saving again takes it again. The lock also goes with the collector object and with its process.
        """
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _lock_dirpath(self, dirpath: Path) -> None:
        """Hold the directory's lock from the first save on, as the callback does from ``setup``: one writer."""
        if self._lock is not None and Path(self._lock.lock_file).parent == dirpath:
            return
        self.close()
        self._lock = hold_lock(
            dirpath, claim_samples_dir,
            "Give each run its own directory, or wait for the other run to end (or call `close()` on the collector"
            " that saved there; a lock of a process that died is released with it).",
        )

    def write(
        self,
        dirpath: PathLike,
        merged: Optional[dict],
        *,
        tokenizer: Any,
        config: dict[str, Any],
        global_step: Optional[int] = None,
        full_state: bool = True,
        feature_extras: Optional[dict[int, dict]] = None,
        owner: Optional[str] = None,
        source: str = "train",
        trained_step: Optional[int] = None,
        decoder: Optional[torch.Tensor] = None,
    ) -> list[int]:
        """Write the samples directory of a merged state (see :meth:`merged_state`), on one process.

        Warns once per new batch of skipped non-finite values, logs one line saying what was saved, and writes
        the report unless ``write_report=False`` (a failing report only warns).

        Args:
            dirpath: The samples directory.
            merged: The merged state, or ``None`` when nothing was collected (then nothing is written).
            tokenizer: A tokenizer object or ``None``.
            config: Recorded in the summary.
            global_step: Recorded as the save's step (default: the last collected step).
            full_state: Also write ``full_state.pt``.
            feature_extras: Extra keys per saved feature file (see ``write_samples_dir``).
            owner: Who saves, in log messages (default: this class's name).
            source: What the collection is (see ``write_samples_dir``): ``"train"`` or an evaluation loop's name.
            trained_step: Of a snapshot: the run's last training step, said and recorded when newer than the
                weights' step (see ``write_samples_dir``).
            decoder: The SAE's decoder ``[F, d_model]``, saved as ``decoder_directions.pt`` (see :meth:`save`).

        Returns:
            The saved feature indices, best first.
        """
        owner = owner or type(self).__name__
        if merged is None:
            rank_zero_info(f"{owner}: nothing collected yet, no samples written.")
            return []
        # Kept refs become windows here, read in one gather: every file written holds windows.
        merged = with_windows(merged, self.token_source, owner)
        self._warn_nonfinite(int(merged["nonfinite_skipped"]), owner)
        step = int(merged["last_collected_step"]) if global_step is None else int(global_step)
        history = None if source != "train" else {**self._history_settings(), "previous": self._history}
        saved = write_samples_dir(
            dirpath,
            merged,
            config=config,
            tokenizer=tokenizer,
            top_features=self.settings.top_features_to_save,
            samples_per_feature=self.settings.samples_per_feature_to_save,
            rank_by=self.settings.rank_features_by,
            global_step=step,
            full_state=full_state,
            feature_extras=feature_extras,
            source=source,
            history=history,
            trained_step=trained_step,
            decoder=decoder,
            full_state_parts=self.shard_ranges,
            on_history=self._keep_history,
        )
        kept = kept_per_latent(merged)
        in_files = int(kept[saved].clamp(max=self.settings.samples_per_feature_to_save).sum()) if saved else 0
        older = (
            f" (weights of step {step}, older than the run's last training step {int(trained_step)})"
            if trained_step is not None and int(trained_step) > step else ""
        )
        rank_zero_info(
            f"{owner}: saved samples to {dirpath} at step {step}{older}: {len(saved)} feature files"
            f" ({in_files} samples)"
            + (f" and the full state ({int(kept.sum())} samples of {int(merged['num_latents'])} latents)."
               if full_state else ".")
        )
        self._write_report(dirpath, tokenizer, owner)
        return saved

    def _write_report(self, dirpath: PathLike, tokenizer: Any, owner: str) -> None:
        """The Markdown report of the save just committed, when the settings ask for it; a failure only warns."""
        if not self.settings.write_report:
            return
        try:
            write_report(dirpath, tokenizer=tokenizer)
        except Exception as err:  # noqa: BLE001 - a report must never stop training
            rank_zero_warn(f"{owner} could not write {REPORT_NAME}: {err}")

    def _keep_history(self, committed: dict) -> None:
        """Keep the history a save committed: the next save appends to it, a checkpoint carries it."""
        self._history = committed

    def _history_settings(self) -> dict[str, int]:
        settings = self.settings
        return {
            "top_tokens": settings.history_top_tokens, "per_level": settings.history_windows_per_level,
            "samples_per_feature": settings.history_samples_per_feature,
            "dead_window_steps": getattr(settings, "dead_window_steps", DEFAULT_DEAD_WINDOW_STEPS),
        }

    def _warn_nonfinite(self, skipped: int, owner: str) -> None:
        if skipped > self._warned_nonfinite:
            rank_zero_warn(
                f"{owner} skipped {skipped} non-finite latent values (NaN/Inf) so far; they are"
                " not counted or stored. Check the SAE for overflow (e.g. fp16) or diverging training."
            )
            self._warned_nonfinite = skipped


# In 0.1 this module was the tensor engine; its names resolve for one more release, with a DeprecationWarning.
__getattr__ = forwarder(
    __name__,
    homes_of(
        "lightning_sae_samples.engine.sample_collector",
        "lightning_sae_samples.engine.windows",
        "lightning_sae_samples.engine.bins",
        "lightning_sae_samples.engine.memory",
        "lightning_sae_samples.memory",
        "lightning_sae_samples.state.merge",
    ),
)
