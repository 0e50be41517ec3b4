"""A table of rows, each keeping the samples with the largest priority, updated without Python loops.

The collector uses one table for every kind of kept sample: the exact top activations of each latent
(priority = activation), random samples per activation interval (priority = a hash of where the sample
was seen, so the kept ones are a uniform sample that any process or resume reproduces), and the top
activations of the recent window.

Per row, ``priority``/``value``/``step``/``order`` are kept sorted (best first; among equal priorities the
earliest ``(step, order)`` first) with a ``slot`` pointer into a pool shared by all rows that holds each
sample's position and context window. Samples that can enter are staged and merged in bulk: a merge
re-sorts only the small keys of the rows it touches and copies context windows only for the samples that
enter, into the slots of the samples they push out or else into never used slots, taken in arrival order
(so the pool fills front to back).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_sae_samples.dedup import best_of_each_class, context_hash, suppress_overlaps
from lightning_sae_samples.hashing import signed64

EMPTY = -1
MIN_STAGE_LIMIT = 1 << 14
WINDOW_FIELDS = ("position", "context_tokens", "context_acts")
TABLE_FIELDS = ("values", "step", "order", *WINDOW_FIELDS)


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
    ) -> None:
        self.tokens, self.token_idx, self.segment = tokens, token_idx, segment
        self.step, self.order_base, self.half_window = step, order_base, half_window
        self.window_acts = window_acts
        self.windows: dict[str, Tensor] = {}
        self.window_of: Optional[Tensor] = None
        self._hashes: Optional[Tensor] = None

    def window_tokens(self, token_idx: Tensor) -> Tensor:
        """Token ids of each sample's window ``[S, W]`` (int32, ``-1`` outside the sequence or segment)."""
        seq = self.tokens.shape[1]
        half = self.half_window
        start = token_idx + (token_idx // seq) * (2 * half)

        def windows(values: Tensor) -> Tensor:
            padded = torch.nn.functional.pad(values.view(-1, seq), (half, half), value=EMPTY)
            return padded.reshape(-1).unfold(0, 2 * half + 1, 1).index_select(0, start)

        tokens = windows(self.tokens.to(torch.int32))
        if self.segment is None:
            return tokens
        same = windows(self.segment) == self.segment[token_idx].unsqueeze(1)
        return torch.where(same, tokens, EMPTY)

    def compute_windows(self, candidate: Tensor) -> None:
        """Compute the windows of these candidates (the union of what every table may keep), once."""
        token_idx = self.token_idx[candidate]
        self.windows = {
            "position": (token_idx % self.tokens.shape[1]).to(torch.int32),
            "context_tokens": self.window_tokens(token_idx),
            "context_acts": self.window_acts(candidate),
        }
        self.window_of = torch.full_like(self.token_idx, EMPTY)
        self.window_of[candidate] = torch.arange(len(candidate), device=candidate.device)

    def context_hashes(self, window: Tensor) -> Tensor:
        """:func:`~lightning_sae_samples.dedup.context_hash` of windows, computed once per batch."""
        if self._hashes is None:
            self._hashes = context_hash(self.windows["context_tokens"])
        return self._hashes[window]


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
        dedup_radius: De-duplicate contexts (see :mod:`lightning_sae_samples.dedup`): samples of one sequence
            at most this many positions apart overlap. ``None`` keeps every sample.
        stage_limit: Staged samples that trigger a merge; defaults to a quarter of the table's size.
    """

    def __init__(
        self,
        rows: int,
        capacity: int,
        window: int,
        device: torch.device,
        random_priority: bool = False,
        dedup_radius: Optional[int] = None,
        stage_limit: Optional[int] = None,
    ) -> None:
        self.rows, self.capacity, self.window = rows, capacity, window
        self.random_priority = random_priority
        self.dedup_radius = dedup_radius
        self.stage_limit = max(rows * capacity // 4, MIN_STAGE_LIMIT) if stage_limit is None else stage_limit
        shape, size = (rows, capacity), rows * capacity
        self.values = torch.full(shape, -math.inf, device=device)
        self.priority = torch.full(shape, -math.inf, dtype=torch.float64, device=device) if random_priority else None
        self.step = torch.full(shape, EMPTY, dtype=torch.int64, device=device)
        self.order = torch.full(shape, EMPTY, dtype=torch.int64, device=device)
        self.slot = torch.full(shape, EMPTY, dtype=torch.int64, device=device)
        self.hash = torch.zeros(shape, dtype=torch.int64, device=device) if dedup_radius is not None else None
        self.pool_position = torch.full((size,), EMPTY, dtype=torch.int32, device=device)
        self.pool_context_tokens = torch.full((size, window), EMPTY, dtype=torch.int32, device=device)
        self.pool_context_acts = torch.zeros((size, window), device=device)
        self.next_unused = 0
        self.released = torch.empty(0, dtype=torch.int64, device=device)
        self._staged: list[dict[str, Tensor]] = []
        self._staged_windows: list[dict[str, Tensor]] = []
        self._staged_count = 0
        self._floor: Optional[Tensor] = None

    @property
    def sort_key(self) -> Tensor:
        """The sorted priority column."""
        return self.priority if self.random_priority else self.values

    def clear(self) -> None:
        """Drop every sample."""
        fresh = SampleTable(
            self.rows,
            self.capacity,
            self.window,
            self.values.device,
            self.random_priority,
            self.dedup_radius,
            self.stage_limit,
        )
        self.__dict__.update(fresh.__dict__)

    def can_enter(self, row: Tensor, priority: Tensor) -> Tensor:
        """Mask of the samples that may enter: strictly above their row's last kept priority.

        Equal ones lose to the earlier kept sample. Kept rows only get better, so a sample rejected now
        could never have entered, whatever is staged.
        """
        if self._floor is None:
            self._floor = self.sort_key[:, -1].contiguous()
        return priority > self._floor[row]

    def insert(self, row: Tensor, candidate: Tensor, priority: Tensor, value: Tensor, batch: BatchContext) -> None:
        """Stage candidates of ``batch`` that passed :meth:`can_enter`, in token order.

        Their windows must be in ``batch.windows``. Token order breaks ties among new samples.
        """
        if not len(row):
            return
        token_idx = batch.token_idx[candidate]
        if self.dedup_radius is not None:
            nseq, seq = batch.tokens.shape
            keep = suppress_overlaps(row * nseq + token_idx // seq, token_idx % seq, priority, self.dedup_radius)
            row, candidate, priority, value, token_idx = (
                t[keep] for t in (row, candidate, priority, value, token_idx)
            )
        window = batch.window_of[candidate]
        staged = {
            "row": row,
            "sort": priority,
            "values": value,
            "step": torch.full_like(token_idx, batch.step),
            "order": batch.order_base + token_idx,
            "window": window,
        }
        if self.dedup_radius is not None:
            staged["hash"] = batch.context_hashes(window)
        self._staged.append(staged)
        self._staged_windows.append(batch.windows)
        self._staged_count += len(row)
        if self._staged_count >= self.stage_limit:
            self.flush()

    def flush(self) -> None:
        """Merge the staged samples into the sorted rows."""
        if not self._staged:
            return
        parts, windows = self._staged, self._staged_windows
        self._staged, self._staged_windows, self._staged_count = [], [], 0
        new = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
        new["source"] = torch.arange(len(new["row"]), device=new["row"].device)
        arrivals = [(batch_windows, part["window"]) for batch_windows, part in zip(windows, parts)]
        if self.dedup_radius is not None:
            new = self._resolve_classes(new)
        self._merge(new, arrivals)
        self._floor = None

    def _merge(self, new: dict[str, Tensor], arrivals: list[tuple[dict[str, Tensor], Tensor]]) -> None:
        """Merge new samples (in arrival order) into the sorted rows.

        ``new["source"]`` is each sample's arrival index. Arrivals come in parts, one per insert; each part
        is its batch's windows and, per arrival, the index of its window there.
        """
        cap, dev = self.capacity, self.values.device
        # Sorted by row, then priority; a stable sort leaves ties in arrival order. Only a row's best
        # `capacity` new samples can enter.
        perm = torch.argsort(_group_key(new["row"], new["sort"]), stable=True)
        row = new["row"][perm]
        per_row = torch.bincount(row, minlength=self.rows)
        rank = torch.arange(len(row), device=dev) - (torch.cumsum(per_row, 0) - per_row)[row]
        keep = rank < cap
        perm, rank = perm[keep], rank[keep]
        new = {name: value[perm] for name, value in new.items()}
        row = new["row"]
        touched = (per_row > 0).nonzero(as_tuple=True)[0]
        if not len(touched):
            return
        all_rows = len(touched) == self.rows
        local_of = torch.full((self.rows,), EMPTY, dtype=torch.int64, device=dev)
        local_of[touched] = torch.arange(len(touched), device=dev)
        local = local_of[row]
        # New samples go into a grid only as wide as the most any row received (often far below capacity).
        width = int(rank.max()) + 1
        grid = (len(touched), width)

        def to_grid(values: Tensor, fill: float) -> Tensor:
            out = torch.full(grid, fill, dtype=values.dtype, device=dev)
            out[local, rank] = values
            return out

        def kept(name: str) -> Tensor:
            return getattr(self, name) if all_rows else getattr(self, name)[touched]

        new_priority = to_grid(new["sort"].to(self.sort_key.dtype), -math.inf)
        # Merge two descending rows: a new sample lands after every old one greater or equal, and the old
        # ones fill the other places in order. Positions >= capacity fall out.
        old_priority = kept("priority" if self.random_priority else "values")
        new_columns = torch.arange(width, device=dev)
        pos_new = new_columns + torch.searchsorted(-old_priority, -new_priority, right=True)
        taken = torch.zeros((grid[0], cap + width), dtype=torch.bool, device=dev).scatter_(1, pos_new, True)
        pos_old = (~taken).nonzero(as_tuple=True)[1].view(grid[0], cap)
        entered = (pos_new < cap).sum(1, keepdim=True)
        pos_old.clamp_(max=cap)
        pos_new.clamp_(max=cap)
        # The samples pushed out are the last `entered` old ones: new samples take over their pool slots,
        # or never used (or released) ones where they were empty.
        old_slots = kept("slot")
        new_slots = torch.gather(old_slots, 1, (cap - entered + new_columns).clamp(max=cap - 1))
        enters = rank < entered[local, 0]
        source = new["source"][enters]
        at = local[enters] * width + rank[enters]
        slot = new_slots.view(-1)[at]
        fresh = (slot == EMPTY).nonzero(as_tuple=True)[0]
        arrived = sum(len(index) for _, index in arrivals)
        if len(fresh):
            # Never used slots go in arrival order, so the windows of one batch land side by side.
            in_arrival = torch.zeros(arrived, dtype=torch.int64, device=dev).index_fill_(0, source[fresh], 1)
            turn = torch.cumsum(in_arrival, 0)[source[fresh]] - 1
            slot[fresh] = self._take_slots(len(fresh))[turn]
            new_slots.view(-1)[at] = slot

        fields = [
            ("values", kept("values"), to_grid(new["values"], -math.inf)),
            ("step", kept("step"), to_grid(new["step"], EMPTY)),
            ("order", kept("order"), to_grid(new["order"], EMPTY)),
            ("slot", old_slots, new_slots),
        ]
        if self.random_priority:
            fields.append(("priority", old_priority, new_priority))
        if self.hash is not None:
            fields.append(("hash", kept("hash"), to_grid(new["hash"], 0)))
        for name, old, fresh_grid in fields:
            merged = torch.empty((grid[0], cap + 1), dtype=old.dtype, device=dev)
            merged.scatter_(1, pos_old, old)
            merged.scatter_(1, pos_new, fresh_grid)
            if all_rows:
                getattr(self, name).copy_(merged[:, :cap])
            else:
                getattr(self, name)[touched] = merged[:, :cap]

        destination = torch.full((arrived,), EMPTY, dtype=torch.int64, device=dev)
        self._write_windows(destination.index_copy_(0, source, slot), arrivals)

    def _write_windows(self, destination: Tensor, arrivals: list[tuple[dict[str, Tensor], Tensor]]) -> None:
        """Copy the windows of entering samples into the pool; ``destination``: pool slot per arrival, or -1."""
        start = 0
        for windows, index in arrivals:
            part = destination[start : start + len(index)]
            start += len(index)
            entering = (part != EMPTY).nonzero(as_tuple=True)[0]
            if not len(entering):
                continue
            for name in WINDOW_FIELDS:
                pool = getattr(self, f"pool_{name}")
                pool.index_copy_(0, part[entering], windows[name].index_select(0, index[entering]))

    def _resolve_classes(self, new: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage 2 of the de-duplication rule: one sample per context class, over kept and staged samples.

        Staged samples come in arrival order; of a class, the best staged one survives, and it replaces a
        kept sample of its class only when strictly better (the kept one was seen earlier).
        """
        row, priority, hashes = new["row"], new["sort"], new["hash"]
        preference = torch.empty_like(row)
        preference[torch.argsort(_group_key(row, priority), stable=True)] = torch.arange(len(row), device=row.device)
        best = best_of_each_class(row, hashes, preference)
        new = {name: value[best] for name, value in new.items()}
        row, priority, hashes = new["row"], new["sort"], new["hash"]
        kept_class, column = self._kept_of_class(row, hashes)
        old_wins = kept_class & (self.sort_key[row, column] >= priority.to(self.sort_key.dtype))
        replaced = kept_class & ~old_wins
        self._evict(row[replaced], column[replaced])
        survive = ~old_wins
        return {name: value[survive] for name, value in new.items()}

    def _take_slots(self, count: int) -> Tensor:
        """Pool slots for new samples: released ones first, then never used ones in order."""
        reused = min(count, len(self.released))
        taken, self.released = self.released[:reused], self.released[reused:]
        unused = torch.arange(self.next_unused, self.next_unused + count - reused, device=self.slot.device)
        self.next_unused += count - reused
        return torch.cat([taken, unused])

    def _kept_of_class(self, row: Tensor, hashes: Tensor) -> tuple[Tensor, Tensor]:
        """Whether each ``(row, hash)`` has a kept sample of its row with that context hash, and its column.

        A bit set of the kept ``(row, hash)`` pairs first rules out most pairs; the rest are compared with
        their row's kept hashes.
        """
        found = torch.zeros(len(row), dtype=torch.bool, device=row.device)
        column = torch.zeros_like(row)
        filled = torch.isfinite(self.sort_key)
        kept = filled.view(-1).nonzero(as_tuple=True)[0]
        if not len(kept) or not len(row):
            return found, column
        size = 1 << min(max(int(len(kept)).bit_length() + 3, 16), 27)
        bits = torch.zeros(size, dtype=torch.bool, device=row.device)
        bits[_class_key(kept // self.capacity, self.hash.view(-1)[kept]) & (size - 1)] = True
        maybe = bits[_class_key(row, hashes) & (size - 1)].nonzero(as_tuple=True)[0]
        block = max(1, (1 << 22) // self.capacity)
        for start in range(0, len(maybe), block):
            part = maybe[start : start + block]
            same = (self.hash[row[part]] == hashes[part].unsqueeze(1)) & filled[row[part]]
            found[part] = same.any(1)
            column[part] = same.to(torch.int8).argmax(1)
        return found, column

    def _evict(self, rows: Tensor, columns: Tensor) -> None:
        """Remove samples, free their pool slots and re-sort their rows (the empty places move to the end)."""
        if not len(rows):
            return
        self.released = torch.cat([self.released, self.slot[rows, columns]])
        self.values[rows, columns] = -math.inf
        if self.random_priority:
            self.priority[rows, columns] = -math.inf
        self.step[rows, columns] = EMPTY
        self.order[rows, columns] = EMPTY
        self.slot[rows, columns] = EMPTY
        self.hash[rows, columns] = 0
        touched = rows.unique()
        perm = torch.argsort(self.sort_key[touched], dim=1, descending=True, stable=True)
        for name in ("values", "priority", "step", "order", "slot", "hash"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor[touched] = torch.gather(tensor[touched], 1, perm)

    def export(self, rows: slice = slice(None)) -> dict[str, Tensor]:
        """Rows in canonical form (samples best first), as new tensors on the table's device."""
        self.flush()
        slot = self.slot[rows]
        filled = slot != EMPTY
        at = slot.clamp(min=0)
        out = {
            "values": self.values[rows].clone(),
            "step": self.step[rows].clone(),
            "order": self.order[rows].clone(),
            "position": torch.where(filled, self.pool_position[at], EMPTY),
            "context_tokens": torch.where(filled.unsqueeze(-1), self.pool_context_tokens[at], EMPTY),
            "context_acts": torch.where(filled.unsqueeze(-1), self.pool_context_acts[at], 0.0),
        }
        if self.random_priority:
            out["priority"] = self.priority[rows].clone()
        if self.hash is not None:
            out["hash"] = self.hash[rows].clone()
        return out

    def load(self, exported: dict[str, Tensor]) -> None:
        """Fill the table from :meth:`export` output (any device); staged samples are dropped."""
        self._staged, self._staged_windows, self._staged_count = [], [], 0
        self._floor = None
        for name in ("values", "step", "order"):
            getattr(self, name).copy_(exported[name])
        if self.random_priority:
            self.priority.copy_(exported["priority"])
        if self.hash is not None:
            self.hash.copy_(exported["hash"])
        filled = torch.isfinite(self.sort_key)
        kept = filled.view(-1).nonzero(as_tuple=True)[0]
        self.slot.view(-1).fill_(EMPTY).index_copy_(0, kept, torch.arange(len(kept), device=kept.device))
        self.next_unused = len(kept)
        self.released = self.released[:0]
        for name in WINDOW_FIELDS:
            pool = getattr(self, f"pool_{name}")
            pool[: len(kept)] = exported[name].to(pool.device).reshape(len(pool), *pool.shape[1:])[kept]


def sort_samples(priority: Tensor, step: Tensor, order: Tensor) -> Tensor:
    """Indices that order samples along the last dim by priority desc, then ``(step, order)`` asc."""
    perm = torch.argsort(order, dim=-1, stable=True)
    perm = torch.gather(perm, -1, torch.argsort(torch.gather(step, -1, perm), dim=-1, stable=True))
    by_priority = torch.argsort(torch.gather(priority, -1, perm), dim=-1, descending=True, stable=True)
    return torch.gather(perm, -1, by_priority)


def merge_exported(a: dict[str, Tensor], b: dict[str, Tensor], capacity: int) -> dict[str, Tensor]:
    """Exactly merge two exported tables with the same rows: each row keeps its best ``capacity`` of both."""
    key = "priority" if "priority" in a else "values"
    both = {name: torch.cat([a[name], b[name]], dim=1) for name in a}
    best = sort_samples(both[key], both["step"], both["order"])
    if "hash" in both:
        # De-duplicated tables: of samples with the same context, only the best stays.
        hashes = torch.gather(both["hash"], 1, best)
        filled = torch.isfinite(torch.gather(both[key], 1, best))
        by_hash = torch.argsort(hashes, dim=1, stable=True)
        sorted_hash = torch.gather(hashes, 1, by_hash)
        repeat = torch.zeros_like(filled)
        repeat[:, 1:] = sorted_hash[:, 1:] == sorted_hash[:, :-1]
        duplicate = torch.zeros_like(filled).scatter(1, by_hash, repeat) & filled
        best = torch.gather(best, 1, torch.argsort(duplicate.to(torch.int8), dim=1, stable=True))
    best = best[:, :capacity]
    out = {}
    for name, value in both.items():
        index = best if value.dim() == 2 else best.unsqueeze(-1).expand(-1, -1, value.shape[-1])
        out[name] = torch.gather(value, 1, index)
    return out
