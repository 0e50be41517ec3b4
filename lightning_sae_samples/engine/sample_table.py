"""A table of rows, each keeping the samples with the largest priority, updated without Python loops.

The collector uses one table for every kind of kept sample: the exact top activations of each latent
(priority = activation), random samples per activation interval (priority = a hash of where the sample
was seen, so the kept ones are a uniform sample that any process or resume reproduces), and the top
activations of the recent window.

Per row, ``priority``/``value``/``step``/``order`` are kept sorted (best first; among equal priorities the
earliest ``(step, order)`` first) with a ``slot`` pointer into a window pool (shared by all rows, and by a
collector's tables: see :mod:`~lightning_sae_samples.engine.window_pool`) that holds each sample's position and
context window. A candidate's window is written to the pool once, when it is staged; staged samples are merged in
bulk, and a merge re-sorts only the small keys of the rows it touches: the samples that enter keep their slot,
and those pushed out or that never enter give theirs back.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_sae_samples.engine.dedup import OverlapRounds, best_of_each_class, context_hash
from lightning_sae_samples.engine.hashing import signed64
from lightning_sae_samples.engine.indices import indices_of
from lightning_sae_samples.engine.window_pool import WindowPool
from lightning_sae_samples.state.merge import merge_padded_tables, sort_samples
from lightning_sae_samples.state.schema import EMPTY, REF_FIELDS, SAMPLE_FIELD, TABLE_FIELDS, WINDOW_FIELDS

__all__ = [
    "DEFAULT_POLICY", "EMPTY", "REF_FIELDS", "TABLE_FIELDS", "WINDOW_FIELDS", "BatchContext", "MergePolicy",
    "SampleTable", "flush_tables",
    "merge_exported", "sort_samples",
]

#: Dtypes of the sorted per-row keys: ``step`` fits int32 (steps below 2**31), and so do pool slots.
STEP_DTYPE = torch.int32
SLOT_DTYPE = torch.int32
#: Dtypes the window pools may hold: token ids in the smallest that holds every id seen (widened in place
#: when a larger id arrives), context activations in the latents' own half dtype or float32.
TOKEN_DTYPES = (torch.int16, torch.int32)
ACTS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def token_dtype_for(max_id: int) -> torch.dtype:
    """The smallest of :data:`TOKEN_DTYPES` that holds token ids up to ``max_id``."""
    return torch.int16 if max_id < 2**15 else torch.int32


def acts_dtype_for(latents: torch.dtype) -> torch.dtype:
    """Dtype of stored context activations for latents of this dtype (exact: no rounding of their values)."""
    return latents if latents in (torch.bfloat16, torch.float16) else torch.float32


merge_exported = merge_padded_tables


class BatchContext:
    """One batch's candidate samples, and the context windows of those some table may keep.

    Args:
        tokens: Token ids ``[B, T]`` on the tables' device.
        token_idx: Flat token index (``b * T + t``) of each candidate, ascending.
        step: Global optimizer step.
        order_base: Order key of the batch's first token (``rank << 40 | offset within the step``).
        half_window: Context tokens kept on each side of the activating one.
        window_acts: ``candidates [S] -> [S, W]``: activations of each candidate's latent on its context
            tokens, 0 where the window leaves the sequence or the activation is not finite.
        segment: Segment id of every token ``[B * T]``; a window keeps only the tokens of its centre's
            segment (padding cuts it as a sequence edge would). ``None``: whole sequences.
        token_dtype: Dtype of the window token ids (it must hold every id of ``tokens``).
    """

    def __init__(
        self,
        tokens: Tensor,
        token_idx: Tensor,
        step: int,
        order_base: int,
        half_window: int,
        window_acts: Callable[[Tensor], Tensor],
        segment: Optional[Tensor] = None,
        token_dtype: torch.dtype = torch.int32,
    ) -> None:
        self.tokens, self.token_idx, self.segment = tokens, token_idx, segment
        self.token_dtype = token_dtype
        self.step, self.order_base, self.half_window = step, order_base, half_window
        self.window_acts = window_acts
        self.windows: dict[str, Tensor] = {}
        self._candidate: Optional[Tensor] = None
        self._window_of: Optional[Tensor] = None
        self._slot_of: dict[int, tuple[Tensor, bool]] = {}
        self._hashes: Optional[Tensor] = None
        self._orders: Optional[Tensor] = None

    def token_order(self, token_idx: Tensor) -> Tensor:
        """Order key of each token (ties among equal priorities go to the earliest ``(step, order)``)."""
        return self.order_base + token_idx

    @property
    def orders(self) -> Tensor:
        """:meth:`token_order` of every candidate, computed once per batch for all the tables."""
        if self._orders is None:
            self._orders = self.token_order(self.token_idx)
        return self._orders

    def sequence_positions(self, token_idx: Tensor) -> tuple[Tensor, Tensor]:
        """De-duplication stage 1: each token's sequence, and its position there."""
        seq = self.tokens.shape[1]
        return token_idx // seq, token_idx % seq

    def positions_of(self, token_idx: Tensor) -> Tensor:
        """Position of each token in its sequence (int32)."""
        return (token_idx % self.tokens.shape[1]).to(torch.int32)

    def window_tokens(self, token_idx: Tensor) -> Tensor:
        """Token ids of each sample's window ``[S, W]`` (``token_dtype``, ``-1`` outside the sequence or segment)."""
        seq = self.tokens.shape[1]
        half = self.half_window
        start = token_idx + (token_idx // seq) * (2 * half)

        def windows(values: Tensor) -> Tensor:
            padded = torch.nn.functional.pad(values.view(-1, seq), (half, half), value=EMPTY)
            return padded.reshape(-1).unfold(0, 2 * half + 1, 1).index_select(0, start)

        tokens = windows(self.tokens.to(self.token_dtype))
        if self.segment is None:
            return tokens
        same = windows(self.segment) == self.segment[token_idx].unsqueeze(1)
        return torch.where(same, tokens, EMPTY)

    def compute_windows(
        self, candidate: Tensor, fields: tuple[str, ...] = WINDOW_FIELDS, walking: Optional[Tensor] = None
    ) -> None:
        """Compute the window ``fields`` of these candidates (the union of what every table may keep), once.

        De-duplication hashes ``context_tokens``: ask for them where a table keeping refs de-duplicates.
        ``walking``: the candidates whose window holds other activations of their latent, where the window
        reader tells them apart (see :class:`~lightning_sae_samples.engine.windows.SparseWindowActs`).
        """
        token_idx = self.token_idx[candidate]
        self.windows = {"position": self.positions_of(token_idx)}
        if "context_tokens" in fields:
            self.windows["context_tokens"] = self.window_tokens(token_idx)
        if "context_acts" in fields:
            acts = self.window_acts(candidate) if walking is None else self.window_acts(candidate, walking)
            self.windows["context_acts"] = acts
        if "token_ref" in fields:
            self.windows["token_ref"] = self.token_refs(token_idx)
        self._candidate, self._window_of, self._slot_of = candidate, None, {}

    @property
    def window_of(self) -> Tensor:
        """Per token of the batch, the row of its window in :attr:`windows` (``EMPTY``: none computed)."""
        if self._window_of is None:
            self._window_of = self._at_candidates(torch.arange(len(self._candidate), device=self._candidate.device))
        return self._window_of

    def _at_candidates(self, values: Tensor) -> Tensor:
        """Per token of the batch, the value of its candidate (one per :meth:`compute_windows` candidate), or EMPTY."""
        return torch.full_like(self.token_idx, EMPTY).index_put_((self._candidate,), values)

    def write_windows(self, pool: WindowPool, holders: Optional[Tensor] = None) -> None:
        """Write the computed windows to ``pool``, once for all the tables that share it.

        ``holders``: how many tables will stage each window (they then hold it already; see
        :meth:`WindowPool.write`). ``None``: each table holds the windows it stages. Every window written must be
        staged by some table, or its slot is never given back.
        """
        slots = pool.write(self.windows, holders)
        self._slot_of[id(pool)] = (self._at_candidates(slots), holders is not None)

    def slots_in(self, pool: WindowPool, candidate: Tensor) -> Tensor:
        """The pool slots of these candidates' windows, held by the caller (written on the first call)."""
        if id(pool) not in self._slot_of:
            self.write_windows(pool)
        slot_of, held = self._slot_of[id(pool)]
        slots = slot_of[candidate]
        if not held:
            pool.hold(slots)
        return slots

    def token_refs(self, token_idx: Tensor) -> Tensor:
        """Token refs of these tokens: only rows have them."""
        raise ValueError("A [B, T] batch has no token refs: a table keeping refs collects shuffled rows only.")

    def context_hashes(self, window: Tensor) -> Tensor:
        """:func:`~lightning_sae_samples.engine.dedup.context_hash` of windows, computed once per batch."""
        if self._hashes is None:
            self._hashes = context_hash(self.windows["context_tokens"])
        return self._hashes[window]


def flush_tables(tables: list[SampleTable]) -> None:
    """Merge the staged samples of several tables, reading back the sizes they need together.

    Each table's merge asks for sizes in steps (one, or two with de-duplication); the asks of all tables at one
    step are read back in one host sync, with the count of the slots their pools got back since the last one.
    """
    flushing = [table for table in tables if table._staged]
    pools = {id(table.window_pool): table.window_pool for table in flushing}.values()
    waiting = []
    for steps in [*(table._flush_steps() for table in flushing), *(pool.asks() for pool in pools)]:
        try:
            waiting.append((steps, next(steps)))
        except StopIteration:
            pass
    while waiting:
        sizes = torch.cat([ask for _, ask in waiting]).tolist()
        start, going_on = 0, []
        for steps, ask in waiting:
            try:
                going_on.append((steps, steps.send(sizes[start : start + len(ask)])))
            except StopIteration:
                pass
            start += len(ask)
        waiting = going_on


def _group_key(row: Tensor, priority: Tensor) -> Tensor:
    """An int64 key whose ascending order is (row ascending, priority descending), for one stable sort."""
    if priority.dtype == torch.float64:  # random priorities: integers in [0, 2**31), exact in float64
        return row * (1 << 32) + ((1 << 31) - 1 - priority.long())
    bits = (priority.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    ascending = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)
    return row * (1 << 33) + ((1 << 31) - ascending)


def _class_key(row: Tensor, hashes: Tensor) -> Tensor:
    """A key of ``(row, context hash)`` pairs whose low bits are as uniform as the hash's."""
    return hashes ^ (row * signed64(0x9E3779B97F4A7C15))


@dataclass(frozen=True)
class MergePolicy:
    """When a table merges its staged samples and how big its pieces are; the kept samples never depend on it.

    Args:
        stage_limit: Staged samples that trigger a merge (``None``: a quarter of the table's size, at least
            ``min_stage_limit``). Lower trades speed for memory.
        min_stage_limit: The smallest default stage limit, so that small tables merge when read.
        min_pool_slots: Window pool slots a table starts with; the pool then doubles as samples are stored.
        merge_cells: Row places a merge works on at once (touched rows x places that can change): bounds its
            temporaries.
    """

    stage_limit: Optional[int] = None
    min_stage_limit: int = 1 << 14
    min_pool_slots: int = 1 << 10
    merge_cells: int = 1 << 22

    def stage_limit_for(self, places: int) -> int:
        """The stage limit of a table of ``places`` row places."""
        return max(places // 4, self.min_stage_limit) if self.stage_limit is None else self.stage_limit


DEFAULT_POLICY = MergePolicy()


class SampleTable:
    """Per row, the ``capacity`` samples with the largest priority.

    Samples that beat a row's last kept priority are staged and merged into the sorted rows when
    :attr:`stage_limit` samples wait, or before anything reads the table (:meth:`export`). A merge touches
    every row that received samples, so staging turns one re-sort of the rows per step into one per many
    steps; the kept samples are exactly those of a merge at every step.

    Args:
        rows: Number of rows (latents, or latent x interval pairs).
        capacity: Samples kept per row.
        window: Stored context window length ``2 * half_window + 1``.
        device: Where the table lives.
        random_priority: Priorities are hashes (integers below ``2**31``, held in float64) stored beside the
            activation values; otherwise the activation value is the priority.
        dedup_radius: De-duplicate contexts (see :mod:`lightning_sae_samples.engine.dedup`): samples of one sequence
            at most this many positions apart overlap. ``None`` keeps every sample.
        policy: When staged samples are merged, and in what pieces.
        token_dtype: Dtype of the stored context token ids (see :meth:`widen`).
        acts_dtype: Dtype of the stored context activations (see :meth:`widen`).
        window_fields: What the pool keeps per sample: :data:`WINDOW_FIELDS` (the window's tokens and
            activations), or :data:`REF_FIELDS` (a shuffled row's token ref, which gives the window later).
        pool: The window pool, shared with other tables keeping the same fields (``None``: a pool of its own).
    """

    def __init__(
        self,
        rows: int,
        capacity: int,
        window: int,
        device: torch.device,
        random_priority: bool = False,
        dedup_radius: Optional[int] = None,
        policy: MergePolicy = DEFAULT_POLICY,
        token_dtype: torch.dtype = torch.int16,
        acts_dtype: torch.dtype = torch.float32,
        window_fields: tuple[str, ...] = WINDOW_FIELDS,
        pool: Optional[WindowPool] = None,
    ) -> None:
        if window_fields not in (WINDOW_FIELDS, REF_FIELDS):
            raise ValueError(f"A sample table keeps {WINDOW_FIELDS} or {REF_FIELDS}, not {window_fields}.")
        if pool is not None and tuple(pool.fields) != window_fields:
            raise ValueError(f"A table keeping {window_fields} cannot share a pool of {tuple(pool.fields)}.")
        self.rows, self.capacity, self.window = rows, capacity, window
        self.window_fields = window_fields
        self.random_priority = random_priority
        self.dedup_radius = dedup_radius
        self.policy = policy
        self.stage_limit = policy.stage_limit_for(rows * capacity)
        shape = (rows, capacity)
        self.values = torch.full(shape, -math.inf, device=device)
        self.priority = torch.full(shape, -math.inf, dtype=torch.float64, device=device) if random_priority else None
        self.step = torch.full(shape, EMPTY, dtype=STEP_DTYPE, device=device)
        self.order = torch.full(shape, EMPTY, dtype=torch.int64, device=device)
        self.slot = torch.full(shape, EMPTY, dtype=SLOT_DTYPE, device=device)
        self.hash = torch.zeros(shape, dtype=torch.int64, device=device) if dedup_radius is not None else None
        #: The window fields of kept and staged samples, one row per pool slot (rows point at them through ``slot``).
        self.window_pool = pool if pool is not None else WindowPool(
            window_fields, window, device, policy.min_pool_slots, token_dtype, acts_dtype)
        self.window_pool.limit += rows * capacity + self.stage_limit
        self.fill_bound = 0
        #: Samples kept per row (they fill a prefix of it).
        self.fill = torch.zeros(rows, dtype=torch.int16 if capacity < 2**15 else torch.int32, device=device)
        self._bounds: Optional[Tensor] = None
        self._staged: list[dict[str, Tensor]] = []
        self._staged_count = 0
        self._floor: Optional[Tensor] = None

    @property
    def sort_key(self) -> Tensor:
        """The sorted priority column."""
        return self.priority if self.random_priority else self.values

    @property
    def pool(self) -> dict[str, Tensor]:
        """The window pool's fields: one row per slot, and a scratch row past them."""
        return self.window_pool.fields

    @property
    def pool_slots(self) -> int:
        """Slots the window pool holds now (it grows as samples are stored and staged)."""
        return self.window_pool.slots

    @property
    def released(self) -> Tensor:
        """The window pool's free slots."""
        return self.window_pool.released

    def widen(self, token_dtype: Optional[torch.dtype] = None, acts_dtype: Optional[torch.dtype] = None) -> None:
        """Let the pool hold token ids of ``token_dtype`` and activations of ``acts_dtype``, converting in place.

        See :meth:`WindowPool.widen`; a table keeping refs has neither.
        """
        self.window_pool.widen(token_dtype, acts_dtype)

    def clear(self) -> None:
        """Drop every sample, in place (the sorted keys keep their memory; the pool gets their slots back)."""
        self.window_pool.let_go(self.slot[:, : max(1, min(self.capacity, self.fill_bound))].reshape(-1))
        for part in self._staged:
            self.window_pool.let_go(part["slot"])
        for name in ("values", "priority", "step", "order", "slot", "hash"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor.fill_(SAMPLE_FIELD[name].fill if name != "slot" else EMPTY)
        self.fill_bound = 0
        self.fill.zero_()
        self._staged, self._staged_count = [], 0
        self._floor = None

    def can_enter(self, row: Tensor, priority: Tensor) -> Tensor:
        """Mask of the samples that may enter: strictly above their row's last kept priority.

        Equal ones lose to the earlier kept sample. Kept rows only get better, so a sample rejected now
        could never have entered, whatever is staged.
        """
        if self._floor is None:
            self._floor = self.sort_key[:, -1].contiguous()
        return priority > self._floor.index_select(0, row)  # on the CPU several times faster than _floor[row]

    def insert(
        self, row: Tensor, candidate: Tensor, priority: Tensor, value: Tensor, batch: BatchContext, flush: bool = True,
        alive: Optional[Tensor] = None,
    ) -> None:
        """Stage candidates of ``batch`` that passed :meth:`can_enter`, in token order.

        Their windows must be in ``batch.windows``: the batch writes them to the pool once, whichever tables stage
        them (see :meth:`BatchContext.slots_in`). Token order breaks ties among new samples. ``flush``: merge
        when :attr:`due`; ``False`` leaves it to the caller (see :func:`flush_tables`). ``alive``: with
        de-duplication, the candidates that survive stage 1 of its rule among the batch's entries (the
        others are staged but never enter, which spares a sync to drop them); ``None``: the table applies
        stage 1 to these candidates itself.
        """
        if not len(row):
            return
        slot = batch.slots_in(self.window_pool, candidate)
        staged = {
            "row": row,
            "sort": priority,
            "values": value,
            "step": torch.full_like(candidate, batch.step),
            "order": batch.orders[candidate],
            "slot": slot,
        }
        if self.dedup_radius is not None:
            if alive is None:
                sequence, position = batch.sequence_positions(batch.token_idx[candidate])
                rounds = OverlapRounds(row, sequence, position, priority, torch.ones_like(row, dtype=torch.bool),
                                       self.dedup_radius)
                alive = rounds.keep(rounds.sizes.tolist())
            staged["alive"] = alive
            staged["hash"] = batch.context_hashes(batch.window_of[candidate])
        self._staged.append(staged)
        self._staged_count += len(row)
        if flush and self.due:
            self.flush()

    @property
    def due(self) -> bool:
        """Whether the staged samples should be merged now (they reached :attr:`stage_limit`)."""
        return self._staged_count >= self.stage_limit

    def flush(self) -> None:
        """Merge the staged samples into the sorted rows."""
        flush_tables([self])

    def _flush_steps(self) -> Generator[Tensor, list[int], None]:
        """:meth:`flush` in two steps: it yields the sizes it must read back, and goes on when sent them."""
        parts = self._staged
        self._staged, self._staged_count = [], 0
        new = parts[0] if len(parts) == 1 else {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        if self.dedup_radius is not None:
            yield from self._resolve_classes(new)
        yield from self._merge(new)
        self._floor = None

    def _merge(self, new: dict[str, Tensor]) -> Generator[Tensor, list[int], None]:
        """Merge new samples (in arrival order) into the sorted rows, a chunk of touched rows at a time.

        The temporaries of a chunk are bounded by :attr:`MergePolicy.merge_cells` places, whatever the number of rows
        touched. Every size the merge needs is read back from the device at once (one host sync per merge). The
        samples that enter keep their pool slot; the pool gets back the slots of those pushed out and of the new
        samples that do not enter.
        """
        cap, dev = self.capacity, self.values.device
        # Sorted by row, then priority; a stable sort leaves ties in arrival order. Only a row's best
        # `capacity` new samples can enter.
        alive = new.get("alive")
        # Samples that must not enter (de-duplication dropped them) sort last in their row and count for nothing.
        sort = new["sort"] if alive is None else torch.where(alive, new["sort"], -math.inf)
        perm = torch.argsort(_group_key(new["row"], sort), stable=True)
        # index_select, not tensor[index]: on the CPU a 1-D gather by advanced indexing is several times slower.
        row = new["row"].index_select(0, perm)
        per_row = torch.zeros(self.rows, dtype=torch.int64, device=dev).index_add_(0, row, torch.ones_like(row))
        rank = torch.arange(len(row), device=dev) - (torch.cumsum(per_row, 0) - per_row)[row]
        if alive is not None:
            per_row = torch.zeros_like(per_row).index_add_(0, row, alive.index_select(0, perm).long())
        arriving = per_row.clamp(max=cap)
        fill = (self.fill + arriving).clamp(max=cap)
        touched = per_row > 0
        bounds = self._range_ends()
        sums = torch.stack([torch.cumsum(touched, 0), torch.cumsum(arriving, 0)])
        head = torch.stack([arriving.max(), fill.max()])
        sizes = yield torch.cat([head, sums.index_select(1, self._bounds_on(dev)).view(-1)])  # at once
        width, fill_bound, count = sizes[0], sizes[1], len(bounds)
        touched_end, kept_end = sizes[2 : 2 + count], sizes[2 + count : 2 + 2 * count]
        if not width:
            self.window_pool.let_go(new["slot"])
            return
        keep = indices_of(rank < (cap if alive is None else arriving[row]), kept_end[-1])
        perm, rank = perm.index_select(0, keep), rank.index_select(0, keep)
        staged_slot = new["slot"]
        new = {name: value.index_select(0, perm) for name, value in new.items() if name != "alive"}
        # New samples go into a grid only as wide as the most any row received (often far below capacity).
        # Only the first `span` places of a row can change: no row keeps more than `fill_bound` samples, so
        # places past `fill_bound + width` are empty before and after (sparse merges skip most of the rows' width).
        span = min(cap, self.fill_bound + width)
        first_row = [0, *[end + 1 for end in bounds[:-1]]]
        touched_start, kept_start = ([0, *column[:-1]] for column in (touched_end, kept_end))
        # Ranges of rows merged at once: consecutive ones while their touched rows' places fit `merge_cells`.
        lo, entered, pushed_out = 0, [], []
        for hi in range(1, count + 1):
            if hi < count and (touched_end[hi] - touched_start[lo]) * (span + width) <= self.policy.merge_cells:
                continue
            num_touched = touched_end[hi - 1] - touched_start[lo]
            if num_touched and lo == 0 and hi == count:  # one range: all rows, nothing to cut out
                entered.append(self._merge_rows(indices_of(touched, num_touched), new, rank, width, span,
                                                num_touched == self.rows, pushed_out))
            elif num_touched:
                r0, r1 = first_row[lo], bounds[hi - 1] + 1
                rows = indices_of(touched[r0:r1], num_touched) + r0
                part = slice(kept_start[lo], kept_end[hi - 1])
                entered.append(self._merge_rows(rows, {name: value[part] for name, value in new.items()},
                                                rank[part], width, span, num_touched == self.rows, pushed_out))
            lo = hi
        self.fill.copy_(fill)
        self.fill_bound = fill_bound
        # The staged samples that did not enter (cut before the merge, or that lost it) give their slots back, with
        # the kept samples they pushed out.
        entered = entered[0] if len(entered) == 1 else torch.cat(entered)
        stays = torch.zeros(len(staged_slot), dtype=torch.bool, device=dev).index_put_((perm,), entered)
        self.window_pool.let_go(torch.cat([torch.where(stays, EMPTY, staged_slot), *pushed_out]))

    def _range_ends(self) -> list[int]:
        """Last row of each range of rows that a merge may take at once whatever its width (at least one range)."""
        rows = max(1, self.policy.merge_cells // (2 * self.capacity))
        return [min(end, self.rows - 1) for end in range(rows - 1, self.rows + rows - 1, rows)] or [0]

    def _bounds_on(self, device: torch.device) -> Tensor:
        """:meth:`_range_ends` as a tensor on ``device``, made once."""
        if self._bounds is None:
            self._bounds = torch.tensor(self._range_ends(), dtype=torch.int64, device=device)
        return self._bounds

    def _merge_rows(
        self,
        touched: Tensor,
        new: dict[str, Tensor],
        rank: Tensor,
        width: int,
        span: int,
        all_rows: bool,
        pushed_out: list[Tensor],
    ) -> Tensor:
        """Merge into ``touched`` rows their new samples (sorted by row, then priority; ``rank`` within the row).

        Returns whether each of these samples entered; appends to ``pushed_out`` the pool slots of the kept samples
        pushed out (``EMPTY`` between them).
        """
        dev = self.values.device
        local_of = torch.full((self.rows,), EMPTY, dtype=torch.int64, device=dev)
        local_of[touched] = torch.arange(len(touched), device=dev)
        local = local_of.index_select(0, new["row"])
        grid = (len(touched), width)

        def to_grid(values: Tensor, fill: float) -> Tensor:
            out = torch.full(grid, fill, dtype=values.dtype, device=dev)
            out[local, rank] = values
            return out

        def places(name: str) -> Tensor:
            """The field's first ``span`` places of every row (a view)."""
            field = getattr(self, name)
            return field if span == field.shape[1] else field[:, :span]

        def kept(name: str) -> Tensor:
            # index_select, not [touched, :span]: on the CPU a row gather by advanced indexing is 2-3x slower.
            return places(name) if all_rows else places(name).index_select(0, touched)

        new_priority = to_grid(new["sort"].to(self.sort_key.dtype), -math.inf)
        # Merge two descending rows: a new sample lands after every old one greater or equal, and the old
        # ones fill the other places in order. Positions >= span (then = capacity) fall out.
        old_priority = kept("priority" if self.random_priority else "values")
        new_columns = torch.arange(width, device=dev)
        pos_new = new_columns + torch.searchsorted(-old_priority, -new_priority, right=True)
        taken = torch.zeros((grid[0], span + width), dtype=torch.bool, device=dev).scatter_(1, pos_new, True)
        pos_old = indices_of((~taken).view(-1), grid[0] * span).view(grid[0], span) % (span + width)
        old_slots = kept("slot")
        entered = (pos_new < span).sum(1, keepdim=True)
        # The samples pushed out are the last `entered` old ones of each row (EMPTY where the row was not full).
        last = span - entered + new_columns
        pushed_out.append(torch.where(new_columns < entered, torch.gather(old_slots, 1, last.clamp(max=span - 1)),
                                      EMPTY).view(-1))
        entered = entered.view(-1)
        pos_old.clamp_(max=span)
        pos_new.clamp_(max=span)

        # Each merged place takes an old place (row-major in the kept block) or an entering sample (numbered after
        # them): one map, then one gather per field. A new sample that does not enter lands past the span.
        source = torch.empty((grid[0], span + 1), dtype=torch.int64, device=dev)
        source.scatter_(1, pos_old, torch.arange(grid[0] * span, device=dev).view(grid[0], span))
        source.scatter_(1, pos_new, to_grid(torch.arange(grid[0] * span, grid[0] * span + len(rank), device=dev), 0))
        source = source[:, :span]
        fields = [("values", new["values"]), ("step", new["step"]), ("order", new["order"]), ("slot", new["slot"])]
        if self.random_priority:
            fields.append(("priority", new["sort"]))
        if self.hash is not None:
            fields.append(("hash", new["hash"]))
        for name, arriving in fields:
            sort_field = "priority" if self.random_priority else "values"
            old = old_slots if name == "slot" else old_priority if name == sort_field else kept(name)
            merged = torch.take(torch.cat([old.reshape(-1), arriving.to(old.dtype)]), source)
            if all_rows:
                places(name).copy_(merged)
            else:
                places(name).index_copy_(0, touched, merged)
        return rank < entered[local]

    def _resolve_classes(self, new: dict[str, Tensor]) -> Generator[Tensor, list[int], None]:
        """Stage 2 of the de-duplication rule: one sample per context class, over kept and staged samples.

        Staged samples come in arrival order; of a class, the best staged one survives, and it replaces a
        kept sample of its class only when strictly better (the kept one was seen earlier). Updates
        ``new["alive"]`` in place of dropping samples; yields the one size it reads back (the staged samples
        whose class a kept sample may hold).
        """
        row, hashes, alive = new["row"], new["hash"], new["alive"]
        priority = torch.where(alive, new["sort"], -math.inf)
        preference = torch.empty_like(row)
        preference[torch.argsort(_group_key(row, priority), stable=True)] = torch.arange(len(row), device=row.device)
        best = best_of_each_class(row, hashes, preference) & alive
        maybe = best & self._may_hold_class(row, hashes)
        (num_maybe,) = yield maybe.sum().view(1)
        at = indices_of(maybe, num_maybe)
        row, hashes = row[at], hashes[at]
        kept_class, column = self._kept_of_class(row, hashes)
        old_wins = kept_class & (self.sort_key[row, column] >= new["sort"][at].to(self.sort_key.dtype))
        self._evict(row, column, kept_class & ~old_wins)
        new["alive"] = best.index_put((at,), ~old_wins)

    def _may_hold_class(self, row: Tensor, hashes: Tensor) -> Tensor:
        """Whether a kept sample of each ``(row, hash)``'s row may have that context hash (False: it has not).

        A bit set of the kept ``(row, hash)`` pairs, over the places that can hold samples.
        """
        places = min(self.capacity, self.fill_bound)
        if not places or not len(row):
            return torch.zeros(len(row), dtype=torch.bool, device=row.device)
        size = 1 << min(max((self.rows * places).bit_length() + 3, 16), 27)
        kept_rows = torch.arange(self.rows, device=row.device).unsqueeze(1)
        keys = _class_key(kept_rows, self.hash[:, :places]) & (size - 1)
        bits = torch.zeros(size + 1, dtype=torch.bool, device=row.device)  # empty places set the spare last bit
        bits[torch.where(torch.isfinite(self.sort_key[:, :places]), keys, size).view(-1)] = True
        return bits[_class_key(row, hashes) & (size - 1)]

    def _kept_of_class(self, row: Tensor, hashes: Tensor) -> tuple[Tensor, Tensor]:
        """Whether each ``(row, hash)`` has a kept sample of its row with that context hash, and its column."""
        found = torch.zeros(len(row), dtype=torch.bool, device=row.device)
        column = torch.zeros_like(row)
        block = max(1, (1 << 22) // self.capacity)
        for start in range(0, len(row), block):
            part = slice(start, start + block)
            rows = row[part]
            same = (self.hash[rows] == hashes[part].unsqueeze(1)) & torch.isfinite(self.sort_key[rows])
            found[part] = same.any(1)
            column[part] = same.to(torch.int8).argmax(1)
        return found, column

    def _evict(self, rows: Tensor, columns: Tensor, evicted: Tensor) -> None:
        """Remove the ``evicted`` of these samples and re-sort their rows (the empty places move to the end).

        ``rows`` may repeat (each row is then re-sorted to the same result); the pool gets the evicted samples'
        slots back.
        """
        if not len(rows):
            return
        cap = self.capacity
        self.window_pool.let_go(torch.where(evicted, self.slot[rows, columns].long(), EMPTY))
        self.fill.index_add_(0, rows, -evicted.to(self.fill.dtype))
        gone = torch.zeros(self.rows * cap + 1, dtype=torch.bool, device=rows.device)
        gone[torch.where(evicted, rows * cap + columns, self.rows * cap)] = True
        gone = gone[:-1].view(self.rows, cap)[rows]
        perm = torch.argsort(torch.where(gone, -math.inf, self.sort_key[rows]), dim=1, descending=True, stable=True)
        for name in ("values", "priority", "step", "order", "slot", "hash"):
            tensor = getattr(self, name)
            if tensor is not None:
                fill = SAMPLE_FIELD[name].fill if name != "slot" else EMPTY
                tensor[rows] = torch.gather(torch.where(gone, fill, tensor[rows]), 1, perm)

    def export_padded(self, rows: slice = slice(None)) -> dict[str, Tensor]:
        """Rows as padded ``[rows, capacity, ...]`` tensors, samples best first (as new tensors).

        Every process exports the same shapes, as collectives need; :meth:`export` is the compact form.
        """
        self.flush()
        slot = self.slot[rows]
        filled = slot != EMPTY
        at = slot[filled].long()
        out = {"values": self.values[rows].clone(), "step": self.step[rows].long(), "order": self.order[rows].clone()}
        for name in self.window_fields:
            pool = self.pool[name]
            shape = (*slot.shape, *pool.shape[1:])
            padded = torch.full(shape, SAMPLE_FIELD[name].fill, dtype=pool.dtype, device=pool.device)
            padded[filled] = pool.index_select(0, at)
            out[name] = padded
        if self.random_priority:
            out["priority"] = self.priority[rows].clone()
        if self.hash is not None:
            out["hash"] = self.hash[rows].clone()
        return out

    def export(self, rows: slice = slice(None)) -> dict:
        """Rows in compact form: ``capacity``, per-row ``count`` and the kept samples packed row-major, best first.

        See :mod:`lightning_sae_samples.state.tables`. New tensors on the table's device.
        """
        self.flush()
        # Kept samples fill a prefix of each row, and no row more than `fill_bound` places.
        places = slice(0, max(1, min(self.capacity, self.fill_bound)))
        slot = self.slot[rows, places]
        filled = slot != EMPTY
        row, column = filled.nonzero(as_tuple=True)
        out: dict = {"capacity": self.capacity, "count": filled.sum(1, dtype=torch.int32)}
        for name in ("values", "step", "order", "priority", "hash"):
            tensor = getattr(self, name)
            if tensor is not None:
                out[name] = tensor[rows, places][row, column]
        out["step"] = out["step"].long()
        at = slot[row, column].long()
        for name in self.window_fields:
            out[name] = self.pool[name].index_select(0, at)
        return out

    def load(self, table: dict) -> None:
        """Fill the table from :meth:`export` output (any device); staged samples are dropped.

        Raises:
            ValueError: The table does not fit this one (rows, capacity, or sample fields).
        """
        self.clear()
        dev = self.values.device
        count = table["count"].to(device=dev, dtype=torch.int64)
        if count.shape != (self.rows,) or (len(count) and (int(count.max()) > self.capacity or int(count.min()) < 0)):
            raise ValueError(
                f"A sample table of {tuple(count.shape)} rows with up to {int(count.max()) if len(count) else 0}"
                f" samples per row cannot load into {self.rows} rows of capacity {self.capacity}."
            )
        total = int(count.sum())
        other = REF_FIELDS if self.window_fields == WINDOW_FIELDS else WINDOW_FIELDS
        if any(name in table for name in other if name != "position"):
            keeps = "token refs" if self.window_fields == REF_FIELDS else "windows"
            raise ValueError(f"This sample table keeps {keeps}, and the table to load does not.")
        if "context_tokens" in self.pool:
            for name, allowed in (("context_tokens", TOKEN_DTYPES), ("context_acts", ACTS_DTYPES)):
                dtype = table[name].dtype if isinstance(table.get(name), Tensor) else None
                if dtype not in allowed:
                    raise ValueError(f"Sample table field {name!r} has dtype {dtype}; expected one of {allowed}.")
            self.widen(table["context_tokens"].dtype, table["context_acts"].dtype if total else None)
        names = [n for n in ("values", "step", "order", "priority", "hash") if getattr(self, n) is not None]
        for name in (*names, *self.window_fields):
            trailing = (self.window,) if name.startswith("context_") else ()
            if name not in table or tuple(table[name].shape) != (total, *trailing):
                raise ValueError(f"Sample table field {name!r} is missing or not of shape {(total, *trailing)}.")
        row = torch.repeat_interleave(torch.arange(self.rows, device=dev), count)
        column = torch.arange(total, device=dev) - (torch.cumsum(count, 0) - count)[row]
        for name in names:
            target = getattr(self, name)
            target[row, column] = table[name].to(device=dev, dtype=target.dtype)
        slots = self.window_pool.write({name: table[name].to(device=dev) for name in self.window_fields})
        self.window_pool.hold(slots)
        self.slot[row, column] = slots.to(self.slot.dtype)
        self.fill_bound = int(count.max()) if len(count) else 0
        self.fill.copy_(count)
