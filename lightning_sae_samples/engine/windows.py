"""Which entries of a batch are collected, and the context windows of those that may be kept."""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from lightning_sae_samples.engine.sample_table import acts_dtype_for

DENSE_SCAN_ELEMENTS = 1 << 23


DENSE_GROUP = 32


def above_threshold(values: Tensor, threshold: float) -> Tensor:
    """Mask of ``values > threshold`` evaluated exactly, whatever the dtype of ``values``.

    Comparing a bf16/fp16/fp32 tensor with a Python float rounds the threshold to the tensor's dtype
    first, which can admit or drop values equal to the rounded threshold. This picks ``>`` or ``>=``
    against the rounded threshold so the result equals the comparison in exact arithmetic.
    """
    rounded, inclusive = _rounded_threshold(float(threshold), values.dtype)
    return values >= rounded if inclusive else values > rounded


@functools.lru_cache(maxsize=64)
def _rounded_threshold(threshold: float, dtype: torch.dtype) -> tuple[float, bool]:
    """``threshold`` rounded to ``dtype``, and whether ``>=`` against it equals ``>`` against the exact one.

    Cached: a collection asks with the same threshold and dtype every time, and pays no tensor op for it.
    """
    rounded = float(torch.tensor(threshold, dtype=torch.float64).to(dtype))
    return rounded, rounded > threshold


def dense_hits(rows: Tensor, threshold: float) -> Tensor:
    """Flat indices (row-major, ascending) of the entries of a contiguous ``[n, F]`` block above ``threshold``.

    Columns are read in groups of up to :data:`DENSE_GROUP`: a group's maximum says whether any of its
    entries is above the threshold (a NaN maximum is looked into as well), and only those groups are
    compared entry by entry. With sparse rows (ReLU or TopK latents) few groups are, so most entries are
    read once, by the maximum.
    """
    n, f = rows.shape
    group = math.gcd(f, DENSE_GROUP)
    peak = rows.view(n, f // group, group).amax(dim=2)
    opened = (above_threshold(peak, threshold) | torch.isnan(peak)).view(-1).nonzero(as_tuple=True)[0]
    inside, column = above_threshold(rows.view(-1, group).index_select(0, opened), threshold).nonzero(as_tuple=True)
    return opened[inside] * group + column


def padding_positions(tokens: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """``[B, T]`` bool, True at padding: a negative token id, or 0/False in ``attention_mask``."""
    padding = tokens < 0
    if attention_mask is not None:
        padding = padding | ~attention_mask.to(device=tokens.device, dtype=torch.bool)
    return padding


class TokenPositions:
    """Which positions of a ``[B, T]`` batch are collected, and the segment each one belongs to.

    Padding (``attention_mask`` 0/False, or a negative token id) is not collected and does not count as
    seen; excluded positions count as seen but are not collected. Segments split each sequence at its
    padding: a context window reaches only tokens of its own segment, as if each padding position were a
    sequence edge.

    Args:
        tokens: Token ids ``[B, T]``.
        attention_mask: ``[B, T]``, 0/False at padding, or ``None``.
        excluded: ``[B, T]`` bool, True at positions not to collect, or ``None``.
    """

    def __init__(
        self, tokens: Tensor, attention_mask: Optional[Tensor] = None, excluded: Optional[Tensor] = None
    ) -> None:
        batch, seq = tokens.shape
        padding = padding_positions(tokens, attention_mask)
        collect = ~padding if excluded is None else ~padding & ~excluded.to(tokens.device)
        self.tokens = tokens
        self.collect = collect.reshape(-1)
        self.num_seen = (~padding).sum()
        index = torch.arange(batch * seq, device=tokens.device).view(batch, seq)
        # Unmasked tokens: the sequence and the count of padding positions before them (each padding
        # position starts a new segment); padding: a negative id of its own, shared with nothing.
        inside = (index // seq) * (seq + 1) + torch.cumsum(padding, dim=1)
        self.segment = torch.where(padding, -1 - index, inside).reshape(-1)


class SparseWindowActs:
    """Activations of each sample's latent on its context tokens, read from TopK-style latents.

    Active entries sorted by (latent, token) put a sample's neighbours of the same latent right next to it,
    and further entries are further away; walking out one entry at a time therefore finds every one inside
    the window, and a sample leaves the walk at its first miss (usually the first step).

    Args:
        indices: Active latents ``[N, k]`` of the batch's ``N`` tokens.
        values: Their activations ``[N, k]``.
        entry: Flat index into ``indices`` of each candidate sample.
        picked: Activation of each candidate sample (finite).
        segment: Segment id of each token ``[N]`` (see :func:`token_segments`): a window reaches only the
            tokens of its own segment.
        half_window: Context tokens on each side.
    """

    def __init__(
        self, indices: Tensor, values: Tensor, entry: Tensor, picked: Tensor, segment: Tensor, half_window: int
    ) -> None:
        self.indices, self.values, self.entry, self.picked = indices, values.reshape(-1), entry, picked
        self.segment, self.half = segment, half_window
        self._sorted: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None

    def _sort(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._sorted is None:
            num_tokens, k = self.indices.shape
            # Entries come in token order, so a stable sort by latent orders them by (latent, token).
            latent, order = torch.sort(self.indices.reshape(-1).to(torch.int32), stable=True)
            token = order // k
            keys = latent.long() * num_tokens + token
            where = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
            segment = self.segment[token]
            linked = (
                (latent[1:] == latent[:-1]) & (segment[1:] == segment[:-1]) & (keys[1:] - keys[:-1] <= self.half)
            )
            self._sorted = keys, order, where, linked
        return self._sorted

    def __call__(self, candidate: Tensor) -> Tensor:
        """Window activations ``[S, 2 * half_window + 1]`` of candidates (0 outside their segment)."""
        keys, order, where, linked = self._sort()
        half, last = self.half, len(keys) - 1
        at = where[self.entry[candidate]]
        dtype = acts_dtype_for(self.values.dtype)
        acts = torch.zeros((len(candidate), 2 * half + 1), dtype=dtype, device=candidate.device)
        acts[:, half] = self.picked[candidate].to(dtype)
        if last < 1:  # one active entry in the whole batch: no neighbour to walk to
            return acts
        for direction in (1, -1):
            # `linked[i]`: sorted entries i and i + 1 are the same latent, in one segment, within the window.
            if direction == 1:
                starts = linked[at.clamp(max=last - 1)] & (at < last)
            else:
                starts = linked[(at - 1).clamp(min=0)] & (at > 0)
            walking = starts.nonzero(as_tuple=True)[0]
            own = keys[at[walking]]
            for distance in range(1, half + 1):
                neighbour = (at[walking] + direction * distance).clamp(0, last)
                offset = keys[neighbour] - own
                hit = (offset != 0) & (offset.abs() <= half)
                if distance > 1:
                    hit &= linked[torch.minimum(neighbour, neighbour - direction)]
                # One nonzero (one host sync) selects the samples still walking from all four tensors.
                going = hit.nonzero(as_tuple=True)[0]
                if not len(going):
                    break
                walking, neighbour, offset, own = (t.index_select(0, going) for t in (walking, neighbour, offset, own))
                found = self.values[order[neighbour]].to(dtype)
                acts[walking, half + offset] = torch.where(torch.isfinite(found), found, 0.0)
        return acts
