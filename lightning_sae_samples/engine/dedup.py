"""Context de-duplication: the rule, and its vectorized pieces.

With ``deduplicate_contexts=True`` a latent's kept samples follow a two-stage rule, applied by the
collector and by the test oracle alike:

1. Within one sequence (one row of one step on one process), overlapping context windows
   (positions at most ``2 * half_window`` apart) are suppressed greedily: the best sample (value, then
   earliest position) is kept, those overlapping it are dropped, and so on.
2. Among the survivors of all sequences, samples with identical context tokens form one class; only the
   best of a class (value, then earliest ``(step, order)``) is kept.

The kept set is the top-k over these. Stage 1 only ever concerns one batch and stage 2 only needs, per
class, its best sample, so the rule streams exactly: the collector stores a hash of each kept sample's
context and replaces a kept sample when a better one of its class arrives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sae_samples.engine.hashing import mix64, signed64
from lightning_sae_samples.engine.indices import indices_of

_POWER_BASE = 1_000_003


def _powers(count: int) -> list[int]:
    return [signed64(_POWER_BASE**i) for i in range(count)]


def context_hash(windows: Tensor) -> Tensor:
    """A 64-bit hash of each window's tokens, ignoring the ``-1`` padding outside the sequence.

    Two samples get the same hash when their (clipped) context token lists are equal.

    Args:
        windows: Token ids ``[n, W]`` with ``-1`` where the window leaves the sequence.
    """
    valid = windows >= 0
    rank = torch.cumsum(valid, dim=1) - 1
    powers = torch.tensor(_powers(windows.shape[1] + 1), dtype=torch.int64, device=windows.device)
    terms = torch.where(valid, (windows.long() + 1) * powers[rank.clamp(min=0)], 0)
    return mix64(terms.sum(dim=1) + valid.sum(dim=1) * powers[-1])


class OverlapRounds:
    """Stage 1 of the rule for a batch's entries, in two halves around one host sync.

    The first half (the constructor) sorts the valid entries by (latent, sequence, position) and marks the
    crowded ones, those with another entry of their group within ``radius`` positions; :attr:`sizes` then holds
    what the second half needs: how many are crowded, the most in one group, and the largest position among them.
    The caller reads :attr:`sizes` back with its own (so the rounds add no sync of their own) and passes them to
    :meth:`keep`.

    The rounds resolve greedy suppression in parallel: each accepts the samples that no undecided better
    neighbour blocks and drops the neighbours of accepted ones, which gives exactly the sequential greedy
    result. Every round accepts the best undecided sample of each group that has one, and a group's accepted
    samples are more than ``radius`` apart, so it accepts at most ``A = min(its crowded samples,
    largest position // (radius + 1) + 1)``. After ``A`` rounds an undecided sample is therefore next to an
    accepted one (else a further round would accept it), and is dropped: ``A`` rounds run, with no check.

    Greedy suppression decides a sample from the better samples of its group only, so the samples above any
    per-latent floor keep the same decisions as among all valid entries: one pass serves every table that
    ranks a latent's samples by activation.

    Args:
        latent: Group of each entry (the table row).
        sequence: Sequence of each entry; a group is a (latent, sequence) pair.
        position: Position in the sequence (distinct within a group).
        value: Activation (better: larger, then earlier position).
        valid: Entries that take part; the others are kept as they are.
        radius: Samples at most this far apart overlap.
    """

    def __init__(self, latent: Tensor, sequence: Tensor, position: Tensor, value: Tensor, valid: Tensor,
                 radius: int) -> None:
        self.radius = radius
        n = len(latent)
        dev = latent.device
        perm = torch.argsort(position, stable=True)
        perm = perm[torch.argsort(sequence[perm], stable=True)]
        perm = perm[torch.argsort(torch.where(valid, latent, latent.max() + 1 if n else 0)[perm], stable=True)]
        self.perm = perm
        self.position, self.value = position[perm], value[perm]
        both = valid[perm]
        same = (latent[perm][1:] == latent[perm][:-1]) & (sequence[perm][1:] == sequence[perm][:-1])
        same &= both[1:] & both[:-1]
        # Sorted, a group's entries are consecutive: an id per group, and who overlaps a sorted neighbour.
        self.group = torch.cat([same.new_zeros(1, dtype=torch.int64), torch.cumsum(~same, 0)]) if n else perm
        close = same & (self.position[1:] - self.position[:-1] <= radius)
        crowded = torch.zeros(n, dtype=torch.bool, device=dev)
        if n > 1:
            crowded[1:] |= close
            crowded[:-1] |= close
        self.crowded = crowded
        per_group = torch.zeros(n + 1, dtype=torch.int64, device=dev).index_add_(0, self.group, crowded.long())
        largest = torch.where(crowded, self.position.long(), 0).max() if n else per_group.sum()
        #: ``[crowded samples, the most in one group, their largest position]``, to read back.
        self.sizes = torch.stack([crowded.sum(), per_group.max(), largest])

    def keep(self, sizes: list[int]) -> Tensor:
        """Mask of the entries kept, given :attr:`sizes` as read back (invalid entries read True)."""
        num_crowded, most, largest = sizes
        n, dev = len(self.perm), self.perm.device
        keep = torch.ones(n, dtype=torch.bool, device=dev)
        if not num_crowded or self.radius <= 0:
            return keep
        radius = self.radius
        rows = indices_of(self.crowded, num_crowded)
        offsets = torch.cat([torch.arange(-radius, 0, device=dev), torch.arange(1, radius + 1, device=dev)])
        neighbour = (rows.unsqueeze(1) + offsets).clamp(0, n - 1)
        g, p, v = self.group, self.position, self.value
        g_rows, p_rows, v_rows = g[rows].unsqueeze(1), p[rows].unsqueeze(1), v[rows].unsqueeze(1)
        near = (g[neighbour] == g_rows) & ((p[neighbour] - p_rows).abs() <= radius) & (neighbour != rows.unsqueeze(1))
        v_near, p_near = v[neighbour], p[neighbour]
        better = near & ((v_near > v_rows) | ((v_near == v_rows) & (p_near < p_rows)))
        # Decisions live on all samples (the uncrowded are accepted from the start); rounds update the crowded.
        undecided, accepted = self.crowded.clone(), ~self.crowded
        for _ in range(min(most, largest // (radius + 1) + 1)):
            undecided[rows] &= ~(near & accepted[neighbour]).any(1)
            newly = undecided[rows] & ~(better & undecided[neighbour]).any(1)
            accepted[rows] |= newly
            undecided[rows] &= ~newly
        keep[self.perm] = accepted
        return keep


def suppress_overlaps(group: Tensor, position: Tensor, value: Tensor, radius: int) -> Tensor:
    """Greedy suppression of overlapping samples within each group (stage 1 of the rule), on its own.

    Samples of a group are ranked by value descending, then position ascending; a sample is kept unless
    a kept sample of its group lies within ``radius`` positions (see :class:`OverlapRounds`).

    Returns:
        A boolean mask of the samples kept.
    """
    ones = torch.ones(len(group), dtype=torch.bool, device=group.device)
    rounds = OverlapRounds(group, torch.zeros_like(group), position, value, ones, radius)
    return rounds.keep(rounds.sizes.tolist())


def best_of_each_class(row: Tensor, key: Tensor, sort_key: Tensor) -> Tensor:
    """Mask of the first sample of each ``(row, key)`` class, given samples already in preference order.

    Args:
        row: Row of each sample.
        key: Class key (context hash) of each sample.
        sort_key: Position of each sample in preference order (ascending is better).
    """
    perm = torch.argsort(sort_key, stable=True)
    perm = perm[torch.argsort(key[perm], stable=True)]
    perm = perm[torch.argsort(row[perm], stable=True)]
    r, k = row[perm], key[perm]
    first = torch.ones(len(perm), dtype=torch.bool, device=row.device)
    first[1:] = (r[1:] != r[:-1]) | (k[1:] != k[:-1])
    keep = torch.zeros_like(first)
    keep[perm] = first
    return keep
