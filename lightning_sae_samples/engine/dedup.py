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

_POWER_BASE = 1_000_003
ROUNDS_PER_CHECK = 4


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


def suppress_overlaps(group: Tensor, position: Tensor, value: Tensor, radius: int) -> Tensor:
    """Greedy suppression of overlapping samples within each group (stage 1 of the rule).

    Samples of a group are ranked by value descending, then position ascending; a sample is kept unless
    a kept sample of its group lies within ``radius`` positions. Resolved in parallel rounds: each round
    accepts the samples that no undecided better neighbour blocks and drops the neighbours of accepted
    ones, which gives exactly the sequential greedy result.

    Args:
        group: Group id per sample (one group per latent and sequence); positions are distinct within a group.
        position: Position in the sequence.
        value: Activation.
        radius: Samples at most this far apart overlap.

    Returns:
        A boolean mask of the samples kept.
    """
    n = len(group)
    keep = torch.ones(n, dtype=torch.bool, device=group.device)
    if n < 2 or radius <= 0:
        return keep
    by_position = torch.argsort(position, stable=True)
    perm = by_position[torch.argsort(group[by_position], stable=True)]
    g, p, v = group[perm], position[perm], value[perm]
    # Sorted by (group, position), a sample overlaps nobody iff neither sorted neighbour is in its group
    # within the radius; only the others need the rounds below.
    close = (g[1:] == g[:-1]) & (p[1:] - p[:-1] <= radius)
    crowded = torch.zeros(n, dtype=torch.bool, device=group.device)
    crowded[1:] |= close
    crowded[:-1] |= close
    rows = crowded.nonzero(as_tuple=True)[0]
    if not len(rows):
        return keep
    offsets = torch.cat([torch.arange(-radius, 0), torch.arange(1, radius + 1)]).to(group.device)
    neighbour = (rows.unsqueeze(1) + offsets).clamp(0, n - 1)
    g_rows, p_rows, v_rows = g[rows].unsqueeze(1), p[rows].unsqueeze(1), v[rows].unsqueeze(1)
    near = (g[neighbour] == g_rows) & ((p[neighbour] - p_rows).abs() <= radius) & (neighbour != rows.unsqueeze(1))
    v_near, p_near = v[neighbour], p[neighbour]
    better = near & ((v_near > v_rows) | ((v_near == v_rows) & (p_near < p_rows)))
    # Decisions live on all samples (uncrowded ones are accepted from the start); rounds update the crowded.
    undecided, accepted = crowded.clone(), ~crowded
    # Rounds go in fours between checks (a round after the last changes nothing), so a host sync per four rounds.
    while True:
        for _ in range(ROUNDS_PER_CHECK):
            undecided[rows] &= ~(near & accepted[neighbour]).any(1)
            newly = undecided[rows] & ~(better & undecided[neighbour]).any(1)
            accepted[rows] |= newly
            undecided[rows] &= ~newly
        if not bool(undecided[rows].any()):
            break
    keep[perm] = accepted
    return keep


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
