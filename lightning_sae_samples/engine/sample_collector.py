"""The collector's tensor state: exact per-latent top-k samples and streaming statistics, in pure torch."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_sae_samples.config import CollectionConfig, engine_fields
from lightning_sae_samples.engine.bins import BinLookup, histogram_edges, interval_edges
from lightning_sae_samples.engine.dedup import OverlapRounds
from lightning_sae_samples.engine.indices import indices_of_rows
from lightning_sae_samples.engine.priority import sample_priority
from lightning_sae_samples.engine.rows import RowBatchContext, TokenWindows, unknown_neighbours
from lightning_sae_samples.engine.sample_table import (
    DEFAULT_POLICY,
    BatchContext,
    MergePolicy,
    SampleTable,
    acts_dtype_for,
    flush_tables,
    indices_of,
    token_dtype_for,
)
from lightning_sae_samples.engine.window_pool import REFS_DTYPE, WindowPool
from lightning_sae_samples.engine.windows import (
    SparseWindowActs,
    TokenPositions,
    above_threshold,
    dense_hits,
    finite,
    rounded_threshold,
    window_offsets,
)
from lightning_sae_samples.state.schema import (
    EMPTY,
    INTERVAL_FIELDS,
    LATENT_FIELDS,
    REF_FIELDS,
    ROW_WINDOWS_KEY,
    RUN_FIELDS,
    STAT_FIELDS,
    STATE_FORMAT_VERSION,
    TOKEN_BITS,
    TOKEN_SOURCE_KEY,
    WINDOW_FIELDS,
    WINDOW_STAT_FIELDS,
    WINDOW_TOKENS,
    check_state_version,
    empty_field,
    keeps_refs,
)
from lightning_sae_samples.state.tables import dense_counts, sparse_counts
from lightning_sae_samples.state.window_tokens import compact_pairs, empty_pairs, merge_pairs, pair_keys

RANK_SHIFT = 40


#: Staged window token keys are folded into the sorted counts once this many wait (or more than they hold).
PAIR_STAGE_LIMIT = 1 << 20


@dataclasses.dataclass
class Entries:
    """A batch's (token, latent, value) entries, of which only the ``valid`` ones count.

    Valid: collected, finite, above the threshold. Keeping the others, masked, spares a host sync to learn how
    many are valid before using them.

    Attributes:
        walking: Sparse sequences only: given the entries that may enter a table (a mask in entry order), the
            mask of those whose context window holds another entry of their latent, in the window reader's own
            order (see :meth:`SparseWindowActs.walking`). Entries that carry it are never permuted.
        nonfinite: Per entry, whether it is collected and not finite (sparse latents), counted in the collection's
            one sync.
        nonfinite_rows: Per row, whether it holds a non-finite value, and the rows, to count those values.
        by_latent: The entries sorted by latent (a permutation), where the window reader made one: the statistics
            then take the valid entries in that order, and their scatters sweep each per-latent tensor from start
            to end instead of at random (on the CPU, several times faster once the rest of a collection has pushed
            those tensors out of the cache).
    """

    token_idx: Tensor
    latent_idx: Tensor
    values: Tensor
    valid: Tensor
    walking: Optional[Callable[[Tensor], Tensor]] = None
    nonfinite: Optional[Tensor] = None
    nonfinite_rows: Optional[tuple[Tensor, Tensor]] = None
    by_latent: Optional[Tensor] = None

    def permuted(self, order: Tensor) -> Entries:
        """The entries in ``order``."""
        nonfinite = None if self.nonfinite is None else self.nonfinite[order]
        return Entries(self.token_idx[order], self.latent_idx[order], self.values[order], self.valid[order], None,
                       nonfinite, self.nonfinite_rows)

    def to(self, device: torch.device) -> Entries:
        """The entries on ``device`` (the rows to count non-finite values in stay where they are)."""
        nonfinite = None if self.nonfinite is None else self.nonfinite.to(device)
        walking, source = self.walking, self.valid.device
        if walking is not None:  # the window reader stays where the latents are

            def walking(entering: Tensor, read: Callable[[Tensor], Tensor] = self.walking) -> Tensor:
                return read(entering.to(source)).to(device)

        by_latent = None if self.by_latent is None else self.by_latent.to(device)
        return Entries(self.token_idx.to(device), self.latent_idx.to(device), self.values.to(device),
                       self.valid.to(device), walking, nonfinite, self.nonfinite_rows, by_latent)


def per_latent_fields(state: dict) -> list[str]:
    """Names of a state's statistics indexed by latent (first dimension ``F``); the tables are apart."""
    return [field.name for field in LATENT_FIELDS if field.name in state]


