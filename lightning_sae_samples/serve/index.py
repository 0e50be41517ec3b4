"""The in-memory index of one save, built once when it is loaded: every request is answered from it.

:class:`RunIndex` opens a samples directory through :class:`~lightning_sae_samples.ActivationSampleAnalyzer`
(which validates everything it reads) and builds, with vectorized torch over the latents and the kept samples:

* a feature table: one column per statistic over all ``F`` latents of ``full_state.pt`` (only the saved
  features when there is none), sorted per column on first use and cached, filtered by boolean masks;
* a token index: the distinct (activating token, latent) pairs of the kept top samples with their counts,
  sorted by token (which latents fire on a token) and by latent (which tokens a latent fires on);
* a context corpus: the kept top samples' context texts, lower-cased, in one byte string searched by
  ``bytes.find``, with each sample's start offset.

Nothing here touches the file system after the load, and no request loops in Python over latents or samples.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer, UnknownFeatureError
from lightning_sae_samples.analysis.neighbours import nearest_latents
from lightning_sae_samples.analysis.records import DRIFT_THRESHOLD, Sample
from lightning_sae_samples.health import DENSE_FREQUENCY
from lightning_sae_samples.render import formatting, html, views
from lightning_sae_samples.render.escaping import token_label, visible
from lightning_sae_samples.samples_dir.serialize import with_recent_view
from lightning_sae_samples.serve.explanations import ExplanationIndex, empty_index
from lightning_sae_samples.state.schema import EMPTY
from lightning_sae_samples.state.statistics import frequency_histogram
from lightning_sae_samples.state.tables import row_offsets, rows_index

#: Columns the feature list sorts by, with the direction a user expects first.
SORT_KEYS = (
    "max_activation",
    "activation_count",
    "frequency",
    "mean_activation",
    "recent_overlap",
    "first_step",
    "last_step",
    "index",
    "score",
    "embedding_score",
)
FILTERS = ("all", "alive", "dead", "dense", "drifting", "explained", "unexplained")
#: Sort keys and filters answered from the explanations, not the feature table.
_EXPLANATION_SORTS, _EXPLANATION_FILTERS = ("score", "embedding_score"), ("explained", "unexplained")
#: Most rows a list page, token search or context search returns.
MAX_PAGE = 500
_SEPARATOR = b"\x00"
_CORPUS_CHUNK = 1 << 13  # samples per vectorized gather when the corpus is built (bounds its temporaries)
_SORT_CACHE = 6
#: Most samples holding a context that one search across SAEs reads per SAE before it groups them by latent.
MAX_CONTEXT_MATCHES = 5000
#: Matches read per sample wanted by :meth:`ContextCorpus.samples_holding` (a context may hold the text often).
_MATCHES_PER_SAMPLE = 4


class NotFoundError(LookupError):
    """A request names something this save does not hold (the message says what and the valid range)."""


class BadRequestError(ValueError):
    """A request argument is malformed (the message names it and what is allowed)."""


def jsonable(value: Any) -> Any:
    """Plain JSON types of a view: dataclasses as dicts, tuples as lists, non-finite floats as ``None``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def example_json(sample: Sample, feature_max: float) -> dict:
    """The HTML report's example view with each token's display text (``shown``), ready for ``textContent``."""
    view = html.example_view(sample, feature_max)
    for token in view["tokens"]:
        token["shown"] = visible(token["text"])
    view["feature_idx"] = sample.feature_idx
    return view


def _labelled(items: Sequence[dict]) -> list[dict]:
    return [{**item, "label": token_label(item["text"])} for item in items]


