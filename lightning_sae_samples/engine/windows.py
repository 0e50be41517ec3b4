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
    rounded, inclusive = rounded_threshold(float(threshold), values.dtype)
    return values >= rounded if inclusive else values > rounded


def finite(values: Tensor) -> Tensor:
    """``torch.isfinite(values)`` in two operators; NaN compares false.

    ``torch.isfinite`` dispatches five: an equality, an absolute value, a comparison, a product and an and.
    """
    return values.abs() < math.inf


@functools.lru_cache(maxsize=64)
def rounded_threshold(threshold: float, dtype: torch.dtype) -> tuple[float, bool]:
    """``threshold`` rounded to ``dtype``, and whether ``>=`` against it equals ``>`` against the exact one.

    Cached: a collection asks with the same threshold and dtype every time, and pays no tensor op for it.
    """
    rounded = float(torch.tensor(threshold, dtype=torch.float64).to(dtype))
    return rounded, rounded > threshold


def dense_hits(flat: Tensor, threshold: float, collect: Tensor) -> tuple[Tensor, Tensor]:
    """Flat indices (row-major, ascending) of the entries of a contiguous ``[n, F]`` block above ``threshold``.

    Columns are read in groups of up to :data:`DENSE_GROUP`: a group's maximum says whether any of its
    entries is above the threshold (a NaN maximum is looked into as well), and only those groups are
    compared entry by entry. With sparse rows (ReLU or TopK latents) few groups are, so most entries are
    read once, by the maximum. Rows are read :data:`DENSE_SCAN_ELEMENTS` entries at a time, which bounds the
    temporaries; the groups opened in all of them are found at once, and their entries above the threshold too
    (two host syncs, whatever the size).

    Also returns, per row, whether it is collected and holds a non-finite value (its sum is then non-finite).
    """
    n, f = flat.shape
    group = math.gcd(f, DENSE_GROUP)
    block = max(1, DENSE_SCAN_ELEMENTS // f)
    opened, bad = [], []
    for start in range(0, n, block):
        rows = flat[start : start + block]
        peak = rows.view(len(rows), f // group, group).amax(dim=2)
        opened.append((above_threshold(peak, threshold) | torch.isnan(peak)).view(-1))
        bad.append(~finite(rows.sum(dim=1)) & collect[start : start + block])
    if not opened:
        return torch.empty(0, dtype=torch.int64, device=flat.device), collect.new_zeros(0)
    groups = torch.cat(opened).nonzero(as_tuple=True)[0]
    entries = flat.view(-1, group)
    inside = torch.cat([above_threshold(entries.index_select(0, part), threshold)
                        for part in groups.split(max(1, DENSE_SCAN_ELEMENTS // group))]
                       or [torch.zeros((0, group), dtype=torch.bool, device=flat.device)])
    at, column = inside.nonzero(as_tuple=True)
    return groups[at] * group + column, torch.cat(bad)


@functools.lru_cache(maxsize=16)
def window_offsets(half_window: int, device: torch.device) -> Tensor:
    """``-half_window .. half_window``, made once per device (every collection reads windows with them)."""
    return torch.arange(-half_window, half_window + 1, device=device)


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
        real = ~padding
        collect = real if excluded is None else real & ~excluded.to(tokens.device)
        self.tokens = tokens
        #: ``[B, T]``: True at the positions collected.
        self.collect = collect
        self.num_seen = real.sum()
        # Segments are numbered in token order: within a sequence, the c-th padding position takes 2c and the
        # tokens after it 2c + 1 (those before any padding 1); sequences take ranges apart.
        #: Segment ids are below this.
        self.num_segments = batch * (2 * seq + 2)
        first = torch.arange(0, self.num_segments, 2 * seq + 2, device=tokens.device).unsqueeze(1)
        self.segment = torch.add(first, torch.cumsum(padding, dim=1), alpha=2).add_(real).reshape(-1)


class SparseWindowActs:
    """Activations of each sample's latent on its context tokens, read from TopK-style latents.

    Active entries sorted by (latent, token) put a sample's neighbours of the same latent right next to it, and
    further entries further away: a neighbour inside the window is at most ``half_window`` sorted places away, and
    its key (see below) at most ``half_window`` from the sample's. Only the samples with such a neighbour
    (:meth:`walking`) look at their ``2 * half_window`` nearest sorted places.

    Args:
        indices: Active latents of the batch's entries ``[N * k]``, ``k`` a token, in token order.
        values: Their activations ``[N * k]``.
        k: Entries per token.
        segment: Segment id of each token ``[N]`` (see :class:`TokenPositions`): a window reaches only the
            tokens of its own segment. Ids ascend with the token, from 0 up.
        half_window: Context tokens on each side.
        num_segments: Segment ids are below this.

    A sample is a flat index into ``indices`` (an entry).
    """

    def __init__(self, indices: Tensor, values: Tensor, k: int, segment: Tensor, half_window: int,
                 num_segments: int) -> None:
        self.values, self.half = values, half_window
        num_tokens = len(segment)
        # Entries come in token order, so a stable sort by latent orders them by (latent, token); int32 sorts
        # twice as fast as the int64 keys would.
        latent, order = torch.sort(indices.to(torch.int32), stable=True)
        # A key per entry, ascending in (latent, token), in which entries of another latent or segment lie more
        # than `half_window` apart: segments (numbered in token order) and latents are spread out by gaps. Two
        # entries whose keys are at most `half_window` apart are thus of one latent and segment, inside each
        # other's window, and so is every entry sorted between them.
        gap = half_window + 1
        place = torch.add(torch.arange(num_tokens, device=segment.device), segment, alpha=gap)
        self.keys = torch.add(place[order // k], latent, alpha=num_tokens + gap * (num_segments + 1))
        self.order = order
        linked = self.keys[1:] - self.keys[:-1] <= half_window
        # Linked to the entry before or to the one after.
        self._near = torch.nn.functional.pad(linked, (1, 0)) | torch.nn.functional.pad(linked, (0, 1))

    def walking(self, entering: Tensor) -> Tensor:
        """Of the ``entering`` entries, those with another entry of their latent inside their window.

        ``entering`` is a mask in entry order; the result one in sorted order, whose places :meth:`__call__` takes.
        """
        return self._near & entering[self.order]

    def __call__(self, candidate: Tensor, walking: Tensor) -> Tensor:
        """Window activations ``[S, 2 * half_window + 1]`` of candidate entries (0 outside their segment).

        ``walking``: the sorted places of the candidates with a neighbour (the True places of :meth:`walking`, of
        entries in ``candidate``); the others get their own activation alone.
        """
        half = self.half
        dtype = acts_dtype_for(self.values.dtype)
        # Columns 0 and 2 * half + 2 are scratch, for the places that fall outside the window: never read.
        own = self.values[candidate].to(dtype).unsqueeze(1)
        acts = torch.nn.functional.pad(own, (half + 1, half + 1))
        at = walking.unsqueeze(1)
        steps = window_offsets(half, at.device)
        # Clamped places repeat the first or last entry, which then writes its own value twice.
        neighbour = (at + steps).clamp_(0, len(self.keys) - 1)
        keys = self.keys[neighbour]
        column = (keys - keys[:, half : half + 1]).add_(half + 1).clamp_(0, 2 * half + 2)
        found = torch.nan_to_num(self.values[self.order[neighbour]].to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
        acts.index_put_((torch.searchsorted(candidate, self.order[at]), column), found)
        return acts[:, 1 : 2 * half + 2]
