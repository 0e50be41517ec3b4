"""The tensor engine: exact per-latent top-k samples and streaming statistics, in pure torch.

Nothing here knows about Lightning. One call to :meth:`SampleCollector.update_dense` or
:meth:`SampleCollector.update_sparse` folds one batch of
latent activations into the state with a fixed number of vectorized tensor operations; there is no
Python loop over latents, tokens or samples, and sparse (TopK) latents are never densified. The state
stays on the latents' device; the host only learns sizes (of boolean selections, the widest row of new
samples, whether a window walk can stop), never activations.

Exactness. For every latent the state holds the ``K`` largest activations strictly above the
threshold over everything seen, ordered by value descending and, among equal values, by the
earliest ``(step, order)`` where ``order = rank << 40 | token offset within the step on that rank``.
Within one process new tokens always come after the kept ones, so a merge of ``[kept, new]`` that
puts kept samples first among equals realises the tie-break; :func:`merge_states` sorts explicitly by
the keys and is exact for states from different processes or runs.

Besides the top, optional tables keep, per latent, ``samples_per_interval`` random samples from each
activation interval (the ones with the largest :func:`sample_priority`, a hash of where the sample was
seen: a uniform sample that every process and resume reproduces) and the top activations of the recent
window of steps (the current and the previous block of ``recent_window_steps`` steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_sae_samples.hashing import mix64, shift_right, signed64
from lightning_sae_samples.sample_table import EMPTY, TABLE_FIELDS, BatchContext, SampleTable, merge_exported

FORMAT_VERSION = 1
RANK_SHIFT = 40
HISTOGRAM_BINS = 40
HISTOGRAM_MAX = 1e4
HISTOGRAM_MIN_FLOOR = 1e-3
DENSE_SCAN_ELEMENTS = 1 << 23
DENSE_GROUP = 32

INTERVAL_RATIO = math.sqrt(10.0)
_STAT_FIELDS = ("count", "sum", "sum_sq", "max", "min", "hist", "first_step", "last_step")
RUN_TENSORS = frozenset({"hist_edges", "interval_edges", "tokens_seen", "nonfinite_skipped"})
TABLE_PREFIXES = ("top", "interval", "recent", "recent_prev")


def per_latent_fields(state: dict) -> list[str]:
    """Names of the entries of a state that are indexed by latent (first dimension ``F``)."""
    return [k for k, v in state.items() if isinstance(v, Tensor) and k not in RUN_TENSORS]


def sample_priority(step: int, order: Tensor, seed: int = 0) -> Tensor:
    """A pseudo-random priority in ``[0, 2**31)`` (as float64) for samples seen at ``(step, order)``.

    A SplitMix64 hash: the same sample gets the same priority in every process, run and resume, so
    keeping the largest priorities is a reproducible uniform sample that merges exactly.
    """
    x = mix64(order + signed64(step * 0x9E3779B97F4A7C15 + seed * 0xD1B54A32D192ED03))
    return shift_right(x, 33).double()


def interval_edges(threshold: float, num_intervals: int) -> Tensor:
    """Edges of the activation intervals sampled per latent: half-decades up from the threshold.

    The last interval is open above; values below the first edge (threshold 0) fall into the first.
    """
    low = max(float(threshold), HISTOGRAM_MIN_FLOOR)
    return low * INTERVAL_RATIO ** torch.arange(num_intervals + 1, dtype=torch.float64)


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
        padding = tokens < 0
        if attention_mask is not None:
            padding = padding | ~attention_mask.to(device=tokens.device, dtype=torch.bool)
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
        acts = torch.zeros((len(candidate), 2 * half + 1), device=candidate.device)
        acts[:, half] = self.picked[candidate]
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
                walking, neighbour, offset, own = walking[hit], neighbour[hit], offset[hit], own[hit]
                if not len(walking):
                    break
                found = self.values[order[neighbour]].float()
                acts[walking, half + offset] = torch.where(torch.isfinite(found), found, 0.0)
        return acts


@dataclass
class CollectorConfig:
    """Shape of a collector's state.

    Args:
        num_latents: Number of latents ``F``.
        max_samples: Top samples kept per latent ``K``.
        context_size: Context tokens around the activating one (``context_size // 2`` on each side).
        threshold: An activation counts only if strictly greater than this.
        samples_per_interval: Random samples kept per latent and activation interval (0: none).
        num_intervals: Number of activation intervals (half-decades from the threshold up).
        recent_window_steps: Block length in steps of the recent-top window (``None``: no recent top).
        recent_samples: Top samples kept per latent for the recent window.
        seed: Seed of the interval sampling.
        deduplicate_contexts: Apply the de-duplication rule of :mod:`lightning_sae_samples.dedup` to the top
            and recent tables.
        stage_limit: Samples a table stages before merging them into its sorted rows (``None``: a quarter of
            the table's size). Lower trades speed for memory; the kept samples do not depend on it.
    """

    num_latents: int
    max_samples: int
    context_size: int
    threshold: float
    samples_per_interval: int = 0
    num_intervals: int = 8
    recent_window_steps: Optional[int] = None
    recent_samples: int = 10
    seed: int = 0
    deduplicate_contexts: bool = False
    stage_limit: Optional[int] = None

    @property
    def half_window(self) -> int:
        """Tokens kept on each side of the activating token."""
        return self.context_size // 2

    @property
    def window(self) -> int:
        """Length of a stored context window (activating token at index ``half_window``)."""
        return 2 * self.half_window + 1


_CONFIG_KEYS = {
    "num_latents": "num_latents",
    "max_samples": "max_samples",
    "context_size": "context_size",
    "threshold": "threshold",
    "samples_per_interval": "samples_per_interval",
    "num_intervals": "num_intervals",
    "recent_window_steps": "recent_window_steps",
    "recent_samples": "recent_samples",
    "seed": "seed",
    "deduplicate_contexts": "deduplicate_contexts",
}


class SampleCollector:
    """Exact top-k activating contexts and streaming statistics for every latent.

    Args:
        config: Sizes, threshold and optional sample groups.
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
        num_latents, w = config.num_latents, config.window
        edges = histogram_edges(config.threshold) if hist_edges is None else hist_edges
        self.hist_edges = edges.to(torch.float64).cpu()
        self._inner_edges = self.hist_edges[1:-1].to(device=device)
        num_bins = len(self.hist_edges) - 1

        radius = 2 * config.half_window if config.deduplicate_contexts else None
        stage = config.stage_limit
        self.tables: dict[str, SampleTable] = {
            "top": SampleTable(num_latents, config.max_samples, w, device, dedup_radius=radius, stage_limit=stage)
        }
        self.interval_edges: Optional[Tensor] = None
        if config.samples_per_interval:
            self.interval_edges = interval_edges(config.threshold, config.num_intervals)
            self._interval_inner = self.interval_edges[1:-1].to(device=device)
            self.tables["interval"] = SampleTable(
                num_latents * config.num_intervals,
                config.samples_per_interval,
                w,
                device,
                random_priority=True,
                stage_limit=stage,
            )
            self.interval_count = torch.zeros((num_latents, config.num_intervals), dtype=torch.int64, device=device)
        self.recent_block = EMPTY
        if config.recent_window_steps:
            for name in ("recent", "recent_prev"):
                self.tables[name] = SampleTable(
                    num_latents, config.recent_samples, w, device, dedup_radius=radius, stage_limit=stage
                )

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
        self.last_active = 0
        self.last_seen: Tensor | int = 0

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
        batch, seq = tokens.shape
        positions = TokenPositions(tokens, attention_mask, excluded)
        flat = latents.detach().reshape(batch * seq, self.config.num_latents).contiguous()
        # Scanned in blocks of rows, which bounds the temporaries. A row sum is non-finite iff the row holds
        # a NaN or an infinity (or overflows); non-finite values are then counted on those rows only.
        num_latents = self.config.num_latents
        block = max(1, DENSE_SCAN_ELEMENTS // num_latents)
        found, bad = [], []
        for start in range(0, len(flat), block):
            rows = flat[start : start + block]
            found.append(dense_hits(rows, self.config.threshold) + start * num_latents)
            bad.append(~torch.isfinite(rows.sum(dim=1)) & positions.collect[start : start + block])
        entry = torch.cat(found)
        values = flat.view(-1)[entry].float()
        keep = torch.isfinite(values) & positions.collect[entry // num_latents]
        if not bool(keep.all()):
            entry, values = entry[keep], values[keep]
        token_idx, latent_idx = entry // num_latents, entry % num_latents
        self.nonfinite_skipped += (~torch.isfinite(flat[torch.cat(bad)])).sum()
        segment = positions.segment

        def window_acts(candidate: Tensor) -> Tensor:
            token, latent = token_idx[candidate], latent_idx[candidate]
            position = token % seq
            offsets = torch.arange(-self.config.half_window, self.config.half_window + 1, device=token.device)
            shifted = position.unsqueeze(1) + offsets
            rows = (token - position).unsqueeze(1) + shifted.clamp(0, seq - 1)
            acts = flat[rows, latent.unsqueeze(1).expand_as(rows)].float()
            inside = (shifted >= 0) & (shifted < seq) & (segment[rows] == segment[token].unsqueeze(1))
            return torch.where(inside & torch.isfinite(acts), acts, 0.0)

        self._fold(positions, token_idx, latent_idx, values, step, order_base, window_acts)

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
        batch, seq = tokens.shape
        positions = TokenPositions(tokens, attention_mask, excluded)
        flat_idx = indices.detach().reshape(batch * seq, -1)
        flat_val = values.detach().reshape(batch * seq, -1)
        k = flat_idx.shape[1]
        collect = positions.collect.unsqueeze(1)
        finite = torch.isfinite(flat_val)
        self.nonfinite_skipped += (~finite & collect).sum()
        entry = (above_threshold(flat_val, self.config.threshold) & finite & collect).view(-1).nonzero(as_tuple=True)[0]
        token_idx = entry // k
        latent_idx = flat_idx.view(-1)[entry].long()
        picked = flat_val.view(-1)[entry].float()
        window_acts = SparseWindowActs(flat_idx, flat_val, entry, picked, positions.segment, self.config.half_window)
        self._fold(positions, token_idx, latent_idx, picked, step, order_base, window_acts)

    def _fold(
        self,
        positions: TokenPositions,
        token_idx: Tensor,
        latent_idx: Tensor,
        values: Tensor,
        step: int,
        order_base: int,
        window_acts: Callable[[Tensor], Tensor],
    ) -> None:
        cfg = self.config
        dev = self.device
        token_idx, latent_idx, values = token_idx.to(dev), latent_idx.to(dev), values.to(dev)
        self.last_seen = positions.num_seen
        self.tokens_seen += positions.num_seen.to(dev)
        if self.first_collected_step == EMPTY:
            self.first_collected_step = step
        if self.last_collected_step != step:
            self.steps_collected += 1
            self.last_collected_step = step

        self._update_statistics(latent_idx, values, step)
        self.last_active = len(values)
        offers = [(self.tables["top"], latent_idx, values)]
        if "interval" in self.tables:
            interval = torch.bucketize(values.double(), self._interval_inner, right=True)
            rows = latent_idx * cfg.num_intervals + interval
            self.interval_count.view(-1).index_add_(0, rows, torch.ones_like(interval))
            offers.append((self.tables["interval"], rows, sample_priority(step, order_base + token_idx, cfg.seed)))
        if "recent" in self.tables:
            self._rotate_recent(step)
            offers.append((self.tables["recent"], latent_idx, values))
        may_enter = [table.can_enter(rows, priority) for table, rows, priority in offers]
        anywhere = may_enter[0]
        for mask in may_enter[1:]:
            anywhere = anywhere | mask
        batch = BatchContext(
            positions.tokens.to(dev), token_idx, step, order_base, cfg.half_window, window_acts,
            segment=positions.segment.to(dev),
        )
        batch.compute_windows(anywhere.nonzero(as_tuple=True)[0])
        for (table, rows, priority), mask in zip(offers, may_enter):
            candidate = mask.nonzero(as_tuple=True)[0]
            table.insert(rows[candidate], candidate, priority[candidate], values[candidate], batch)

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
        bins = torch.bucketize(values.double(), self._inner_edges, right=True)
        self.hist.view(-1).index_add_(0, latent_idx * num_bins + bins, torch.ones_like(bins))
        fired = fired_now > 0
        self.first_step = torch.where(fired & (self.first_step == EMPTY), step, self.first_step)
        self.last_step = torch.where(fired, step, self.last_step)

    # ------------------------------------------------------------------ state
    def export(self, latents: slice = slice(None)) -> dict:
        """The state of a range of latents in canonical form (samples best first), on the state's device.

        Per-latent entries (see :func:`per_latent_fields`) cover ``latents``; run-level numbers are whole.
        This is what :func:`merge_states`, the checkpoint and the full-state file hold.
        """
        cfg = self.config
        state = {"format_version": FORMAT_VERSION, **{key: getattr(cfg, attr) for key, attr in _CONFIG_KEYS.items()}}
        state.update(
            half_window=cfg.half_window,
            hist_edges=self.hist_edges.clone(),
            tokens_seen=self.tokens_seen.clone(),
            nonfinite_skipped=self.nonfinite_skipped.clone(),
            steps_collected=self.steps_collected,
            first_collected_step=self.first_collected_step,
            last_collected_step=self.last_collected_step,
            recent_block=self.recent_block,
        )
        start, stop, _ = latents.indices(cfg.num_latents)
        for prefix, table in self.tables.items():
            if prefix == "interval":
                rows = slice(start * cfg.num_intervals, stop * cfg.num_intervals)
                exported = table.export(rows)
                exported = {k: v.reshape(stop - start, cfg.num_intervals, *v.shape[1:]) for k, v in exported.items()}
            else:
                exported = table.export(latents)
            state.update({f"{prefix}_{name}": value for name, value in exported.items()})
        if "interval" in self.tables:
            state["interval_edges"] = self.interval_edges.clone()
            state["interval_count"] = self.interval_count[latents].clone()
        for name in _STAT_FIELDS:
            state[name] = getattr(self, name)[latents].clone()
        return state

    def state_dict(self) -> dict:
        """The whole state, canonical, on the CPU (loadable with ``torch.load(weights_only=True)``)."""
        return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in self.export().items()}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> SampleCollector:
        """Rebuild a collector from :meth:`state_dict` output, on ``device``."""
        missing = [k for k in ("num_latents", "max_samples", "context_size", "top_values", *_STAT_FIELDS)
                   if k not in state]
        if missing:
            raise ValueError(f"Collector state is missing {missing}; it was not written by lightning-sae-samples.")
        defaults = CollectorConfig(0, 0, 0, 0.0)
        config = CollectorConfig(
            **{attr: state.get(key, getattr(defaults, attr)) for key, attr in _CONFIG_KEYS.items()}
        )
        collector = cls(config, device, state["hist_edges"])
        for prefix, table in collector.tables.items():
            exported = {name: state[f"{prefix}_{name}"] for name in table.export(slice(0, 0))}
            if prefix == "interval":
                exported = {k: v.reshape(-1, *v.shape[2:]) for k, v in exported.items()}
            table.load(exported)
        if "interval" in collector.tables:
            collector.interval_count.copy_(state["interval_count"])
        for name in _STAT_FIELDS:
            getattr(collector, name).copy_(state[name])
        collector.tokens_seen.fill_(int(state["tokens_seen"]))
        collector.nonfinite_skipped.fill_(int(state["nonfinite_skipped"]))
        collector.steps_collected = int(state["steps_collected"])
        collector.first_collected_step = int(state["first_collected_step"])
        collector.last_collected_step = int(state["last_collected_step"])
        collector.recent_block = int(state.get("recent_block", EMPTY))
        return collector

    def empty_like(self) -> SampleCollector:
        """A collector with the same configuration, histogram edges and step counters, and no samples."""
        empty = SampleCollector(self.config, self.device, self.hist_edges)
        empty.steps_collected = self.steps_collected
        empty.first_collected_step = self.first_collected_step
        empty.last_collected_step = self.last_collected_step
        empty.recent_block = self.recent_block
        return empty


def _table_view(state: dict, prefix: str, sel: slice) -> dict[str, Tensor]:
    out = {}
    for name in (*TABLE_FIELDS, "priority", "hash"):
        if f"{prefix}_{name}" in state:
            value = state[f"{prefix}_{name}"][sel]
            out[name] = value.reshape(-1, *value.shape[2:]) if prefix == "interval" else value
    return out


def merge_states(a: dict, b: dict, latents: Optional[slice] = None) -> dict:
    """Exactly merge two collector states (as produced by ``state_dict``), optionally a slice of latents.

    Every sample table is re-ranked over the union (priority, then earliest ``(step, order)``); counts,
    sums and histograms add; maxima, minima, first and last steps combine. ``merge_states`` is associative
    and commutative, so it serves DDP gathers and resumes alike.
    """
    check_compatible(a, b)
    sel = slice(None) if latents is None else latents
    merged = {}
    for prefix in TABLE_PREFIXES:
        if f"{prefix}_values" not in a:
            continue
        table_a, table_b = _table_view(a, prefix, sel), _table_view(b, prefix, sel)
        capacity = a[f"{prefix}_values"].shape[-1]
        rows = a[f"{prefix}_values"][sel].shape[0]
        for name, value in merge_exported(table_a, table_b, capacity).items():
            merged[f"{prefix}_{name}"] = value.reshape(rows, -1, *value.shape[1:]) if prefix == "interval" else value
    if "interval_count" in a:
        merged["interval_count"] = a["interval_count"][sel] + b["interval_count"][sel]
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
    per_latent = set(per_latent_fields(a))
    merged = {key: value for key, value in a.items() if key not in per_latent}
    merged["tokens_seen"] = a["tokens_seen"] + b["tokens_seen"]
    merged["nonfinite_skipped"] = a["nonfinite_skipped"] + b["nonfinite_skipped"]
    merged["steps_collected"] = max(int(a["steps_collected"]), int(b["steps_collected"]))
    firsts = [int(s["first_collected_step"]) for s in (a, b) if int(s["first_collected_step"]) != EMPTY]
    merged["first_collected_step"] = min(firsts) if firsts else EMPTY
    merged["last_collected_step"] = max(int(a["last_collected_step"]), int(b["last_collected_step"]))
    return merged


def check_compatible(a: dict, b: dict) -> None:
    """Raise a clear error when two states cannot be merged."""
    for key in ("num_latents", "max_samples", "context_size", "samples_per_interval", "recent_window_steps",
                "deduplicate_contexts"):
        if a.get(key) != b.get(key):
            raise ValueError(f"Cannot merge collector states with different {key}: {a.get(key)} and {b.get(key)}.")
    if not torch.equal(a["hist_edges"], b["hist_edges"]):
        raise ValueError("Cannot merge collector states with different histogram bin edges (threshold changed).")
    if a.get("recent_block", EMPTY) != b.get("recent_block", EMPTY):
        raise ValueError(
            f"Cannot merge recent windows of different blocks ({a.get('recent_block')} and {b.get('recent_block')})."
        )
