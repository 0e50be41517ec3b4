"""A table of rows, each keeping the samples with the largest priority, updated without Python loops.

The collector uses one table for every kind of kept sample: the exact top activations of each latent
(priority = activation), random samples per activation interval (priority = a hash of where the sample
was seen, so the kept ones are a uniform sample that any process or resume reproduces), and the top
activations of the recent window.

Per row, ``priority``/``value``/``step``/``order`` are kept sorted (best first; among equal priorities the
earliest ``(step, order)`` first) with a ``slot`` pointer into an unordered pool that holds each sample's
position and context window. An insert re-sorts only the small keys of the rows it touches and writes
context windows only for the samples that enter.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_sae_samples.dedup import best_of_each_class, context_hash, suppress_overlaps

EMPTY = -1
TABLE_FIELDS = ("values", "step", "order", "position", "context_tokens", "context_acts")


class BatchContext:
    """One batch's candidate samples, and their context windows computed once for all tables.

    Args:
        tokens: Token ids ``[B, T]`` on the tables' device.
        token_idx: Flat token index (``b * T + t``) of each candidate, ascending.
        latent: Latent of each candidate.
        step: Global optimizer step.
        order_base: Order key of the batch's first token (``rank << 40 | offset within the step``).
        half_window: Context tokens kept on each side of the activating one.
        window_acts: ``(token index [S], latent [S]) -> [S, W]`` activations of each sample's latent on its
            context tokens (anything where the window leaves the sequence).
    """

    def __init__(
        self,
        tokens: Tensor,
        token_idx: Tensor,
        latent: Tensor,
        step: int,
        order_base: int,
        half_window: int,
        window_acts: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        self.tokens, self.token_idx, self.latent = tokens, token_idx, latent
        self.step, self.order_base, self.half_window = step, order_base, half_window
        self.window_acts = window_acts
        self._done: Optional[Tensor] = None
        self._window_tokens: Optional[Tensor] = None
        self._window_acts: Optional[Tensor] = None
        self._padded: Optional[Tensor] = None

    def window_tokens(self, token_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids of each sample's window ``[S, W]`` (``-1`` outside the sequence) and where it is inside."""
        seq = self.tokens.shape[1]
        width = 2 * self.half_window + 1
        if self._padded is None:
            self._padded = torch.nn.functional.pad(self.tokens, (self.half_window, self.half_window), value=EMPTY)
        position = token_idx % seq
        start = (token_idx // seq) * (seq + 2 * self.half_window) + position
        columns = torch.arange(width, device=token_idx.device)
        tokens = self._padded.reshape(-1)[start.unsqueeze(1) + columns]
        shifted = columns - self.half_window
        inside = (shifted >= -position.unsqueeze(1)) & (shifted < (seq - position).unsqueeze(1))
        return tokens, inside

    def contexts(self, candidate: Tensor) -> tuple[Tensor, Tensor]:
        """Window token ids and activations of candidates; each candidate's window is computed once."""
        if self._done is None:
            count, width = len(self.token_idx), 2 * self.half_window + 1
            self._done = torch.zeros(count, dtype=torch.bool, device=self.token_idx.device)
            self._window_tokens = torch.empty((count, width), dtype=torch.int32, device=self.token_idx.device)
            self._window_acts = torch.empty((count, width), device=self.token_idx.device)
        missing = candidate[~self._done[candidate]]
        if not len(missing):
            return self._window_tokens[candidate], self._window_acts[candidate]
        token_idx = self.token_idx[missing]
        window_tokens, inside = self.window_tokens(token_idx)
        acts = self.window_acts(token_idx, self.latent[missing])
        window_tokens = window_tokens.to(torch.int32)
        acts = torch.where(inside & torch.isfinite(acts), acts, 0.0)
        self._window_tokens[missing] = window_tokens
        self._window_acts[missing] = acts
        self._done[missing] = True
        if len(missing) == len(candidate):
            return window_tokens, acts
        return self._window_tokens[candidate], self._window_acts[candidate]


def _group_key(row: Tensor, priority: Tensor) -> Tensor:
    """An int64 key whose ascending order is (row ascending, priority descending), for one stable sort."""
    if priority.dtype == torch.float64:  # random priorities: integers in [0, 2**31), exact in float64
        return row * (1 << 32) + ((1 << 31) - 1 - priority.long())
    bits = (priority.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    ascending = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)
    return row * (1 << 33) + ((1 << 31) - ascending)


class SampleTable:
    """Per row, the ``capacity`` samples with the largest priority.

    Args:
        rows: Number of rows (latents, or latent x interval pairs).
        capacity: Samples kept per row.
        window: Stored context window length ``2 * half_window + 1``.
        device: Where the table lives.
        random_priority: Priorities are hashes (integers below ``2**31``, held in float64) stored beside the
            activation values; otherwise the activation value is the priority.
        dedup_radius: De-duplicate contexts (see :mod:`lightning_sae_samples.dedup`): samples of one sequence
            at most this many positions apart overlap. ``None`` keeps every sample.
    """

    def __init__(
        self,
        rows: int,
        capacity: int,
        window: int,
        device: torch.device,
        random_priority: bool = False,
        dedup_radius: Optional[int] = None,
    ) -> None:
        self.rows, self.capacity, self.window = rows, capacity, window
        self.random_priority = random_priority
        self.dedup_radius = dedup_radius
        shape = (rows, capacity)
        self.values = torch.full(shape, -math.inf, device=device)
        self.priority = torch.full(shape, -math.inf, dtype=torch.float64, device=device) if random_priority else None
        self.step = torch.full(shape, EMPTY, dtype=torch.int64, device=device)
        self.order = torch.full(shape, EMPTY, dtype=torch.int64, device=device)
        self.slot = torch.arange(capacity, dtype=torch.int64, device=device).repeat(rows, 1)
        self.pool_position = torch.full(shape, EMPTY, dtype=torch.int32, device=device)
        self.pool_context_tokens = torch.full((*shape, window), EMPTY, dtype=torch.int32, device=device)
        self.pool_context_acts = torch.zeros((*shape, window), device=device)
        self.hash = torch.zeros(shape, dtype=torch.int64, device=device) if dedup_radius is not None else None

    @property
    def sort_key(self) -> Tensor:
        """The sorted priority column."""
        return self.priority if self.random_priority else self.values

    def clear(self) -> None:
        """Drop every sample."""
        fresh = SampleTable(
            self.rows, self.capacity, self.window, self.values.device, self.random_priority, self.dedup_radius
        )
        self.__dict__.update(fresh.__dict__)

    def insert(self, row: Tensor, candidate: Tensor, priority: Tensor, value: Tensor, batch: BatchContext) -> None:
        """Offer candidates of ``batch`` to rows; each row keeps its best ``capacity`` over old and new samples.

        Candidates must come in token order (as in ``batch``), which breaks ties among new samples.
        """
        cap, dev = self.capacity, self.values.device
        # Only samples strictly above the row's last priority can enter (equal ones lose to the earlier).
        beats = priority > self.sort_key[row, -1]
        row, candidate, priority, value = (t[beats] for t in (row, candidate, priority, value))
        hashes = None
        if self.dedup_radius is not None:
            row, candidate, priority, value, hashes = self._deduplicate(row, candidate, priority, value, batch)
        perm = torch.argsort(_group_key(row, priority), stable=True)
        row, candidate, priority, value = (t[perm] for t in (row, candidate, priority, value))
        hashes = hashes[perm] if hashes is not None else None
        per_row = torch.bincount(row, minlength=self.rows)
        rank = torch.arange(len(row), device=dev) - (torch.cumsum(per_row, 0) - per_row)[row]
        keep = rank < cap
        row, candidate, priority, value, rank = (t[keep] for t in (row, candidate, priority, value, rank))
        token_idx = batch.token_idx[candidate]
        hashes = hashes[keep] if hashes is not None else None

        touched = (per_row > 0).nonzero(as_tuple=True)[0]
        if not len(touched):
            return
        local_of = torch.full((self.rows,), EMPTY, dtype=torch.int64, device=dev)
        local_of[touched] = torch.arange(len(touched), device=dev)
        local = local_of[row]
        # New samples go into a grid only as wide as the most any row received (usually far below capacity).
        width = int(rank.max()) + 1
        grid = (len(touched), width)
        new_priority = torch.full(grid, -math.inf, dtype=self.sort_key.dtype, device=dev)
        new_priority[local, rank] = priority.to(new_priority.dtype)
        new_values = torch.full(grid, -math.inf, device=dev)
        new_values[local, rank] = value
        new_tokens = torch.zeros(grid, dtype=torch.int64, device=dev)
        new_tokens[local, rank] = token_idx

        # Merge two descending rows: an old sample moves down by the new ones strictly greater; a new one
        # lands after every old one greater or equal. Positions >= capacity fall out.
        old_priority = self.sort_key[touched]
        pos_old = torch.arange(cap, device=dev) + torch.searchsorted(-new_priority, -old_priority, right=False)
        new_columns = torch.arange(width, device=dev)
        pos_new = new_columns + torch.searchsorted(-old_priority, -new_priority, right=True)
        entered = (pos_new < cap).sum(1, keepdim=True)
        # The samples pushed out are the last `entered` old ones; new samples take over their pool slots.
        old_slots = self.slot[touched]
        freed = torch.gather(old_slots, 1, (cap - entered + new_columns).clamp(max=cap - 1))
        pos_old.clamp_(max=cap)
        pos_new.clamp_(max=cap)

        fields = [
            ("values", self.values[touched], new_values),
            ("step", self.step[touched], torch.full(grid, batch.step, dtype=torch.int64, device=dev)),
            ("order", self.order[touched], batch.order_base + new_tokens),
            ("slot", old_slots, freed),
        ]
        if self.random_priority:
            fields.append(("priority", old_priority, new_priority))
        if hashes is not None:
            new_hash = torch.zeros(grid, dtype=torch.int64, device=dev)
            new_hash[local, rank] = hashes
            fields.append(("hash", self.hash[touched], new_hash))
        all_rows = len(touched) == self.rows
        for name, old, new in fields:
            merged = torch.empty((grid[0], cap + 1), dtype=old.dtype, device=dev)
            merged.scatter_(1, pos_old, old)
            merged.scatter_(1, pos_new, new)
            if all_rows:
                getattr(self, name).copy_(merged[:, :cap])
            else:
                getattr(self, name)[touched] = merged[:, :cap]

        enters = rank < entered[local, 0]
        slot = freed[local[enters], rank[enters]]
        row, candidate, token_idx = row[enters], candidate[enters], token_idx[enters]
        window_tokens, window_acts = batch.contexts(candidate)
        self.pool_position[row, slot] = (token_idx % batch.tokens.shape[1]).to(torch.int32)
        self.pool_context_tokens[row, slot] = window_tokens
        self.pool_context_acts[row, slot] = window_acts

    def _deduplicate(
        self, row: Tensor, candidate: Tensor, priority: Tensor, value: Tensor, batch: BatchContext
    ) -> tuple[Tensor, ...]:
        """Apply the de-duplication rule to candidates (in token order); evict kept samples they replace."""
        nseq, seq = batch.tokens.shape
        token_idx = batch.token_idx[candidate]
        keep = suppress_overlaps(row * nseq + token_idx // seq, token_idx % seq, priority, self.dedup_radius)
        row, candidate, priority, value, token_idx = (t[keep] for t in (row, candidate, priority, value, token_idx))
        hashes = context_hash(batch.window_tokens(token_idx)[0])
        preference = torch.empty_like(row)
        preference[torch.argsort(_group_key(row, priority), stable=True)] = torch.arange(len(row), device=row.device)
        keep = best_of_each_class(row, hashes, preference)
        row, candidate, priority, value, hashes = (t[keep] for t in (row, candidate, priority, value, hashes))
        same = (self.hash[row] == hashes.unsqueeze(1)) & torch.isfinite(self.sort_key[row])
        kept_class = same.any(1)
        column = same.to(torch.int8).argmax(1)
        # A kept sample of the class wins ties: it was seen earlier.
        old_wins = kept_class & (self.sort_key[row, column] >= priority)
        replaced = kept_class & ~old_wins
        self._evict(row[replaced], column[replaced])
        keep = ~old_wins
        return tuple(t[keep] for t in (row, candidate, priority, value, hashes))

    def _evict(self, rows: Tensor, columns: Tensor) -> None:
        """Remove samples and re-sort their rows (the freed slots move to the end)."""
        if not len(rows):
            return
        slots = self.slot[rows, columns]
        self.values[rows, columns] = -math.inf
        if self.random_priority:
            self.priority[rows, columns] = -math.inf
        self.step[rows, columns] = EMPTY
        self.order[rows, columns] = EMPTY
        self.hash[rows, columns] = 0
        self.pool_position[rows, slots] = EMPTY
        self.pool_context_tokens[rows, slots] = EMPTY
        self.pool_context_acts[rows, slots] = 0.0
        touched = rows.unique()
        perm = torch.argsort(self.sort_key[touched], dim=1, descending=True, stable=True)
        for name in ("values", "priority", "step", "order", "slot", "hash"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor[touched] = torch.gather(tensor[touched], 1, perm)

    def export(self, rows: slice = slice(None)) -> dict[str, Tensor]:
        """Rows in canonical form (samples best first), as new tensors on the table's device."""
        slot = self.slot[rows]
        window_slot = slot.unsqueeze(-1).expand(-1, -1, self.window)
        out = {
            "values": self.values[rows].clone(),
            "step": self.step[rows].clone(),
            "order": self.order[rows].clone(),
            "position": torch.gather(self.pool_position[rows], 1, slot),
            "context_tokens": torch.gather(self.pool_context_tokens[rows], 1, window_slot),
            "context_acts": torch.gather(self.pool_context_acts[rows], 1, window_slot),
        }
        if self.random_priority:
            out["priority"] = self.priority[rows].clone()
        if self.hash is not None:
            out["hash"] = self.hash[rows].clone()
        return out

    def load(self, exported: dict[str, Tensor]) -> None:
        """Fill the table from :meth:`export` output (any device)."""
        for name in ("values", "step", "order"):
            getattr(self, name).copy_(exported[name])
        if self.random_priority:
            self.priority.copy_(exported["priority"])
        if self.hash is not None:
            self.hash.copy_(exported["hash"])
        self.slot.copy_(torch.arange(self.capacity).repeat(self.rows, 1))
        self.pool_position.copy_(exported["position"])
        self.pool_context_tokens.copy_(exported["context_tokens"])
        self.pool_context_acts.copy_(exported["context_acts"])


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
