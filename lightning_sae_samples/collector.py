"""The tensor engine: exact per-latent top-k samples and streaming statistics, in pure torch.

Nothing here knows about Lightning. One call to :meth:`SampleCollector.update` folds one batch of
latent activations into the state with a fixed number of vectorized tensor operations; there is no
Python loop over latents, tokens or samples, sparse (TopK) latents are never densified, and no value
is copied to the host.

Exactness. For every latent the state holds the ``K`` largest activations strictly above the
threshold over everything seen, ordered by value descending and, among equal values, by the
earliest ``(step, order)`` where ``order = rank << 40 | token offset within the step on that rank``.
Within one process new tokens always come after the kept ones, so a stable sort of
``[kept, new]`` realises the tie-break; :func:`merge_collectors` sorts explicitly by the keys and is
exact for states from different processes or runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

FORMAT_VERSION = 1
RANK_SHIFT = 40
EMPTY = -1
HISTOGRAM_BINS = 40
HISTOGRAM_MAX = 1e4
HISTOGRAM_MIN_FLOOR = 1e-3

_TOP_FIELDS = ("top_values", "top_step", "top_order", "top_position", "top_context_tokens", "top_context_acts")
_STAT_FIELDS = ("count", "sum", "sum_sq", "max", "min", "hist", "first_step", "last_step")
PER_LATENT_FIELDS = (*_TOP_FIELDS, *_STAT_FIELDS)


def histogram_edges(threshold: float, num_bins: int = HISTOGRAM_BINS) -> Tensor:
    """Fixed log-spaced bin edges for activation histograms.

    The edges run from ``max(threshold, 1e-3)`` to ``1e4``; values outside fall into the first or
    last bin. Fixed edges make histograms of different processes and resumed runs add up exactly.
    """
    low = max(float(threshold), HISTOGRAM_MIN_FLOOR)
    if low >= HISTOGRAM_MAX:
        low = HISTOGRAM_MAX / 10
    return torch.logspace(math.log10(low), math.log10(HISTOGRAM_MAX), num_bins + 1, dtype=torch.float64)


def above_threshold(values: Tensor, threshold: float) -> Tensor:
    """Mask of ``values > threshold`` evaluated exactly, whatever the dtype of ``values``.

    Comparing a bf16/fp16/fp32 tensor with a Python float rounds the threshold to the tensor's dtype
    first, which can admit or drop values equal to the rounded threshold. This picks ``>`` or ``>=``
    against the rounded threshold so the result equals the comparison in exact arithmetic.
    """
    rounded = torch.tensor(threshold, dtype=torch.float64).to(values.dtype)
    if float(rounded) > threshold:
        mask = values >= rounded.item()
    else:
        mask = values > rounded.item()
    return mask


@dataclass
class CollectorConfig:
    """Shape of a collector's state.

    Args:
        num_latents: Number of latents ``F``.
        max_samples: Top samples kept per latent ``K``.
        context_size: Context tokens around the activating one (``context_size // 2`` on each side).
        threshold: An activation counts only if strictly greater than this.
    """

    num_latents: int
    max_samples: int
    context_size: int
    threshold: float

    @property
    def half_window(self) -> int:
        """Tokens kept on each side of the activating token."""
        return self.context_size // 2

    @property
    def window(self) -> int:
        """Length of a stored context window (activating token at index ``half_window``)."""
        return 2 * self.half_window + 1


def _group_key(latent_idx: Tensor, values: Tensor) -> Tensor:
    """An int64 key whose ascending order is (latent ascending, value descending), for one stable sort."""
    bits = (values.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    ascending = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)
    return latent_idx * (1 << 33) + ((1 << 31) - ascending)


class SampleCollector:
    """Exact top-k activating contexts and streaming statistics for every latent.

    Layout: per latent, ``top_values``/``top_step``/``top_order`` are kept sorted (best first) with a
    ``top_slot`` pointer into an unordered pool holding each sample's position and context window.
    An update re-sorts only the small per-sample keys of the latents it touches and writes context
    windows only for samples that enter the top, so its cost follows the number of activations, not
    ``F x K`` context windows.

    Args:
        config: Sizes and threshold.
        device: Where the state lives; put it on the latents' device.
        hist_edges: Histogram bin edges; defaults to :func:`histogram_edges` of the threshold.
    """

    def __init__(
        self,
        config: CollectorConfig,
        device: torch.device | str = "cpu",
        hist_edges: Optional[Tensor] = None,
    ) -> None:
        self.config = config
        device = torch.device(device)
        num_latents, k, w = config.num_latents, config.max_samples, config.window
        edges = histogram_edges(config.threshold) if hist_edges is None else hist_edges
        self.hist_edges = edges.to(torch.float64).cpu()
        self._inner_edges = self.hist_edges[1:-1].to(device=device, dtype=torch.float32)
        num_bins = len(self.hist_edges) - 1

        self.top_values = torch.full((num_latents, k), -math.inf, device=device)
        self.top_step = torch.full((num_latents, k), EMPTY, dtype=torch.int64, device=device)
        self.top_order = torch.full((num_latents, k), EMPTY, dtype=torch.int64, device=device)
        self.top_slot = torch.arange(k, dtype=torch.int64, device=device).repeat(num_latents, 1)
        self.pool_position = torch.full((num_latents, k), EMPTY, dtype=torch.int32, device=device)
        self.pool_context_tokens = torch.full((num_latents, k, w), EMPTY, dtype=torch.int32, device=device)
        self.pool_context_acts = torch.zeros((num_latents, k, w), device=device)

        self.count = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.sum = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.max = torch.full((num_latents,), -math.inf, device=device)
        self.min = torch.full((num_latents,), math.inf, device=device)
        self.hist = torch.zeros((num_latents, num_bins), dtype=torch.int64, device=device)
        self.first_step = torch.full((num_latents,), EMPTY, dtype=torch.int64, device=device)
        self.last_step = torch.full((num_latents,), EMPTY, dtype=torch.int64, device=device)
        self.tokens_seen = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.steps_collected = 0
        self.first_collected_step = EMPTY
        self.last_collected_step = EMPTY

    @property
    def device(self) -> torch.device:
        """Device of the state tensors."""
        return self.top_values.device

    # ------------------------------------------------------------------ update
    def update_dense(self, tokens: Tensor, latents: Tensor, step: int, order_base: int = 0) -> None:
        """Fold dense latents into the state.

        Args:
            tokens: Token ids ``[B, T]``.
            latents: Activations ``[B, T, F]`` (any float dtype, any device).
            step: Global optimizer step of this batch.
            order_base: Order key of the batch's first token (``rank << 40 | offset``).
        """
        batch, seq = tokens.shape
        flat = latents.detach().reshape(batch * seq, self.config.num_latents)
        token_idx, latent_idx = above_threshold(flat, self.config.threshold).nonzero(as_tuple=True)
        values = flat[token_idx, latent_idx].float()
        finite = torch.isfinite(values)
        token_idx, latent_idx, values = token_idx[finite], latent_idx[finite], values[finite]
        # A row sum is non-finite iff the row holds a NaN or an infinity (or overflows): one cheap read
        # of the latents; the exact count is then taken on those rows only.
        bad_rows = ~torch.isfinite(flat.sum(dim=1))
        self.nonfinite_skipped += (~torch.isfinite(flat[bad_rows])).sum()

        def window_acts(rows: Tensor, latent: Tensor) -> Tensor:
            return flat[rows, latent.unsqueeze(1).expand_as(rows)].float()

        self._fold(tokens, token_idx, latent_idx, values, step, order_base, window_acts)

    def update_sparse(
        self, tokens: Tensor, indices: Tensor, values: Tensor, step: int, order_base: int = 0
    ) -> None:
        """Fold TopK-style sparse latents into the state without densifying them.

        Args:
            tokens: Token ids ``[B, T]``.
            indices: Active latent indices ``[B, T, k]``.
            values: Their activations ``[B, T, k]``.
            step: Global optimizer step of this batch.
            order_base: Order key of the batch's first token (``rank << 40 | offset``).
        """
        batch, seq = tokens.shape
        flat_idx = indices.detach().reshape(batch * seq, -1)
        flat_val = values.detach().reshape(batch * seq, -1)
        token_idx, slot = above_threshold(flat_val, self.config.threshold).nonzero(as_tuple=True)
        latent_idx = flat_idx[token_idx, slot].long()
        picked = flat_val[token_idx, slot].float()
        self.nonfinite_skipped += (~torch.isfinite(flat_val)).sum()
        finite = torch.isfinite(picked)
        token_idx, latent_idx, picked = token_idx[finite], latent_idx[finite], picked[finite]

        def window_acts(rows: Tensor, latent: Tensor) -> Tensor:
            # Look up (token, latent) pairs among the k active entries of each token: one sort of the
            # B*T*k active keys, then a binary search per context position of the samples that entered.
            num_latents = self.config.num_latents
            keys = (torch.arange(batch * seq, device=flat_idx.device).unsqueeze(1) * num_latents + flat_idx).view(-1)
            sorted_keys, order = torch.sort(keys)
            query = rows * num_latents + latent.unsqueeze(1)
            at = torch.searchsorted(sorted_keys, query).clamp(max=len(sorted_keys) - 1)
            found = sorted_keys[at] == query
            return torch.where(found, flat_val.reshape(-1)[order[at]].float(), 0.0)

        self._fold(tokens, token_idx, latent_idx, picked, step, order_base, window_acts)

    def _fold(self, tokens, token_idx, latent_idx, values, step, order_base, window_acts) -> None:
        cfg = self.config
        dev = self.device
        k = cfg.max_samples
        token_idx, latent_idx, values = token_idx.to(dev), latent_idx.to(dev), values.to(dev)
        self.tokens_seen += tokens.numel()
        if self.first_collected_step == EMPTY:
            self.first_collected_step = step
        if self.last_collected_step != step:
            self.steps_collected += 1
            self.last_collected_step = step

        self._update_statistics(latent_idx, values, step)

        # Candidates that can enter the top: strictly above the latent's current K-th value (an equal
        # value loses the tie to the earlier sample already kept).
        beats = values > self.top_values[latent_idx, -1]
        token_idx, latent_idx, values = token_idx[beats], latent_idx[beats], values[beats]
        perm = torch.argsort(_group_key(latent_idx, values), stable=True)
        token_idx, latent_idx, values = token_idx[perm], latent_idx[perm], values[perm]
        per_latent = torch.bincount(latent_idx, minlength=cfg.num_latents)
        rank = torch.arange(len(latent_idx), device=dev) - (torch.cumsum(per_latent, 0) - per_latent)[latent_idx]
        keep = rank < k
        token_idx, latent_idx, values, rank = token_idx[keep], latent_idx[keep], values[keep], rank[keep]

        touched = (per_latent > 0).nonzero(as_tuple=True)[0]
        row_of = torch.full((cfg.num_latents,), EMPTY, dtype=torch.int64, device=dev)
        row_of[touched] = torch.arange(len(touched), device=dev)
        row = row_of[latent_idx]
        grid = (len(touched), k)
        new_values = torch.full(grid, -math.inf, device=dev)
        new_values[row, rank] = values
        new_tokens = torch.zeros(grid, dtype=torch.int64, device=dev)
        new_tokens[row, rank] = token_idx

        # Merge two descending rows: an old sample moves down by the new ones strictly greater; a new
        # one lands after every old one greater or equal. Positions >= K fall out.
        old_values = self.top_values[touched]
        columns = torch.arange(k, device=dev)
        pos_old = columns + torch.searchsorted(-new_values, -old_values, right=False)
        pos_new = columns + torch.searchsorted(-old_values, -new_values, right=True)
        entered = (pos_new < k).sum(1, keepdim=True)
        # The samples pushed out are the last `entered` old ones; new samples take over their pool slots.
        old_slots = self.top_slot[touched]
        freed = torch.gather(old_slots, 1, (k - entered + columns).clamp(max=k - 1))

        fields = (
            ("top_values", old_values, new_values),
            ("top_step", self.top_step[touched], torch.full(grid, step, dtype=torch.int64, device=dev)),
            ("top_order", self.top_order[touched], order_base + new_tokens),
            ("top_slot", old_slots, freed),
        )
        for name, old, new in fields:
            merged = torch.empty((grid[0], k + 1), dtype=old.dtype, device=dev)
            merged.scatter_(1, pos_old.clamp(max=k), old)
            merged.scatter_(1, pos_new.clamp(max=k), new)
            getattr(self, name)[touched] = merged[:, :k]

        enters = rank < entered[row, 0]
        token_idx, latent_idx, rank, row = token_idx[enters], latent_idx[enters], rank[enters], row[enters]
        slot = freed[row, rank]
        seq = tokens.shape[1]
        position = token_idx % seq
        window_pos = position.unsqueeze(1) + torch.arange(-cfg.half_window, cfg.half_window + 1, device=dev)
        inside = (window_pos >= 0) & (window_pos < seq)
        window_rows = (token_idx - position).unsqueeze(1) + window_pos.clamp(0, seq - 1)
        flat_tokens = tokens.reshape(-1).to(dev)
        ctx_acts = window_acts(window_rows, latent_idx)
        self.pool_position[latent_idx, slot] = position.to(torch.int32)
        self.pool_context_tokens[latent_idx, slot] = torch.where(inside, flat_tokens[window_rows], EMPTY).to(
            torch.int32
        )
        self.pool_context_acts[latent_idx, slot] = torch.where(inside & torch.isfinite(ctx_acts), ctx_acts, 0.0)

    def _update_statistics(self, latent_idx: Tensor, values: Tensor, step: int) -> None:
        num_latents = self.config.num_latents
        fired_now = torch.bincount(latent_idx, minlength=num_latents)
        self.count += fired_now
        as_double = values.double()
        self.sum.index_add_(0, latent_idx, as_double)
        self.sum_sq.index_add_(0, latent_idx, as_double * as_double)
        self.max.scatter_reduce_(0, latent_idx, values, reduce="amax")
        self.min.scatter_reduce_(0, latent_idx, values, reduce="amin")
        num_bins = self.hist.shape[1]
        bins = torch.bucketize(values, self._inner_edges, right=True)
        self.hist.view(-1).index_add_(0, latent_idx * num_bins + bins, torch.ones_like(bins))
        fired = fired_now > 0
        self.first_step = torch.where(fired & (self.first_step == EMPTY), step, self.first_step)
        self.last_step = torch.where(fired, step, self.last_step)

    # ------------------------------------------------------------------ state
    def export(self, latents: slice = slice(None)) -> dict:
        """The state of a range of latents in canonical form (samples in rank order), on the state's device.

        The result has every per-latent field of :data:`PER_LATENT_FIELDS` for ``latents`` plus the run-level
        numbers; it is what :func:`merge_states`, the checkpoint and the full-state file hold.
        """
        cfg = self.config
        state = {
            "format_version": FORMAT_VERSION,
            "num_latents": cfg.num_latents,
            "max_samples": cfg.max_samples,
            "context_size": cfg.context_size,
            "half_window": cfg.half_window,
            "threshold": cfg.threshold,
            "hist_edges": self.hist_edges.clone(),
            "tokens_seen": self.tokens_seen.clone(),
            "nonfinite_skipped": self.nonfinite_skipped.clone(),
            "steps_collected": self.steps_collected,
            "first_collected_step": self.first_collected_step,
            "last_collected_step": self.last_collected_step,
        }
        slot = self.top_slot[latents]
        window_slot = slot.unsqueeze(-1).expand(-1, -1, cfg.window)
        state["top_values"] = self.top_values[latents].clone()
        state["top_step"] = self.top_step[latents].clone()
        state["top_order"] = self.top_order[latents].clone()
        state["top_position"] = torch.gather(self.pool_position[latents], 1, slot)
        state["top_context_tokens"] = torch.gather(self.pool_context_tokens[latents], 1, window_slot)
        state["top_context_acts"] = torch.gather(self.pool_context_acts[latents], 1, window_slot)
        for name in _STAT_FIELDS:
            state[name] = getattr(self, name)[latents].clone()
        return state

    def state_dict(self) -> dict:
        """The whole state, canonical, on the CPU (loadable with ``torch.load(weights_only=True)``)."""
        return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.export().items()}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> SampleCollector:
        """Rebuild a collector from :meth:`state_dict` output, on ``device``."""
        missing = [k for k in ("num_latents", "max_samples", "context_size", *PER_LATENT_FIELDS) if k not in state]
        if missing:
            raise ValueError(f"Collector state is missing {missing}; it was not written by lightning-sae-samples.")
        config = CollectorConfig(
            num_latents=int(state["num_latents"]),
            max_samples=int(state["max_samples"]),
            context_size=int(state["context_size"]),
            threshold=float(state["threshold"]),
        )
        collector = cls(config, device, state["hist_edges"])
        for name in ("top_values", "top_step", "top_order", *_STAT_FIELDS):
            getattr(collector, name).copy_(state[name])
        collector.pool_position.copy_(state["top_position"])
        collector.pool_context_tokens.copy_(state["top_context_tokens"])
        collector.pool_context_acts.copy_(state["top_context_acts"])
        collector.tokens_seen.fill_(int(state["tokens_seen"]))
        collector.nonfinite_skipped.fill_(int(state["nonfinite_skipped"]))
        collector.steps_collected = int(state["steps_collected"])
        collector.first_collected_step = int(state["first_collected_step"])
        collector.last_collected_step = int(state["last_collected_step"])
        return collector

    def empty_like(self) -> SampleCollector:
        """A collector with the same configuration, histogram edges and step counters, and no samples."""
        empty = SampleCollector(self.config, self.device, self.hist_edges)
        empty.steps_collected = self.steps_collected
        empty.first_collected_step = self.first_collected_step
        empty.last_collected_step = self.last_collected_step
        return empty


def sort_samples(values: Tensor, step: Tensor, order: Tensor) -> Tensor:
    """Indices that order samples along the last dim by value desc, then ``(step, order)`` asc."""
    perm = torch.argsort(order, dim=-1, stable=True)
    perm = torch.gather(perm, -1, torch.argsort(torch.gather(step, -1, perm), dim=-1, stable=True))
    by_value = torch.argsort(torch.gather(values, -1, perm), dim=-1, descending=True, stable=True)
    return torch.gather(perm, -1, by_value)


def merge_states(a: dict, b: dict, latents: Optional[slice] = None) -> dict:
    """Exactly merge two collector states (as produced by ``state_dict``), optionally a slice of latents.

    Top samples are re-ranked over the union by value, then earliest ``(step, order)``; counts, sums and
    histograms add; maxima, minima, first and last steps combine. ``merge_states`` is associative and
    commutative, so it serves DDP gathers and resumes alike.
    """
    check_compatible(a, b)
    sel = slice(None) if latents is None else latents
    k = int(a["max_samples"])
    merged = {}
    values = torch.cat([a["top_values"][sel], b["top_values"][sel]], dim=1)
    step = torch.cat([a["top_step"][sel], b["top_step"][sel]], dim=1)
    order = torch.cat([a["top_order"][sel], b["top_order"][sel]], dim=1)
    best = sort_samples(values, step, order)[:, :k]
    for name in _TOP_FIELDS:
        both = torch.cat([a[name][sel], b[name][sel]], dim=1)
        index = best if both.dim() == 2 else best.unsqueeze(-1).expand(-1, -1, both.shape[-1])
        merged[name] = torch.gather(both, 1, index)
    merged["count"] = a["count"][sel] + b["count"][sel]
    merged["sum"] = a["sum"][sel] + b["sum"][sel]
    merged["sum_sq"] = a["sum_sq"][sel] + b["sum_sq"][sel]
    merged["max"] = torch.maximum(a["max"][sel], b["max"][sel])
    merged["min"] = torch.minimum(a["min"][sel], b["min"][sel])
    merged["hist"] = a["hist"][sel] + b["hist"][sel]
    first_a, first_b = a["first_step"][sel], b["first_step"][sel]
    merged["first_step"] = torch.where(
        (first_a == EMPTY) | ((first_b != EMPTY) & (first_b < first_a)), first_b, first_a
    )
    merged["last_step"] = torch.maximum(a["last_step"][sel], b["last_step"][sel])
    merged.update(merge_counters(a, b))
    return merged


def merge_counters(a: dict, b: dict) -> dict:
    """Merge the run-level entries of two states (everything that is not per latent)."""
    merged = {key: value for key, value in a.items() if key not in PER_LATENT_FIELDS}
    merged["tokens_seen"] = a["tokens_seen"] + b["tokens_seen"]
    merged["nonfinite_skipped"] = a["nonfinite_skipped"] + b["nonfinite_skipped"]
    merged["steps_collected"] = max(int(a["steps_collected"]), int(b["steps_collected"]))
    firsts = [int(s["first_collected_step"]) for s in (a, b) if int(s["first_collected_step"]) != EMPTY]
    merged["first_collected_step"] = min(firsts) if firsts else EMPTY
    merged["last_collected_step"] = max(int(a["last_collected_step"]), int(b["last_collected_step"]))
    return merged


def check_compatible(a: dict, b: dict) -> None:
    """Raise a clear error when two states cannot be merged."""
    for key in ("num_latents", "max_samples", "context_size"):
        if int(a[key]) != int(b[key]):
            raise ValueError(f"Cannot merge collector states with different {key}: {a[key]} and {b[key]}.")
    if not torch.equal(a["hist_edges"], b["hist_edges"]):
        raise ValueError("Cannot merge collector states with different histogram bin edges (threshold changed).")