class FeatureTable:
    """Statistic columns over the listed latents (all ``F``, or the saved ones), sorted and filtered on demand.

    Args:
        latents: Latent index per row (int64).
        columns: Name to a float64 column per row; ``NaN`` where a value is missing (never fired, no window).
        tokens_seen: Tokens of the collected batches (frequency = count / tokens_seen).
        dead_before: A latent whose last firing step is below this is dead (``None``: only never-fired ones).
    """

    def __init__(self, latents: Tensor, columns: dict[str, Tensor], dead_before: Optional[int]) -> None:
        self.latents = latents
        self.columns = columns
        self.dead_before = dead_before
        self._orders: OrderedDict[tuple[str, bool], Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.latents)

    def order(self, key: str, descending: bool) -> Tensor:
        """Row order by ``key`` (stable: ties keep the lower latent first; missing values last), cached."""
        if key not in SORT_KEYS or key in _EXPLANATION_SORTS:
            raise BadRequestError(f"`sort` must be one of {', '.join(SORT_KEYS)}; got {key!r}.")
        if key == "frequency":
            key = "activation_count"  # frequency is count / tokens_seen: the same order
        with self._lock:
            cached = self._orders.get((key, descending))
            if cached is not None:
                self._orders.move_to_end((key, descending))
                return cached
        values = self.latents.double() if key == "index" else self.columns[key]
        values = -values if descending else values
        values = torch.nan_to_num(values, nan=math.inf)
        order = torch.argsort(values, stable=True)
        order = order.to(torch.int32) if len(order) < 1 << 31 else order  # half the memory of each cached order
        with self._lock:
            self._orders[(key, descending)] = order
            while len(self._orders) > _SORT_CACHE:
                self._orders.popitem(last=False)
        return order

    def mask(
        self,
        kind: str = "all",
        dense_above: float = DENSE_FREQUENCY,
        log10_frequency: Optional[tuple[float, float]] = None,
    ) -> Optional[Tensor]:
        """Rows kept by a filter (``None``: all rows).

        Args:
            kind: ``"all"``, ``"alive"`` (fired at least once), ``"dead"`` (never fired, or not within the run's
                ``dead_window_steps`` before its last collected step), ``"dense"`` (frequency above
                ``dense_above``) or ``"drifting"`` (recent overlap below 0.25).
            dense_above: The frequency bound of ``"dense"``.
            log10_frequency: Also keep only latents whose log10 frequency lies in ``[low, high]``.
        """
        if kind not in FILTERS:
            raise BadRequestError(f"`filter` must be one of {', '.join(FILTERS)}; got {kind!r}.")
        if kind in _EXPLANATION_FILTERS:
            kind = "all"  # answered by the explanation index
        count, frequency = self.columns["activation_count"], self.columns["frequency"]
        keep: Optional[Tensor] = None
        if kind == "alive":
            keep = count > 0
        elif kind == "dead":
            keep = count == 0
            if self.dead_before is not None:
                keep |= self.columns["last_step"] < self.dead_before
        elif kind == "dense":
            keep = frequency > dense_above
        elif kind == "drifting":
            keep = self.columns["recent_overlap"] < DRIFT_THRESHOLD
        if log10_frequency is not None:
            low, high = log10_frequency
            logf = torch.log10(frequency)
            in_range = (logf >= low - 1e-9) & (logf <= high + 1e-9)
            keep = in_range if keep is None else keep & in_range
        return keep

    def page(self, order: Tensor, keep: Optional[Tensor], offset: int, limit: int) -> tuple[Tensor, int]:
        """Rows ``offset .. offset + limit`` of ``order`` among the kept ones, and how many are kept."""
        selected = order if keep is None else order[keep[order]]
        return selected[offset : offset + limit], len(selected)


def _column_or_nan(values: Tensor, fired: Tensor) -> Tensor:
    return torch.where(fired, values.double(), torch.tensor(math.nan, dtype=torch.float64))