class SampleCollector:
    """Exact top-k activating contexts and streaming statistics for every latent.

    The state's tensors are declared below, one attribute each (see :mod:`lightning_sae_samples.state.schema`
    for their dtypes, fill values and merge rules); the kept samples live in :attr:`tables`. With
    ``config.row_windows == "refs"`` they hold shuffled rows' token refs instead of their windows (and only rows
    can be folded); :attr:`token_source` then describes the array source the refs point into.

    Args:
        config: The collection's settings, with ``num_latents`` set; the engine reads those with a ``state`` key
            (see :mod:`lightning_sae_samples.config`).
        device: Where the state lives; put it on the latents' device.
        hist_edges: Histogram bin edges; defaults to :func:`histogram_edges` of the threshold.
        policy: When the sample tables merge what they staged (the kept samples do not depend on it).

    Raises:
        ValueError: ``config.num_latents`` is not set.
    """

    #: Activations above the threshold per latent.
    count: Tensor
    #: Their sum and sum of squares (float64), for mean and standard deviation.
    sum: Tensor
    sum_sq: Tensor
    #: Largest and smallest activation above the threshold per latent.
    max: Tensor
    min: Tensor
    #: Activation histogram per latent over the fixed log-spaced :attr:`hist_edges`.
    hist: Tensor
    #: First and last step each latent fired (``EMPTY`` if never).
    first_step: Tensor
    last_step: Tensor
    #: Activations per latent and interval (only with interval sampling).
    interval_count: Tensor
    #: The current history window's count, sum and max per latent (since the last save; see :meth:`reset_window`).
    window_count: Tensor
    window_sum: Tensor
    window_max: Tensor
    window_tokens_seen: Tensor
    window_start: int
    #: Run-level counters.
    tokens_seen: Tensor
    nonfinite_skipped: Tensor
    steps_collected: int
    first_collected_step: int
    last_collected_step: int
    recent_block: int

    def __init__(
        self,
        config: CollectionConfig,
        device: torch.device | str = "cpu",
        hist_edges: Optional[Tensor] = None,
        policy: MergePolicy = DEFAULT_POLICY,
    ) -> None:
        if config.num_latents is None:
            raise ValueError("SampleCollector needs `config.num_latents`: the SAE's latent count F.")
        self.config = config
        self.policy = policy
        device = torch.device(device)
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            rounded_threshold(config.activation_threshold, dtype)  # cached: no tensor op in a collection
        num_latents, w = config.num_latents, config.window
        #: The kept samples hold token refs (``row_windows="refs"``), not windows.
        self.keeps_refs = config.row_windows == "refs"
        self.window_fields = REF_FIELDS if self.keeps_refs else WINDOW_FIELDS
        # What a batch computes for the candidates: the tables' fields, and the tokens de-duplication hashes.
        dedup_tokens = ("context_tokens",) if self.keeps_refs and config.deduplicate_contexts else ()
        self._batch_fields = self.window_fields + dedup_tokens
        #: What the refs point into (an array source's description), recorded in the state.
        self.token_source: Optional[dict] = None
        #: The context windows of every table's kept and staged samples, each written once.
        self.window_pool = WindowPool(self.window_fields, w, device, policy.min_pool_slots)
        table = functools.partial(SampleTable, policy=policy, window_fields=self.window_fields, pool=self.window_pool)
        edges = histogram_edges(config.activation_threshold) if hist_edges is None else hist_edges
        self.hist_edges = edges.to(torch.float64).cpu()
        num_bins = len(self.hist_edges) - 1

        radius = 2 * config.half_window if config.deduplicate_contexts else None
        self.tables: dict[str, SampleTable] = {
            "top": table(num_latents, config.max_samples_per_feature, w, device, dedup_radius=radius)
        }
        self.interval_edges: Optional[Tensor] = None
        if config.samples_per_interval:
            self.interval_edges = interval_edges(config.activation_threshold, config.num_intervals)
            self.tables["interval"] = table(
                num_latents * config.num_intervals, config.samples_per_interval, w, device, random_priority=True
            )
            for field in INTERVAL_FIELDS:
                setattr(self, field.name, empty_field(field, (num_latents, config.num_intervals), device))
        self.recent_block = EMPTY
        if config.recent_window_steps:
            for name in ("recent", "recent_prev"):
                self.tables[name] = table(
                    num_latents, config.recent_samples_per_feature, w, device, dedup_radius=radius
                )

        # Each value's histogram bin and (with interval samples) its interval, found by one lookup.
        inner_edges = [edges[1:-1] for edges in (self.hist_edges, self.interval_edges) if edges is not None]
        self._bins = BinLookup(inner_edges, device)
        if config.history_samples_per_feature:
            self.tables["window"] = table(
                num_latents, config.history_samples_per_feature, w, device, dedup_radius=radius
            )
        for field in (*STAT_FIELDS, *WINDOW_STAT_FIELDS):
            shape = (num_latents, num_bins) if field.name == "hist" else (num_latents,)
            setattr(self, field.name, empty_field(field, shape, device))
        self._pairs = empty_pairs(device)
        self._staged_keys: list[Tensor] = []
        self._staged_count = 0
        for field in RUN_FIELDS:
            value = empty_field(field, (), device) if field.dtype is not None else field.fill
            setattr(self, field.name, value)
        # Both token counters grow by the same count: one tensor, one add.
        self._tokens_seen_both = torch.zeros(2, dtype=torch.int64, device=device)
        self.tokens_seen, self.window_tokens_seen = self._tokens_seen_both.unbind()
        self.last_active = 0
        self.last_seen = 0  # tokens seen in the last collection, read back with its sizes

    @property
    def device(self) -> torch.device:
        """Device of the state tensors."""
        return self.count.device

    @property
    def top_values(self) -> Tensor:
        """Kept top activations ``[F, K]``, best first (``-inf`` where empty)."""
        self.tables["top"].flush()
        return self.tables["top"].values

    # ------------------------------------------------------------------ update
    @torch.no_grad()  # the latents' graph is not kept: no detach to dispatch
    def update_dense(
        self,
        tokens: Tensor,
        latents: Tensor,
        step: int,
        order_base: int = 0,
        attention_mask: Optional[Tensor] = None,
        excluded: Optional[Tensor] = None,
    ) -> None:
        """Fold dense latents into the state.

        Args:
            tokens: Token ids ``[B, T]``; negative ids count as padding.
            latents: Activations ``[B, T, F]`` (any float dtype, any device).
            step: Global optimizer step of this batch.
            order_base: Order key of the batch's first token (``rank << 40 | offset``).
            attention_mask: ``[B, T]``, 0/False at padding: not collected, not counted in ``tokens_seen``,
                and context windows stop there as at a sequence edge.
            excluded: ``[B, T]`` bool, True where nothing is collected although the token counts as seen
                and shows in other samples' contexts (e.g. BOS).
        """
        self._check_sequences()
        batch, seq = tokens.shape
        positions = TokenPositions(tokens, attention_mask, excluded)
        flat = latents.reshape(batch * seq, self.config.num_latents).contiguous()
        found = self._dense_entries(flat, positions.collect.reshape(-1))
        segment = positions.segment
        token_idx, latent_idx = found.token_idx, found.latent_idx

        def window_acts(candidate: Tensor) -> Tensor:
            token, latent = token_idx.index_select(0, candidate), latent_idx.index_select(0, candidate)
            position = token % seq
            offsets = window_offsets(self.config.half_window, token.device)
            shifted = position.unsqueeze(1) + offsets
            rows = (token - position).unsqueeze(1) + shifted.clamp(0, seq - 1)
            acts = flat[rows, latent.unsqueeze(1).expand_as(rows)].to(acts_dtype_for(flat.dtype))
            inside = (shifted >= 0) & (shifted < seq) & (segment[rows] == segment[token].unsqueeze(1))
            return torch.where(inside & finite(acts), acts, 0.0)

        self._fold(found, positions.num_seen, positions.tokens, step, window_acts, flat.dtype,
                   self._sequence_batch(positions, step, order_base))

    @torch.no_grad()  # the latents' graph is not kept: no detach to dispatch
    def update_sparse(
        self,
        tokens: Tensor,
        indices: Tensor,
        values: Tensor,
        step: int,
        order_base: int = 0,
        attention_mask: Optional[Tensor] = None,
        excluded: Optional[Tensor] = None,
    ) -> None:
        """Fold TopK-style sparse latents into the state without densifying them.

        Args:
            tokens: Token ids ``[B, T]``; negative ids count as padding.
            indices: Active latent indices ``[B, T, k]``.
            values: Their activations ``[B, T, k]``.
            step: Global optimizer step of this batch.
            order_base: Order key of the batch's first token (``rank << 40 | offset``).
            attention_mask: ``[B, T]``, 0/False at padding (see :meth:`update_dense`).
            excluded: ``[B, T]`` bool, True where nothing is collected (see :meth:`update_dense`).
        """
        self._check_sequences()
        batch, seq = tokens.shape
        positions = TokenPositions(tokens, attention_mask, excluded)
        k = indices.shape[-1]
        entry_idx, entry_val = indices.reshape(-1), values.reshape(-1)
        found = self._sparse_entries(entry_idx, entry_val, k, positions.collect)
        acts = SparseWindowActs(entry_idx, entry_val, k, positions.segment, self.config.half_window,
                                positions.num_segments)
        found.walking, found.by_latent = acts.walking, acts.order
        self._fold(found, positions.num_seen, positions.tokens, step, acts, values.dtype,
                   self._sequence_batch(positions, step, order_base))

    def _check_sequences(self) -> None:
        if self.keeps_refs:
            raise ValueError(
                "This collection keeps shuffled rows' token refs (row_windows='refs'); a [B, T] batch has none."
                " Collect sequences with row_windows='tokens'."
            )

    @torch.no_grad()  # the latents' graph is not kept: no detach to dispatch
    def update_rows_dense(
        self,
        windows: TokenWindows,
        latents: Tensor,
        step: int,
        order: Tensor,
        excluded: Optional[Tensor] = None,
        refs: Optional[Tensor] = None,
    ) -> None:
        """Fold dense latents of shuffled rows, whose windows a token source read.

        Args:
            windows: The rows' context windows (see :class:`~lightning_sae_samples.engine.rows.TokenWindows`); a
                row whose token is padding (``-1`` at the centre) is neither collected nor counted as seen.
            latents: Activations ``[N, F]``.
            step: Global optimizer step.
            order: Order key of each row ``[N]`` (int64): ties among equal activations go to the lower one.
            excluded: ``[N]`` bool, True where nothing is collected although the row counts as seen.
            refs: The rows' token refs ``[N]`` (int64), which the samples keep when ``row_windows="refs"``.
        """
        real, collect = self._row_positions(windows, excluded)
        flat = latents.reshape(len(real), self.config.num_latents).contiguous()
        self._fold_rows(windows, real, self._dense_entries(flat, collect), step, order, flat.dtype, refs)

    @torch.no_grad()  # the latents' graph is not kept: no detach to dispatch
    def update_rows_sparse(
        self,
        windows: TokenWindows,
        indices: Tensor,
        values: Tensor,
        step: int,
        order: Tensor,
        excluded: Optional[Tensor] = None,
        refs: Optional[Tensor] = None,
    ) -> None:
        """Fold TopK-style sparse latents ``[N, k]`` of shuffled rows (see :meth:`update_rows_dense`)."""
        real, collect = self._row_positions(windows, excluded)
        found = self._sparse_entries(indices.reshape(-1), values.reshape(-1), indices.numel() // len(real), collect)
        self._fold_rows(windows, real, found, step, order, values.dtype, refs)

    @staticmethod
    def _row_positions(windows: TokenWindows, excluded: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        real = windows.tokens[:, windows.tokens.shape[1] // 2] >= 0
        collect = real if excluded is None else real & ~excluded.to(real.device)
        return real, collect

    def _fold_rows(
        self,
        windows: TokenWindows,
        real: Tensor,
        found: Entries,
        step: int,
        order: Tensor,
        latent_dtype: torch.dtype,
        refs: Optional[Tensor],
    ) -> None:
        if self.keeps_refs and (refs is None or refs.shape != order.shape):
            raise ValueError("This collection keeps token refs (row_windows='refs'): pass each row's ref as `refs`.")
        half, acts_dtype = self.config.half_window, acts_dtype_for(latent_dtype)
        # New samples of equal priority keep their arrival order: in ref order, the kept samples do not
        # depend on the shuffle (as a [B, T] batch's come in token order).
        found = found.permuted(torch.argsort(order.to(found.token_idx.device)[found.token_idx], stable=True))
        windows, order = windows.to(self.device), order.to(self.device)
        refs = refs.to(self.device, torch.int64) if self.keeps_refs else None
        rows_values = found.values.to(self.device)

        def window_acts(candidate: Tensor) -> Tensor:
            return unknown_neighbours(rows_values.index_select(0, candidate), half, acts_dtype)

        def make_batch(token_idx: Tensor, _: Callable[[Tensor], Tensor]) -> BatchContext:
            return RowBatchContext(windows, token_idx, step, order, half, window_acts, refs=refs)

        activating = windows.tokens[:, half]  # each row's own token, at the centre of its window
        self._fold(found, real.sum(), activating, step, window_acts, latent_dtype, make_batch,
                   all_tokens=windows.tokens)

    def _dense_entries(self, flat: Tensor, collect: Tensor) -> Entries:
        """The entries of ``flat`` ``[N, F]`` above the threshold; those of collected tokens and finite are valid.

        Rows holding a non-finite value are noted, to count their non-finite values in ``nonfinite_skipped``.
        """
        num_latents = self.config.num_latents
        entry, bad_rows = dense_hits(flat, self.config.activation_threshold, collect)
        values = flat.view(-1).index_select(0, entry).float()
        token_idx = entry // num_latents
        valid = finite(values) & collect.index_select(0, token_idx)
        return Entries(token_idx, entry % num_latents, values, valid, nonfinite_rows=(bad_rows, flat))

    def _sparse_entries(self, indices: Tensor, values: Tensor, k: int, collect: Tensor) -> Entries:
        """Every entry of TopK-style latents ``[N * k]`` (token order).

        The collected finite ones above the threshold are valid. ``collect``: whether each of the ``N`` tokens is
        collected, in any shape (read flat).
        """
        token_idx = torch.arange(len(indices), device=indices.device) // k
        collect = torch.take(collect, token_idx)
        is_finite = finite(values)
        valid = above_threshold(values, self.config.activation_threshold) & is_finite & collect
        if self.config.activation_threshold < 0:
            # A negative index pads a token's variable number of active latents (checked to have value 0): the
            # index decides when a 0 is above the threshold.
            valid &= indices >= 0
        # Invalid entries keep a latent in range (a padding index is negative): masked wherever they are read.
        latent_idx = indices.long().clamp(min=0)
        return Entries(token_idx, latent_idx, values.float(), valid, nonfinite=collect > is_finite)  # and not finite

    def _sequence_batch(self, positions: TokenPositions, step: int, order_base: int) -> Callable[..., BatchContext]:
        half = self.config.half_window

        def make_batch(token_idx: Tensor, window_acts: Callable) -> BatchContext:
            dev = self.device
            return BatchContext(
                positions.tokens.to(dev), token_idx, step, order_base, half, window_acts,
                segment=positions.segment.to(dev),
            )

        return make_batch

    def _fold(
        self,
        found: Entries,
        num_seen: Tensor,
        token_ids: Tensor,
        step: int,
        window_acts: Callable[..., Tensor],
        latent_dtype: torch.dtype,
        make_batch: Callable[[Tensor, Callable[..., Tensor]], BatchContext],
        all_tokens: Optional[Tensor] = None,
    ) -> None:
        """Fold a batch's entries into the statistics and every table, in one pass with one host sync.

        Which entries each table may take is decided for all entries at once; one read of their counts (with
        the largest token id, which picks the windows' token dtype) sizes everything that follows. ``token_ids``:
        the token id of each ``found.token_idx`` (flat in memory order; ``[B, T]`` for sequences).
        """
        cfg = self.config
        dev = self.device
        source = found.values.device
        if source != dev:
            # The state lives elsewhere (e.g. host memory): windows are read where the latents are, and only
            # those of the samples that may enter are copied.
            read_windows = window_acts

            def window_acts(candidate: Tensor, walking: Optional[Tensor] = None) -> Tensor:
                walking = None if walking is None else walking.to(source)
                return read_windows(candidate.to(source), walking).to(dev)

            found = found.to(dev)
        token_idx, latent_idx, values, valid = found.token_idx, found.latent_idx, found.values, found.valid
        batch = make_batch(token_idx, window_acts)
        self._tokens_seen_both += num_seen.to(dev)
        if self.first_collected_step == EMPTY:
            self.first_collected_step = step
        if self.last_collected_step != step:
            self.steps_collected += 1
            self.last_collected_step = step

        offers = [(self.tables["top"], latent_idx, values)]
        if "window" in self.tables:
            offers.append((self.tables["window"], latent_idx, values))
        interval_rows = None
        hist_bin, *interval_bin = self._bins(values)
        if "interval" in self.tables:
            interval_rows = torch.add(interval_bin[0], latent_idx, alpha=cfg.num_intervals)
            priority = sample_priority(step, batch.orders, cfg.seed)
            offers.append((self.tables["interval"], interval_rows, priority))
        if "recent" in self.tables:
            self._rotate_recent(step)
            offers.append((self.tables["recent"], latent_idx, values))
        may_enter = torch.stack([table.can_enter(rows, priority) for table, rows, priority in offers]) & valid
        anywhere = may_enter.any(0)
        # Every mask over the entries in one stack: one reduction counts them all, one search finds them all.
        entry_masks = [valid if found.by_latent is None else valid.index_select(0, found.by_latent), anywhere]
        if found.walking is not None:
            entry_masks.append(found.walking(anywhere))
        if found.nonfinite is not None:
            entry_masks.append(found.nonfinite)
        masks = torch.cat([may_enter, torch.stack(entry_masks)])
        tokens = token_ids if all_tokens is None else all_tokens
        largest = tokens.max().to(dev) if tokens.numel() else torch.zeros((), dtype=torch.int64, device=dev)
        asks = [masks.sum(1)]
        bad_rows = found.nonfinite_rows[0] if found.nonfinite_rows is not None else None
        if bad_rows is not None:
            asks.append(bad_rows.to(dev).sum().view(1))
        asks.append(torch.stack([largest.long(), num_seen.to(dev)]))
        overlaps = None
        if cfg.deduplicate_contexts:  # stage 1 of the rule, once for every table that de-duplicates
            sequence, position = batch.sequence_positions(token_idx)
            overlaps = OverlapRounds(latent_idx, sequence, position, values, valid, 2 * cfg.half_window)
            asks.append(overlaps.sizes)
        freed = self.window_pool.ask()
        if freed is not None:
            asks.append(freed)
        sizes = torch.cat(asks).tolist()  # the one sync
        if freed is not None:
            self.window_pool.answer(sizes.pop())
        counts, sizes = sizes[: len(masks)], sizes[len(masks) :]
        if bad_rows is not None:
            self._count_nonfinite(found.nonfinite_rows, sizes.pop(0))
        max_id, num_seen_now = sizes[:2]
        survives = None if overlaps is None else overlaps.keep(sizes[2:])
        self.last_seen = num_seen_now
        if num_seen_now == token_ids.numel():  # no padding: windows stop only at their sequence's edges
            batch.segment = None
        if found.nonfinite is not None and counts[-1]:
            self.nonfinite_skipped += counts[-1]

        batch.token_dtype = token_dtype_for(max_id)
        for table in self.tables.values():
            table.widen(batch.token_dtype, acts_dtype_for(latent_dtype))
        self.last_active = counts[len(offers)]
        found_at = indices_of_rows(masks, counts)
        entering, (at, candidates, *more) = found_at[: len(offers)], found_at[len(offers) :]
        if found.by_latent is not None:
            at = found.by_latent.index_select(0, at)
        # index_select, not tensor[index]: on the CPU a 1-D gather by advanced indexing is several times slower.
        fired = latent_idx.index_select(0, at)
        self._update_statistics(fired, values.index_select(0, at), hist_bin.index_select(0, at), step,
                                None if interval_rows is None else interval_rows.index_select(0, at))
        self._stage_pairs(fired, torch.take(token_ids.to(dev), token_idx.index_select(0, at)))
        walking = more[0] if found.walking is not None else None
        batch.compute_windows(candidates, self._batch_fields, walking)
        # Each window is written once; the tables that will stage it hold it from the start.
        holders = masks.narrow(0, 0, len(offers)).index_select(1, candidates).sum(0, dtype=REFS_DTYPE)
        batch.write_windows(self.window_pool, holders)
        for (table, rows, priority), candidate in zip(offers, entering):
            alive = survives.index_select(0, candidate) if table.dedup_radius is not None else None
            value = values.index_select(0, candidate)
            ranked_by = value if priority is values else priority.index_select(0, candidate)
            table.insert(rows.index_select(0, candidate), candidate, ranked_by, value, batch, flush=False, alive=alive)
        flush_tables([table for table, _, _ in offers if table.due])

    def _count_nonfinite(self, rows: tuple[Tensor, Tensor], num_bad: int) -> None:
        """Count the non-finite values of the collected rows that hold one (a rare batch has any)."""
        if num_bad:
            bad, flat = rows
            picked = flat.index_select(0, indices_of(bad, num_bad))
            self.nonfinite_skipped += (~finite(picked)).sum().to(self.nonfinite_skipped.device)

    # ------------------------------------------------------------------ history window
    def _stage_pairs(self, latent_idx: Tensor, token_ids: Tensor) -> None:
        keys = pair_keys(latent_idx, token_ids)
        self._staged_keys.append(keys)
        self._staged_count += len(keys)
        if self._staged_count > max(PAIR_STAGE_LIMIT, len(self._pairs["key"])):
            self._fold_staged_pairs()

    def _fold_staged_pairs(self) -> None:
        if self._staged_keys:
            staged = compact_pairs(torch.cat(self._staged_keys))
            self._pairs = merge_pairs(self._pairs, staged)
            self._staged_keys, self._staged_count = [], 0

    @property
    def window_pairs(self) -> dict[str, Tensor]:
        """The current history window's activations per (latent, token id), sparse (see ``state.window_tokens``)."""
        self._fold_staged_pairs()
        return self._pairs

    def reset_window(self, step: int) -> None:
        """Start a new history window at ``step`` (a save wrote the current one): its counters and samples empty."""
        for field in WINDOW_STAT_FIELDS:
            getattr(self, field.name).fill_(field.fill)
        self._pairs = empty_pairs(self.device)
        self._staged_keys, self._staged_count = [], 0
        self.window_tokens_seen.zero_()
        self.window_start = int(step)
        if "window" in self.tables:
            self.tables["window"].clear()

    def _rotate_recent(self, step: int) -> None:
        block = step // int(self.config.recent_window_steps)
        if block == self.recent_block:
            return
        current, previous = self.tables["recent"], self.tables["recent_prev"]
        if block == self.recent_block + 1:
            self.tables["recent_prev"], self.tables["recent"] = current, previous
            previous.clear()
        else:
            current.clear()
            previous.clear()
        self.recent_block = block

    def _update_statistics(
        self, latent_idx: Tensor, values: Tensor, hist_bin: Tensor, step: int, interval_rows: Optional[Tensor]
    ) -> None:
        """Scatter the valid entries (only those) into the all-time and the history window's statistics.

        Each statistic is its own contiguous tensor updated by a 1-D scatter: on the CPU a scatter with a 2-D
        source or index takes a slow path, and a flattened one costs more operators to index than it saves.
        """
        ones = torch.ones_like(latent_idx)
        for count in (self.count, self.window_count):
            count.index_add_(0, latent_idx, ones)
        as_double = values.double()
        addends = ((self.sum, as_double), (self.sum_sq, as_double * as_double), (self.window_sum, as_double))
        for total, addend in addends:
            total.index_add_(0, latent_idx, addend)
        for largest in (self.max, self.window_max):
            largest.scatter_reduce_(0, latent_idx, values, reduce="amax")
        self.min.scatter_reduce_(0, latent_idx, values, reduce="amin")
        self.hist.view(-1).index_add_(0, torch.add(hist_bin, latent_idx, alpha=self.hist.shape[1]), ones)
        if interval_rows is not None:
            self.interval_count.view(-1).index_add_(0, interval_rows, ones)
        self.last_step.index_fill_(0, latent_idx, step)
        # A latent without a first step had no last one either: its last step now is its first (or still EMPTY).
        torch.where(self.first_step == EMPTY, self.last_step, self.first_step, out=self.first_step)

    # ------------------------------------------------------------------ state
    def _run_state(self) -> dict:
        """The state's run-level entries: format, configuration, edges and counters."""
        cfg = self.config
        state: dict = {"format_version": STATE_FORMAT_VERSION}
        state.update(cfg.state_entries())
        state.update(half_window=cfg.half_window, hist_edges=self.hist_edges.clone())
        if self.interval_edges is not None:
            state["interval_edges"] = self.interval_edges.clone()
        if self.keeps_refs:
            state[ROW_WINDOWS_KEY] = "refs"
            state[TOKEN_SOURCE_KEY] = dict(self.token_source or {})
        for field in RUN_FIELDS:
            value = getattr(self, field.name)
            state[field.name] = value.clone() if isinstance(value, Tensor) else value
        return state

    def _export(self, latents: slice, padded: bool) -> dict:
        cfg = self.config
        state = self._run_state()
        start, stop, _ = latents.indices(cfg.num_latents)
        for name, table in self.tables.items():
            per = cfg.num_intervals if name == "interval" else 1
            rows = slice(start * per, stop * per)
            state[name] = table.export_padded(rows) if padded else table.export(rows)
        for field in LATENT_FIELDS:
            if hasattr(self, field.name):
                rows = getattr(self, field.name)[start:stop]
                state[field.name] = sparse_counts(rows) if field.sparse and not padded else rows.clone()
        if not padded:  # variable length: collectives gather it apart (see `engine.distributed`)
            state[WINDOW_TOKENS.name] = self.window_pairs_of(latents)
        return state

    def window_pairs_of(self, latents: slice = slice(None)) -> dict[str, Tensor]:
        """The window's (latent, token) counts of a range of latents (new tensors)."""
        start, stop, _ = latents.indices(self.config.num_latents)
        pairs = self.window_pairs
        bounds = torch.tensor([start << TOKEN_BITS, stop << TOKEN_BITS], dtype=torch.int64, device=self.device)
        lo, hi = torch.searchsorted(pairs["key"], bounds).tolist()
        return {name: value[lo:hi].clone() for name, value in pairs.items()}

    def export(self, latents: slice = slice(None)) -> dict:
        """The state of a range of latents in compact form (see :mod:`~lightning_sae_samples.state.tables`).

        Per-latent statistics and the tables' rows cover ``latents``; run-level entries are whole. Tensors
        are new and on the state's device. This is what :func:`merge_states`, the checkpoint and the
        full-state file hold.
        """
        return self._export(latents, padded=False)

    def export_padded(self, latents: slice = slice(None)) -> dict:
        """Like :meth:`export`, with every table as padded ``[rows, capacity, ...]`` tensors.

        The shapes depend only on the configuration, as collectives across processes need.
        """
        return self._export(latents, padded=True)

    def state_dict(self) -> dict:
        """The whole state, compact, on the CPU (loadable with ``torch.load(weights_only=True)``)."""
        return _to_cpu(self.export())

    @classmethod
    def from_state_dict(
        cls, state: dict, device: torch.device | str = "cpu", policy: MergePolicy = DEFAULT_POLICY
    ) -> SampleCollector:
        """Rebuild a collector from :meth:`state_dict` output, on ``device``.

        Raises:
            ValueError: ``state`` is not a compact collector state of this version, or does not fit its own
                configuration.
        """
        check_state_version(state)
        required = [f.metadata["state"] for f in engine_fields()[:3]]
        required += [f.name for f in STAT_FIELDS]
        missing = [name for name in required if name not in state]
        missing += [name for name in ("top", "hist_edges") if name not in state]
        if missing:
            raise ValueError(f"Collector state is missing {missing}; it was not written by lightning-sae-samples.")
        config = CollectionConfig.from_state(state)
        if keeps_refs(state):
            config = dataclasses.replace(config, row_windows="refs")
        collector = cls(config, device, state["hist_edges"], policy)
        if collector.keeps_refs:
            described = state.get(TOKEN_SOURCE_KEY)
            if not isinstance(described, dict):
                raise ValueError(f"Collector state keeps token refs but its {TOKEN_SOURCE_KEY!r} entry is missing.")
            collector.token_source = dict(described)
        for name, table in collector.tables.items():
            if name == "window" and name not in state:
                continue  # a state of an earlier version: its history window starts empty
            if name not in state:
                raise ValueError(f"Collector state is missing its {name!r} sample table.")
            table.load(state[name])
        pairs = state.get(WINDOW_TOKENS.name)
        if pairs is not None:
            if not _valid_pairs(pairs, collector.config.num_latents):
                raise ValueError(
                    f"Collector state field {WINDOW_TOKENS.name!r} is not a set of sorted distinct (latent, token)"
                    " keys with positive counts."
                )
            collector._pairs = {name: pairs[name].to(device=collector.device, dtype=torch.int64).clone()
                                for name in ("key", "count")}
        for field in LATENT_FIELDS:
            if not hasattr(collector, field.name) or (field in WINDOW_STAT_FIELDS and field.name not in state):
                continue
            target = getattr(collector, field.name)
            value = state.get(field.name)
            if field.sparse and isinstance(value, dict) and _valid_counts(value, target):
                value = dense_counts(value)
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"Collector state field {field.name!r} is missing or not of shape {tuple(target.shape)}."
                )
            target.copy_(value)
        for field in RUN_FIELDS:
            value = state.get(field.name, field.fill)
            if field.dtype is not None:
                getattr(collector, field.name).fill_(int(value))
            else:
                setattr(collector, field.name, int(value))
        return collector

    def empty_like(self) -> SampleCollector:
        """A collector with the same configuration, histogram edges and step counters, and no samples."""
        empty = SampleCollector(self.config, self.device, self.hist_edges, self.policy)
        empty.token_source = self.token_source
        for field in RUN_FIELDS:
            if field.dtype is None:
                setattr(empty, field.name, getattr(self, field.name))
        return empty


def _valid_counts(counts: dict, target: Tensor) -> bool:
    index = counts.get("index")
    return (
        [int(n) for n in counts.get("shape", [])] == list(target.shape)
        and isinstance(index, Tensor) and isinstance(counts.get("value"), Tensor)
        and index.shape == counts["value"].shape
        and (not len(index) or (int(index.min()) >= 0 and int(index.max()) < target.numel()))
        and bool((index[1:] > index[:-1]).all())
    )


def _valid_pairs(pairs: Any, num_latents: int) -> bool:
    key, count = (pairs.get("key"), pairs.get("count")) if isinstance(pairs, dict) else (None, None)
    if not isinstance(key, Tensor) or not isinstance(count, Tensor) or key.dim() != 1 or key.shape != count.shape:
        return False
    if key.is_floating_point() or count.is_floating_point():
        return False
    return not len(key) or (
        bool((key[1:] > key[:-1]).all()) and int(key[0]) >= 0 and int(key[-1] >> TOKEN_BITS) < num_latents
        and bool((count > 0).all())
    )


def _to_cpu(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        out[key] = _to_cpu(value) if isinstance(value, dict) else value.cpu() if isinstance(value, Tensor) else value
    return out