def _activating_pairs(table: dict, num_latents: int, half: int, limit: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Latent and activating token of each of the first ``limit`` kept samples of every latent (int64 each)."""
    count = table["count"].to(torch.int64)
    if limit is not None:
        count = count.clamp(max=limit)
        index = rows_index(table, torch.arange(num_latents), limit)
    else:
        index = None
    latents = torch.repeat_interleave(torch.arange(num_latents), count)
    tokens = table["context_tokens"][:, half] if index is None else table["context_tokens"][index, half]
    return latents, tokens.to(torch.int64)


def recent_overlaps(view: dict, limit: int) -> Tensor:
    """Per latent, the writer's ``recent_overlap`` (float64 ``[F]``).

    The Jaccard overlap of the activating tokens of the first ``limit`` recent and all-time top samples (1 when
    neither has any), as :func:`~lightning_sae_samples.samples_dir.serialize.sample_groups` computes it.
    """
    num_latents, half = int(view["num_latents"]), int(view["half_window"])
    sets = []
    for name in ("top", "recent"):
        latents, tokens = _activating_pairs(view[name], num_latents, half, limit)
        sets.append(torch.unique(latents * (1 << 32) + tokens))
    both, times = torch.unique(torch.cat(sets), return_counts=True)
    owner = both // (1 << 32)
    union = torch.bincount(owner, minlength=num_latents).double()
    common = torch.bincount(owner[times == 2], minlength=num_latents).double()
    return torch.where(union > 0, common / union.clamp(min=1), torch.ones_like(union))


class TokenIndex:
    """Distinct (activating token, latent) pairs of the kept top samples, with how many samples each has.

    Indexed by the distinct token ids and latents present (ranks found by ``searchsorted``), so its size follows
    the kept samples, never the largest token id or the latent count a summary claims.

    Args:
        latents: Latent of each kept sample.
        tokens: Activating token id of each kept sample.
    """

    def __init__(self, latents: Tensor, tokens: Tensor) -> None:
        self.token_ids, token_rank = torch.unique(tokens, return_inverse=True)
        self.latent_ids, latent_rank = torch.unique(latents, return_inverse=True)
        width = max(len(self.latent_ids), 1)
        keys, counts = torch.unique(token_rank * width + latent_rank, return_counts=True)
        #: Per pair (sorted by token, then latent): its token rank, token id, latent id and sample count.
        self.keys, self.counts, self._width = keys, counts, width
        self.pair_token = self.token_ids[keys // width]
        pair_latent_rank = keys % width
        self.pair_latent = self.latent_ids[pair_latent_rank]
        # By latent, most frequent token first (ties: the lower id first, as ``keys`` is sorted by token).
        by_count = torch.argsort(-counts, stable=True)
        self.by_latent = by_count[torch.argsort(pair_latent_rank[by_count], stable=True)]
        self.latent_start = torch.zeros(len(self.latent_ids) + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(pair_latent_rank, minlength=len(self.latent_ids)), 0, out=self.latent_start[1:])

    @staticmethod
    def _ranks(present: Tensor, wanted: Tensor) -> tuple[Tensor, Tensor]:
        """Rank in ``present`` (sorted, distinct) of each ``wanted`` value, and whether it is there."""
        if not len(present):
            return wanted, torch.zeros_like(wanted, dtype=torch.bool)
        rank = torch.searchsorted(present, wanted).clamp(max=len(present) - 1)
        return rank, present[rank] == wanted

    def latents_for(self, token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Latents whose kept samples have any of ``token_ids`` as activating token, and how many; most first."""
        ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
        rank, found = self._ranks(self.token_ids, ids)
        rank = rank[found]
        if not len(rank):
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        bounds = torch.searchsorted(self.keys, torch.stack([rank * self._width, (rank + 1) * self._width]))
        spans = bounds[1] - bounds[0]
        picked = torch.repeat_interleave(bounds[0] - (torch.cumsum(spans, 0) - spans), spans) + torch.arange(
            int(spans.sum())
        )
        latents, counts = self.pair_latent[picked], self.counts[picked]
        if len(rank) > 1:  # the same latent under several matching tokens: add their counts
            latents, inverse = torch.unique(latents, return_inverse=True)
            counts = torch.zeros(len(latents), dtype=torch.int64).scatter_add_(0, inverse, counts)
        order = torch.argsort(-counts, stable=True)  # latents are ascending: ties keep the lower one first
        return latents[order], counts[order]

    def _pairs_of(self, latent: int) -> Tensor:
        """The latent's pairs, most samples first (none when it has no kept sample)."""
        rank, found = self._ranks(self.latent_ids, torch.tensor([int(latent)], dtype=torch.int64))
        if not bool(found[0]):
            return self.by_latent[:0]
        return self.by_latent[int(self.latent_start[rank[0]]) : int(self.latent_start[rank[0] + 1])]

    def top_tokens(self, latent: int, limit: int = 3) -> list[tuple[int, int]]:
        """The ``limit`` activating tokens most frequent among a latent's kept samples: ``(token_id, samples)``."""
        picked = self._pairs_of(latent)[:limit]
        return list(zip(self.pair_token[picked].tolist(), self.counts[picked].tolist()))

    def samples_of(self, latent: int) -> int:
        """How many kept samples of the latent :meth:`top_tokens` counts over."""
        return int(self.counts[self._pairs_of(latent)].sum())


class ContextCorpus:
    """The kept top samples' context texts, lower-cased, joined by NUL bytes into one searchable byte string.

    Built by gathers over a byte table of the distinct tokens' strings, a chunk of samples at a time.

    Args:
        windows: Token ids ``[N, W]`` of each kept sample's window (``-1`` outside the sequence).
        strings: Display string of each token id that occurs.
    """

    def __init__(self, windows: Tensor, strings: dict[int, str]) -> None:
        ids = sorted(strings)
        encoded = [strings[i].casefold().encode("utf-8") for i in ids]
        outside, separator = len(ids), len(ids) + 1  # slots after the tokens': no byte, and one NUL byte
        lengths = torch.tensor([len(b) for b in encoded] + [0, 1], dtype=torch.int64)
        starts = torch.cumsum(lengths, 0) - lengths
        table = torch.frombuffer(bytearray(b"".join(encoded) + b"\x00"), dtype=torch.uint8)
        present = torch.tensor(ids, dtype=torch.int64)  # sorted: a token's slot is its rank (no table by id)

        def slots(first: int) -> Tensor:
            chunk = windows[first : first + _CORPUS_CHUNK].to(torch.int64)
            rank, found = TokenIndex._ranks(present, chunk)
            slot = torch.where(found, rank, outside)
            return torch.cat([slot, torch.full((len(slot), 1), separator, dtype=torch.int64)], 1)

        chunks = range(0, len(windows), _CORPUS_CHUNK)
        # Sized first, so that the corpus is written in place: no second copy of it ever exists.
        sizes = torch.cat([lengths[slots(first)].sum(1) for first in chunks]) if len(windows) else lengths[:0]
        self.starts = torch.cumsum(sizes, 0) - sizes
        self.data = bytearray(int(sizes.sum()))
        corpus = torch.frombuffer(self.data, dtype=torch.uint8) if self.data else None
        for first in chunks:
            flat = slots(first).reshape(-1)
            size = lengths[flat]
            into = torch.cumsum(size, 0) - size
            source = torch.repeat_interleave(starts[flat] - into, size) + torch.arange(int(size.sum()))
            begin = int(self.starts[first])
            corpus[begin : begin + len(source)] = table[source]

    def find(self, text: str, offset: int, limit: int) -> tuple[list[int], bool]:
        """Samples whose context holds ``text`` (case-insensitive), from the ``offset``-th match on.

        Returns:
            At most ``limit`` sample indices in corpus order, and whether more follow.
        """
        needle = text.casefold().encode("utf-8")
        if not needle or _SEPARATOR in needle:
            return [], False
        found: list[int] = []
        at, skipped = 0, 0
        while len(found) <= limit:
            at = self.data.find(needle, at)
            if at < 0:
                break
            sample = int(torch.searchsorted(self.starts, torch.tensor(at), right=True)) - 1
            if skipped < offset:
                skipped += 1
            else:
                found.append(sample)
            next_start = self.starts[sample + 1] if sample + 1 < len(self.starts) else len(self.data)
            at = int(next_start)
        return found[:limit], len(found) > limit

    def samples_holding(self, text: str, limit: int) -> tuple[Tensor, bool]:
        """The distinct samples whose context holds ``text`` (case-insensitive), in corpus order, at most ``limit``.

        One scan in C (``re.finditer``) and one ``searchsorted`` for all matches. Returns the sample indices and
        whether the scan stopped before the end (more samples may hold it).
        """
        needle = text.casefold().encode("utf-8")
        if not needle or _SEPARATOR in needle or limit <= 0:
            return torch.zeros(0, dtype=torch.int64), False
        # A match never spans two samples: the NUL between them is in no needle.
        cap = limit * _MATCHES_PER_SAMPLE
        at = [m.start() for m in itertools.islice(re.finditer(re.escape(needle), self.data), cap + 1)]
        capped = len(at) > cap
        samples = torch.searchsorted(self.starts, torch.tensor(at[:cap], dtype=torch.int64), right=True) - 1
        samples = torch.unique_consecutive(samples)
        return samples[:limit], capped or len(samples) > limit


@dataclasses.dataclass
class RunIndex:
    """One loaded save of a samples directory and everything built from it.

    Use :meth:`load`. Answering a request reads only memory; feature pages go through the analyzer (one
    request at a time, as its caches are not thread-safe).
    """

    analyzer: ActivationSampleAnalyzer
    table: FeatureTable
    tokens: TokenIndex
    corpus: ContextCorpus
    sample_latent: Tensor
    sample_rank: Tensor
    token_strings: dict[int, str]
    token_lookup: dict[str, list[int]]
    histogram: dict
    directions: Optional[Tensor] = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    #: Without ``full_state.pt``: each saved feature's "Fires most on" from its file (over all its kept samples).
    listed_tokens: Optional[dict[int, tuple[list[tuple[int, int]], int]]] = None

    @property
    def summary(self):
        """The run summary of this save."""
        return self.analyzer.summary

    @classmethod
    def load(cls, path: Path, tokenizer: Any = None) -> RunIndex:
        """Read a samples directory (raises ``SamplesDirectoryError`` for a bad one) and build the index."""
        analyzer = ActivationSampleAnalyzer(path, tokenizer=tokenizer)
        state = analyzer._full_state()  # noqa: SLF001 - the analyzer validates it; loaded once, here
        index = cls._from_state(analyzer, state) if state is not None else cls._from_saved(analyzer)
        index.directions = analyzer.decoder_directions()
        return index

    @classmethod
    def _from_state(cls, analyzer: ActivationSampleAnalyzer, state: dict) -> RunIndex:
        num_latents, half = int(state["num_latents"]), int(state["half_window"])
        count = state["count"].to(torch.int64)
        fired = count > 0
        tokens_seen = int(state["tokens_seen"])
        safe = count.clamp(min=1).double()
        view = with_recent_view(state)
        if "recent" in view:
            limit = int(analyzer.summary.config.get("samples_per_feature_to_save") or state["top"]["capacity"])
            overlap = recent_overlaps(view, limit)
        else:
            overlap = torch.full((num_latents,), math.nan, dtype=torch.float64)
        step = lambda name: torch.where(state[name] == EMPTY, math.nan, state[name].double())  # noqa: E731
        columns = {
            "max_activation": _column_or_nan(state["max"], fired).nan_to_num(0.0),
            "activation_count": count.double(),
            "frequency": count.double() / tokens_seen if tokens_seen else torch.zeros(num_latents, dtype=torch.float64),
            "mean_activation": _column_or_nan(state["sum"] / safe, fired).nan_to_num(0.0),
            "recent_overlap": overlap,
            "first_step": step("first_step"),
            "last_step": step("last_step"),
        }
        # Warm the analyzer's caches so the first feature page costs what the others do.
        analyzer._view = (state, view)  # noqa: SLF001 - the analyzer keeps the view with the state it is of
        row_offsets(state["top"])
        top = state["top"]
        latents = torch.repeat_interleave(torch.arange(num_latents), top["count"].to(torch.int64))
        ranks = torch.arange(len(latents)) - row_offsets(top)[latents]
        activating = top["context_tokens"][:, half].to(torch.int64)
        decoder = analyzer._decoder()  # noqa: SLF001 - the decoding the feature pages use
        windows = top["context_tokens"]
        distinct = torch.unique(windows[windows >= 0]).tolist()
        decoder.prepare(distinct)
        strings = {i: decoder.token_str(i) for i in distinct}
        return cls._build(analyzer, torch.arange(num_latents), columns, latents, ranks, activating, windows, strings,
                          frequency_histogram(state))

    @classmethod
    def _from_saved(cls, analyzer: ActivationSampleAnalyzer) -> RunIndex:
        """Without ``full_state.pt``: the saved features only, from their files (a bounded set)."""
        features = [analyzer.feature(i) for i in analyzer.saved_features]
        stats = [f.stats for f in features]
        latents = torch.tensor([s.feature_idx for s in stats], dtype=torch.int64)

        def column(name: str) -> Tensor:
            values = [getattr(s, name) for s in stats]
            return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)

        columns = {name: column(name) for name in SORT_KEYS if name not in ("index", *_EXPLANATION_SORTS)}
        samples = [s for f in features for s in f.samples]
        width = max((len(s.context) for s in samples), default=1)
        windows = torch.full((len(samples), width), -1, dtype=torch.int64)
        strings: dict[int, str] = {}
        for n, sample in enumerate(samples):
            windows[n, : len(sample.context)] = torch.tensor([t.token_id for t in sample.context])
            strings.update((t.token_id, t.text) for t in sample.context)
        owner = torch.tensor([s.feature_idx for s in samples], dtype=torch.int64)
        ranks = torch.tensor([r for f in features for r in range(len(f.samples))], dtype=torch.int64)
        activating = torch.tensor([s.activating_token.token_id for s in samples], dtype=torch.int64)
        summary = analyzer.summary.frequency_histogram
        histogram = {"bin_edges": list(summary.bin_edges), "counts": list(summary.counts)}
        index = cls._build(analyzer, latents, columns, owner, ranks, activating, windows, strings, histogram)
        index.listed_tokens = {
            f.feature_idx: ([(t, n) for t, _, n in f.kept_token_counts], f.kept_samples)
            for f in features if f.kept_samples
        }
        for f in features:
            strings.update((t, text) for t, text, _ in f.kept_token_counts)
        return index

    def _top_tokens(self, latent: int, limit: int = 3) -> tuple[list[tuple[int, int]], int]:
        """A latent's "Fires most on" as ``(token_id, samples)`` over how many kept samples: the report's counts."""
        if self.listed_tokens is not None and latent in self.listed_tokens:
            tokens, over = self.listed_tokens[latent]
            return tokens[:limit], over
        return self.tokens.top_tokens(latent, limit), self.tokens.samples_of(latent)

    @classmethod
    def _build(cls, analyzer, latents, columns, owner, ranks, activating, windows, strings, histogram) -> RunIndex:
        dead_before = analyzer.summary.dead_before
        lookup: dict[str, list[int]] = {}
        for token_id in torch.unique(activating).tolist():
            lookup.setdefault(strings.get(token_id, "").strip().casefold(), []).append(token_id)
        return cls(
            analyzer=analyzer,
            table=FeatureTable(latents, columns, dead_before),
            tokens=TokenIndex(owner, activating),
            corpus=ContextCorpus(windows, strings),
            sample_latent=owner,
            sample_rank=ranks,
            token_strings=strings,
            token_lookup=lookup,
            histogram=histogram,
        )

    # ------------------------------------------------------------------ answers
    def summary_json(self) -> dict:
        """The run summary view of the HTML report plus the list's frequency histogram and choices."""
        run = views.summary_view(self.summary)
        run["summary"] = {
            "path": str(self.summary.path), "save_id": self.summary.save_id,
            "has_full_state": self.summary.has_full_state, "rank_by": self.summary.rank_by,
            "saved_features": len(self.summary.saved_features),
            "num_features": self.analyzer.num_features, "listed_features": len(self.table),
        }
        run["frequency_bins"] = [dataclasses.asdict(b) for b in run["frequency_bins"]]
        run["histogram"] = {"log10_edges": self.histogram["bin_edges"], "counts": self.histogram["counts"]}
        run["sort_keys"], run["filters"] = list(SORT_KEYS), list(FILTERS)
        run["dense_default"] = DENSE_FREQUENCY
        run["drift_threshold"] = DRIFT_THRESHOLD
        run["decoding_note"] = self.analyzer.decoding_note
        return jsonable(run)

    def _rows(self, rows: Tensor) -> list[dict]:
        columns = {name: values[rows].tolist() for name, values in self.table.columns.items()}
        latents = self.table.latents[rows].tolist()
        out = []
        for n, latent in enumerate(latents):
            value = {name: columns[name][n] for name in columns}
            top_tokens, over = self._top_tokens(latent)
            overlap = value["recent_overlap"]
            out.append(
                {
                    "idx": latent,
                    "max": formatting.value(value["max_activation"]),
                    "mean": formatting.value(value["mean_activation"]),
                    "count": formatting.count(value["activation_count"]),
                    "frequency": formatting.frequency(value["frequency"]),
                    "recent_overlap": None if math.isnan(overlap) else formatting.overlap(overlap),
                    "drift": overlap < DRIFT_THRESHOLD,
                    "first_step": None if math.isnan(value["first_step"]) else int(value["first_step"]),
                    "last_step": None if math.isnan(value["last_step"]) else int(value["last_step"]),
                    "values": value,
                    "top_tokens": [
                        {"token_id": t, "label": token_label(self.token_strings.get(t, str(t))), "samples": c}
                        for t, c in top_tokens
                    ],
                    "top_tokens_over": over,
                }
            )
        return jsonable(out)

    def feature_list(
        self,
        sort: str = "max_activation",
        descending: bool = True,
        kind: str = "all",
        dense_above: float = DENSE_FREQUENCY,
        log10_frequency: Optional[tuple[float, float]] = None,
        offset: int = 0,
        limit: int = 50,
        explanations: Optional[ExplanationIndex] = None,
        score_range: Optional[tuple[float, float]] = None,
    ) -> dict:
        """One page of the sorted, filtered feature list: ``total`` rows kept and this page's ``rows``.

        ``sort="score"`` orders by the explanations' detection score, ``"embedding_score"`` by their embedding
        AUROC; ``kind`` ``"explained"`` / ``"unexplained"`` and ``score_range`` (of the detection score) filter by
        them.
        """
        explanations = explanations if explanations is not None else empty_index(self.analyzer.num_features)
        if sort in _EXPLANATION_SORTS:
            order = explanations.order_by_score(self.table.latents, descending, sort)
        else:
            order = self.table.order(sort, descending)
        keep = self.table.mask(kind, dense_above, log10_frequency)
        meant = explanations.mask(self.table.latents, kind, score_range)
        if meant is not None:
            keep = meant if keep is None else keep & meant
        rows, total = self.table.page(order, keep, offset, limit)
        return {"total": total, "offset": offset, "rows": self._rows(rows)}

    def neighbours(self, idx: int, k: int, explanations: Optional[ExplanationIndex] = None) -> dict:
        """The ``k`` latents of closest decoder direction, each with its cosine, explanation and top tokens."""
        self.check_index(idx)
        if self.directions is None:
            return {"available": False, "neighbours": []}
        found = nearest_latents(self.directions, idx, k)
        explanations = explanations if explanations is not None else empty_index(self.analyzer.num_features)
        out = []
        for n in found:
            meant = explanations.get(n.feature_idx)
            tokens = [
                {"token_id": t, "label": token_label(self.token_strings.get(t, str(t))), "samples": c}
                for t, c in self.tokens.top_tokens(n.feature_idx)
            ]
            out.append({"idx": n.feature_idx, "cosine": n.cosine, "top_tokens": tokens,
                        "explanation": None if meant is None else meant.to_json(self.summary.global_step)})
        return jsonable({"available": True, "neighbours": out})

    def explanation_search(self, explanations: ExplanationIndex, text: str, offset: int = 0, limit: int = 50) -> dict:
        """The latents whose label or explanation best matches the words of ``text`` (BM25), as list rows."""
        latents, relevance, total = explanations.search(text, offset, limit)
        listed = self._listed(latents)
        rows = self._rows(self._table_rows(latents[listed])) if len(latents) else []
        for row, value in zip(rows, relevance[listed].tolist()):
            row["relevance"] = value
        return {"total": total, "offset": offset, "rows": rows}

    def _listed(self, latents: Tensor) -> Tensor:
        """Which of ``latents`` the feature table lists (without ``full_state.pt``: the saved ones only)."""
        if len(self.table) == self.analyzer.num_features:
            return torch.ones(len(latents), dtype=torch.bool)
        return torch.isin(latents, self.table.latents)

    def check_index(self, idx: int) -> int:
        """``idx`` if it is a latent of this run."""
        if not 0 <= idx < self.analyzer.num_features:
            raise NotFoundError(
                f"Feature {idx} does not exist: this run has latents 0 to {self.analyzer.num_features - 1}."
            )
        return idx

    def feature_page(self, idx: int, num_examples: Optional[int] = None) -> dict:
        """Everything the HTML report shows of one latent, as JSON (``render/html.py``'s feature view)."""
        self.check_index(idx)
        with self.lock:
            try:
                feature = self.analyzer.feature(idx, num_examples)
            except UnknownFeatureError as err:
                raise NotFoundError(str(err)) from err
            view = html.feature_view(feature)
        feature_max = feature.stats.max_activation
        view["examples"] = [example_json(s, feature_max) for s in feature.samples]
        for group in view["interval_groups"]:
            group.pop("examples")
        for group, source in zip(view["interval_groups"], [g for g in feature.interval_groups if g.count or g.samples]):
            group["examples"] = [example_json(s, feature_max) for s in source.samples]
        if view["recent"] is not None:
            view["recent"]["examples"] = [example_json(s, feature_max) for s in feature.recent_samples]
        if view["logit_effects"] is not None:
            view["logit_effects"] = {side: _labelled(items) for side, items in view["logit_effects"].items()}
        view["top_tokens"] = [{"label": token_label(text), "samples": n} for text, n in view["top_tokens"]]
        view["stats"] = dataclasses.asdict(feature.stats)
        view["stats"].pop("histogram")
        view["bins"] = [dataclasses.asdict(b) for b in view["bins"]]
        for bar in view["bars"]:
            bar["bin"] = dataclasses.asdict(bar["bin"])
        view["kept_samples"] = feature.stats.num_samples
        view["num_features"] = self.analyzer.num_features
        view["recent_window"] = formatting.step_range(self.summary.recent_window)
        return jsonable(view)

    def token_ids_for(self, text: str) -> list[int]:
        """Activating token ids whose display text equals ``text``, ignoring case and outer spaces."""
        return self.token_lookup.get(text.strip().casefold(), [])

    def token_search(self, token_ids: Sequence[int], offset: int = 0, limit: int = 50) -> dict:
        """The latents whose kept top samples most often have one of ``token_ids`` as activating token."""
        latents, counts = self.tokens.latents_for(token_ids)
        page, page_counts = latents[offset : offset + limit], counts[offset : offset + limit].tolist()
        kept = self.analyzer.num_features
        rows = self._rows(self._table_rows(page)) if kept else []
        for row, n in zip(rows, page_counts):
            row["token_samples"] = n
        tokens = [{"token_id": t, "label": token_label(self.token_strings.get(t, str(t)))} for t in token_ids]
        return {"total": len(latents), "offset": offset, "tokens": tokens, "rows": rows}

    def _table_rows(self, latents: Tensor) -> Tensor:
        """Rows of the feature table holding these latents (it lists every latent, or only the saved ones)."""
        if len(self.table) == self.analyzer.num_features:
            return latents
        sorted_latents, where = torch.sort(self.table.latents)
        return where[torch.searchsorted(sorted_latents, latents)]

    def context_latents(self, text: str, limit: int = 20, matches: int = MAX_CONTEXT_MATCHES) -> dict:
        """The latents whose kept top samples hold ``text`` in their context (case-insensitive), as list rows.

        Each row adds ``context_samples`` (how many of its top samples hold it) and ``example`` (the best of them);
        latents come by that count, then by index. At most ``matches`` samples are read (``capped`` says so).
        """
        samples, capped = self.corpus.samples_holding(text, matches)
        if not len(samples):
            return {"total": 0, "rows": [], "capped": capped}
        ranks = self.sample_rank[samples]
        width = int(ranks.max()) + 1
        # Sorted by (latent, rank): each latent's run of matches, its best-ranked one first.
        key = torch.sort(self.sample_latent[samples] * width + ranks).values
        latents, counts = torch.unique_consecutive(key // width, return_counts=True)
        best = (key % width)[torch.cumsum(counts, 0) - counts]
        order = torch.argsort(-counts, stable=True)  # ties stay by latent index
        latents, counts, best = latents[order], counts[order], best[order]
        shown = latents[:limit]
        rows = self._rows(self._table_rows(shown)) if len(shown) else []
        for row, n, rank in zip(rows, counts[:limit].tolist(), best[:limit].tolist()):
            latent = row["idx"]
            with self.lock:
                feature = self.analyzer.feature(latent, rank + 1)
            row["context_samples"] = n
            row["example"] = example_json(feature.samples[rank], feature.stats.max_activation)
            row["example"]["rank"] = rank + 1
        return jsonable({"total": len(latents), "rows": rows, "capped": capped})

    def context_search(self, text: str, offset: int = 0, limit: int = 20) -> dict:
        """Kept top samples whose context holds ``text`` (case-insensitive), each with its latent."""
        found, more = self.corpus.find(text, offset, limit)
        hits = []
        for sample in found:
            latent, rank = int(self.sample_latent[sample]), int(self.sample_rank[sample])
            with self.lock:
                feature = self.analyzer.feature(latent, rank + 1)
            hit = example_json(feature.samples[rank], feature.stats.max_activation)
            hit["rank"] = rank + 1
            hits.append(hit)
        return jsonable({"offset": offset, "hits": hits, "more": more})
