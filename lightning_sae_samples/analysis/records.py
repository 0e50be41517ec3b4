"""The records a samples directory is read into: typed, frozen, and shared by every reader.

:class:`~lightning_sae_samples.ActivationSampleAnalyzer` returns them; the renderers
(``render/``) and the export (``export.py``) take them. This module imports no other reader module,
so none of them imports another through it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_args

from lightning_sae_samples.config import RankBy
from lightning_sae_samples.health import DEFAULT_DEAD_WINDOW_STEPS

#: A latent whose ``recent_overlap`` is below this is flagged: its meaning may have moved.
DRIFT_THRESHOLD = 0.25
#: Lowest log10 firing frequency a frequency histogram edge may have (one token in 10**64: far below any run).
LOG10_FREQUENCY_FLOOR = -64.0


#: Largest integer a reader accepts: counts, steps and ids are int64 on the writer's side.
INT_LIMIT = 2**63 - 1
#: Largest magnitude of an activation-like number: activations are float32.
FLOAT_LIMIT = 3.4028234663852886e38


def _int(record: dict, key: str, minimum: int = 0) -> int:
    """``record[key]`` if it is an integer in ``[minimum, 2**63)`` (not a bool), else a ``ValueError`` naming it."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{key}` must be an integer, got {value!r:.60}")
    if not minimum <= value <= INT_LIMIT:
        raise ValueError(f"`{key}` must be an integer in [{minimum}, 2**63), got {value!r:.60}")
    return value


def _optional_int(record: dict, key: str, minimum: int = 0) -> Optional[int]:
    return None if record.get(key) is None else _int(record, key, minimum)


def _float(record: dict, key: str, low: float = -FLOAT_LIMIT, high: float = FLOAT_LIMIT) -> float:
    """``record[key]`` as a float if it is a number in ``[low, high]`` (not a bool), else a ``ValueError`` naming it."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{key}` must be a number, got {value!r:.60}")
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"`{key}` must be a finite number in [{low:.4g}, {high:.4g}], got {value!r:.60}")
    return float(value)


def _list(record: dict, key: str) -> list:
    value = record[key]
    if not isinstance(value, list):
        raise ValueError(f"`{key}` must be a list, got {type(value).__name__}")
    return value


def _str(record: dict, key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"`{key}` must be a string, got {type(value).__name__}")
    return value


def _record(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object, got {type(value).__name__}")
    return value



@dataclass(frozen=True)
class TokenEffect:
    """One token's logit change from a latent's decoder direction.

    Attributes:
        token_id: Vocabulary id.
        token: Raw display string (not escaped; see ``render/escaping.py`` before showing it).
        value: ``(W_dec[j] @ W_U)[token_id]``.
    """

    token_id: int
    token: str
    value: float

    def to_json(self) -> dict:
        """``{"token_id", "token", "value"}``."""
        return {"token_id": self.token_id, "token": self.token, "value": self.value}


@dataclass(frozen=True)
class LogitEffects:
    """The tokens a latent promotes and suppresses most.

    Attributes:
        feature_idx: Latent index.
        promoted: Largest logit changes, largest first.
        suppressed: Smallest (most negative) logit changes, smallest first.
    """

    feature_idx: int
    promoted: tuple[TokenEffect, ...]
    suppressed: tuple[TokenEffect, ...]

    def to_json(self) -> dict:
        """The ``logit_effects`` object of a feature file (see ``docs/format.md``)."""
        return {
            "promoted": [t.to_json() for t in self.promoted],
            "suppressed": [t.to_json() for t in self.suppressed],
        }

    @classmethod
    def from_json(cls, feature_idx: int, record: dict) -> LogitEffects:
        """Build from a feature file's ``logit_effects`` object."""

        def effects(key: str) -> tuple[TokenEffect, ...]:
            items = [_record(e, f"an entry of `logit_effects.{key}`") for e in _list(record, key)]
            return tuple(TokenEffect(_int(e, "token_id"), _str(e, "token"), _float(e, "value")) for e in items)

        record = _record(record, "`logit_effects`")
        return cls(int(feature_idx), effects("promoted"), effects("suppressed"))

@dataclass(frozen=True)
class Histogram:
    """Counts over fixed bins.

    Attributes:
        bin_edges: ``len(counts) + 1`` edges.
        counts: Count per bin.
    """

    bin_edges: tuple[float, ...]
    counts: tuple[int, ...]

    @classmethod
    def from_json(cls, record: dict, name: str = "histogram", log10: bool = False) -> Histogram:
        """Build from ``{"bin_edges": [...], "counts": [...]}`` (``log10``: edges are log10 frequencies, <= 0)."""
        record = _record(record, f"`{name}`")
        edges, counts = _list(record, "bin_edges"), _list(record, "counts")
        if len(edges) != len(counts) + 1 and (edges or counts):
            raise ValueError(f"`{name}.bin_edges` must have one entry more than `counts` ({len(edges)} and"
                             f" {len(counts)})")
        low, high = (LOG10_FREQUENCY_FLOOR, 0.0) if log10 else (-FLOAT_LIMIT, FLOAT_LIMIT)
        bin_edges = tuple(_float({f"{name}.bin_edges": e}, f"{name}.bin_edges", low, high) for e in edges)
        if any(b <= a for a, b in zip(bin_edges, bin_edges[1:])):
            raise ValueError(f"`{name}.bin_edges` must be ascending, got {list(bin_edges)[:8]!r:.80}")
        return cls(bin_edges, tuple(_int({f"{name}.counts": c}, f"{name}.counts") for c in counts))

    @property
    def total(self) -> int:
        """Sum of all counts."""
        return sum(self.counts)


@dataclass(frozen=True)
class FeatureStats:
    """Statistics of one latent over everything collected (see ``docs/format.md``).

    Attributes:
        feature_idx: Latent index.
        num_samples: Top samples kept in memory for it.
        max_activation: Largest kept activation.
        mean_activation: Mean over all activations above the threshold.
        std_activation: Population standard deviation of those.
        min_activation: Smallest activation above the threshold.
        activation_count: Number of activations above the threshold.
        all_time_max: Largest activation seen.
        tokens_seen: Tokens in the collected batches.
        frequency: ``activation_count / tokens_seen``.
        first_step: First step it fired at (``None`` if never).
        last_step: Last step it fired at (``None`` if never).
        histogram: Histogram of its activation values.
        recent_overlap: Jaccard overlap of the activating tokens of its recent-window and all-time top
            samples (low: its meaning may have moved); ``None`` when the run kept no recent window.
    """

    feature_idx: int
    num_samples: int
    max_activation: float
    mean_activation: float
    std_activation: float
    min_activation: float
    activation_count: int
    all_time_max: float
    tokens_seen: int
    frequency: float
    first_step: Optional[int]
    last_step: Optional[int]
    histogram: Histogram
    recent_overlap: Optional[float] = None

    @classmethod
    def from_json(cls, record: dict) -> FeatureStats:
        """Build from a feature file's ``statistics`` object."""
        record = _record(record, "`statistics`")
        return cls(
            feature_idx=_int(record, "feature_idx"),
            num_samples=_int(record, "num_samples"),
            max_activation=_float(record, "max_activation"),
            mean_activation=_float(record, "mean_activation"),
            std_activation=_float(record, "std_activation", 0.0),
            min_activation=_float(record, "min_activation"),
            activation_count=_int(record, "activation_count"),
            all_time_max=_float(record, "all_time_max"),
            tokens_seen=_int(record, "tokens_seen"),
            frequency=_float(record, "frequency", 0.0, 1.0),
            first_step=_optional_int(record, "first_step"),
            last_step=_optional_int(record, "last_step"),
            histogram=Histogram.from_json(record["histogram"]),
            recent_overlap=None if record.get("recent_overlap") is None else _float(record, "recent_overlap", 0.0, 1.0),
        )


@dataclass(frozen=True)
class ContextToken:
    """One token of a sample's context window.

    Attributes:
        token_id: Token id.
        text: Raw display string (not escaped; see ``render/escaping.py`` before showing it).
        activation: The latent's activation on this token, or ``None`` where it is unknown: a shuffled row knows
            only its own token's activation, not its neighbours' (see ``docs/rows.md``).
    """

    token_id: int
    text: str
    activation: Optional[float]


@dataclass(frozen=True)
class Sample:
    """One top-activating occurrence of a latent.

    Attributes:
        feature_idx: Latent index.
        activation_value: Activation on the activating token.
        step: Global step at which it was seen.
        position: Position of the activating token in its sequence.
        context: Tokens around it, clipped at the sequence edges.
        context_position: Index of the activating token in ``context``.
        context_text: Decoded context.
    """

    feature_idx: int
    activation_value: float
    step: int
    position: int
    context: tuple[ContextToken, ...]
    context_position: int
    context_text: str

    @property
    def activating_token(self) -> ContextToken:
        """The token the latent fired on."""
        return self.context[self.context_position]

    @property
    def neighbours_known(self) -> bool:
        """Whether the activations of the context's other tokens are known (not so for shuffled rows)."""
        return all(t.activation is not None for t in self.context)

    @classmethod
    def from_json(cls, record: dict) -> Sample:
        """Build from one ``top_samples`` record."""
        record = _record(record, "a sample")
        ids, strs = _list(record, "context_tokens"), _list(record, "context_token_strs")
        acts = _list(record, "context_activations")
        if not (len(ids) == len(strs) == len(acts)) or not 0 <= _int(record, "context_position") < len(ids):
            raise ValueError("`context_tokens`, `context_token_strs`, `context_activations` and `context_position`"
                             " disagree")
        context = tuple(
            ContextToken(_int({"context_tokens": i}, "context_tokens"), _str({"context_token_strs": s},
                         "context_token_strs"),
                         None if a is None and n != record["context_position"]
                         else _float({"context_activations": a}, "context_activations"))
            for n, (i, s, a) in enumerate(zip(ids, strs, acts))
        )
        return cls(
            feature_idx=_int(record, "feature_idx"),
            activation_value=_float(record, "activation_value"),
            step=_int(record, "step"),
            position=_int(record, "position"),
            context=context,
            context_position=_int(record, "context_position"),
            context_text=_str(record, "context_text"),
        )


@dataclass(frozen=True)
class IntervalGroup:
    """Samples drawn uniformly at random among a latent's activations in one activation interval.

    The intervals are half-decades above the activation threshold: the first holds the values above the
    threshold and below its upper edge, the others ``low <= value < high``, the last is open above.

    Attributes:
        low: Lower edge (for the first interval: the threshold, itself excluded).
        high: Upper edge (excluded), or ``None`` for the last, open interval.
        count: Activations of the latent in this interval over the whole collection.
        samples: The random samples kept from it, in the order the feature file lists them.
        low_open: Whether ``low`` itself is excluded (the first interval, starting at the threshold).
    """

    low: float
    high: Optional[float]
    count: int
    samples: tuple[Sample, ...]
    low_open: bool = False

    @classmethod
    def from_json(cls, record: dict, first: bool = False) -> IntervalGroup:
        """Build from one ``interval_samples`` record (``first``: the lowest interval)."""
        record = _record(record, "an interval group")
        bounds = _list(record, "interval")
        if len(bounds) != 2:
            raise ValueError(f"`interval` must be [low, high], got {bounds!r}")
        return cls(
            low=_float({"interval": bounds[0]}, "interval"),
            high=None if bounds[1] is None else _float({"interval": bounds[1]}, "interval"),
            count=_int(record, "count"),
            samples=tuple(Sample.from_json(s) for s in _list(record, "samples")),
            low_open=first,
        )


@dataclass(frozen=True)
class NeighbourInfo:
    """A latent whose decoder direction is close to another's, as reports show it.

    Attributes:
        feature_idx: The neighbour.
        cosine: Cosine of the two decoder directions.
        explanation: Its label or explanation text, when it has one.
        top_tokens: Its most frequent activating tokens (text), when its samples are known.
    """

    feature_idx: int
    cosine: float
    explanation: Optional[str] = None
    top_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class Meaning:
    """What a latent means in words: its explanation (with its score) and the label a person gave it.

    Attributes:
        explanation: The latest explanation text, or ``None``.
        score: Its detection score (balanced accuracy), or ``None`` when not scored.
        score_contexts: How many contexts the score was computed on.
        random_score: The score of a random explanation (the noise baseline), or ``None``.
        embedding_score: Its embedding AUROC, or ``None`` when not scored.
        embedding_contexts: How many contexts the embedding AUROC was computed on.
        embedding_random_score: The embedding AUROC of a random explanation (the noise baseline), or ``None``.
        model: The model that wrote it.
        stale: Whether it was written from an older save than the samples shown (its ``samples_step`` is below
            the save's ``global_step``).
        samples_step: The step of the save it was written from.
        label: The latest label a person typed, or ``None``.
    """

    explanation: Optional[str] = None
    score: Optional[float] = None
    score_contexts: Optional[int] = None
    random_score: Optional[float] = None
    embedding_score: Optional[float] = None
    embedding_contexts: Optional[int] = None
    embedding_random_score: Optional[float] = None
    model: str = ""
    stale: bool = False
    samples_step: Optional[int] = None
    label: Optional[str] = None


@dataclass(frozen=True)
class FeatureSamples:
    """A latent's statistics and its top samples, best first, with its optional sample groups.

    Attributes:
        stats: Its statistics.
        samples: Its top samples (as many as were asked for and are available).
        saved: Whether it has a feature file (else it comes from ``full_state.pt`` only).
        logit_effects: Tokens its decoder direction promotes and suppresses most, when known (from its
            feature file, or computed with :meth:`ActivationSampleAnalyzer.logit_effects`).
        interval_groups: Random samples per activation interval, lowest interval first (empty when the
            run kept none: ``samples_per_interval=0``). Intervals the latent never reached are included
            with ``count == 0``.
        recent_samples: Its top samples of the recent window, best first (empty when the run kept no
            recent window, or the latent did not fire in it; see :attr:`recent_overlap`).
        story: Its "through training" line from the run's history (birth, meaning changes, deaths, revivals
            and a frequency sparkline; raw token text), or ``None`` without a history.
        kept_token_counts: ``(token_id, text, samples)`` of its first activating tokens among all its kept top
            samples, most first (ties: the lower id first): its file's ``activating_tokens``, or from
            ``full_state.pt``; empty for files of earlier versions.
        kept_samples: How many kept top samples ``kept_token_counts`` counts over (0: not known).
        meaning: Its explanation, score and label from the explanations sidecar, when it has any.
        neighbours: The latents of closest decoder direction, best first (empty without
            ``decoder_directions.pt``, or when not asked for).
    """

    stats: FeatureStats
    samples: tuple[Sample, ...]
    saved: bool = True
    logit_effects: Optional[LogitEffects] = None
    interval_groups: tuple[IntervalGroup, ...] = ()
    recent_samples: tuple[Sample, ...] = ()
    story: Optional[str] = None
    kept_token_counts: tuple[tuple[int, str, int], ...] = ()
    kept_samples: int = 0
    meaning: Optional[Meaning] = None
    neighbours: tuple[NeighbourInfo, ...] = ()

    @property
    def feature_idx(self) -> int:
        """Latent index."""
        return self.stats.feature_idx

    @property
    def recent_overlap(self) -> Optional[float]:
        """Jaccard overlap of the recent and all-time top activating tokens (``None``: no recent window)."""
        return self.stats.recent_overlap

    @property
    def recent_drift(self) -> bool:
        """Whether :attr:`recent_overlap` is below :data:`DRIFT_THRESHOLD`: its meaning may have moved."""
        return self.recent_overlap is not None and self.recent_overlap < DRIFT_THRESHOLD

    def top_tokens(self, limit: int = 5) -> list[tuple[str, int]]:
        """The activating tokens it fires on most, as ``(text, samples)``, over :attr:`top_tokens_over` samples.

        Over every kept top sample when ``full_state.pt`` holds them (what ``serve`` counts), else over
        :attr:`samples`; most first, ties the lower token id first.
        """
        if self.kept_samples:
            return [(text, n) for _, text, n in self.kept_token_counts[:limit]]
        counts = Counter((s.activating_token.token_id, s.activating_token.text) for s in self.samples)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0][0]))
        return [(text, n) for (_, text), n in ranked[:limit]]

    @property
    def top_tokens_over(self) -> int:
        """How many top samples :meth:`top_tokens` counts over."""
        return self.kept_samples or len(self.samples)


@dataclass(frozen=True)
class RunSummary:
    """Run-level facts from ``collection_summary.json``.

    Attributes:
        path: The samples directory.
        global_step: Trainer step at the save.
        save_id: Save counter (``None`` if not recorded).
        num_features_tracked: Number of latents ``F``.
        alive_features: Latents that fired at least once.
        never_fired_features: Latents that never fired.
        total_samples_seen: Activations above threshold, over all latents.
        total_samples_stored: Kept top samples over all latents.
        steps_collected: Optimizer steps that were collected.
        tokens_seen: Tokens in collected batches.
        first_collected_step: First collected step.
        last_collected_step: Last collected step.
        frequency_histogram: Histogram of log10 firing frequency of alive latents.
        rank_by: Ranking used to choose the saved features.
        saved_features: Saved feature indices, in rank order.
        has_full_state: Whether ``full_state.pt`` is present (every latent reachable).
        config: The callback configuration recorded with the run.
        source: ``"train"`` (training-time, many SAE states) or the evaluation loop of a snapshot (one state).
        trained_step: Of a snapshot whose weights predate the run's last training step: that step (else ``None``).
    """

    path: Path
    global_step: int
    save_id: Optional[int]
    num_features_tracked: int
    alive_features: int
    never_fired_features: int
    total_samples_seen: int
    total_samples_stored: int
    steps_collected: int
    tokens_seen: int
    first_collected_step: Optional[int]
    last_collected_step: Optional[int]
    frequency_histogram: Histogram
    rank_by: str
    saved_features: tuple[int, ...]
    has_full_state: bool
    config: dict = field(default_factory=dict)
    source: str = "train"
    trained_step: Optional[int] = None

    @classmethod
    def from_json(cls, raw: Any, path: Path, has_full_state: bool) -> RunSummary:
        """Build from a parsed ``collection_summary.json`` of the samples directory ``path``.

        Raises:
            ValueError: A field is missing or holds a value the writer never writes (the message names it).
        """
        raw = _record(raw, "the summary")
        config = _config(raw.get("config"))
        num_features = _int(raw, "num_features_tracked", 1)
        saved = tuple(
            _int(_record(e, "an entry of `top_features_by_activation`"), "feature_idx")
            for e in _list({"top_features_by_activation": raw.get("top_features_by_activation", [])},
                           "top_features_by_activation")
        )
        if saved and max(saved) >= num_features:
            raise ValueError(f"`top_features_by_activation` lists feature {max(saved)}, beyond"
                             f" `num_features_tracked` = {num_features}")
        alive, never = _int(raw, "alive_features"), _int(raw, "never_fired_features")
        if alive > num_features or never > num_features:
            raise ValueError(f"`alive_features` ({alive}) and `never_fired_features` ({never}) cannot exceed"
                             f" `num_features_tracked` ({num_features})")
        source = raw.get("source", "train")
        return cls(
            path=path,
            global_step=_int(raw, "global_step") if "global_step" in raw else 0,
            save_id=raw.get("save_id"),
            num_features_tracked=num_features,
            alive_features=alive,
            never_fired_features=never,
            total_samples_seen=_int(raw, "total_samples_seen"),
            total_samples_stored=_int(raw, "total_samples_stored"),
            steps_collected=_int(raw, "steps_collected"),
            tokens_seen=_int(raw, "tokens_seen"),
            first_collected_step=_optional_int(raw, "first_collected_step"),
            last_collected_step=_optional_int(raw, "last_collected_step"),
            frequency_histogram=Histogram.from_json(raw["frequency_histogram"], "frequency_histogram", log10=True),
            rank_by=config.get("rank_features_by") or _RANK_CHOICES[0],
            saved_features=saved,
            has_full_state=has_full_state,
            config=config,
            source=_str({"source": source}, "source") if source is not None else "train",
            trained_step=_optional_int(raw, "trained_step"),
        )

    @property
    def kind(self) -> str:
        """What the directory is, in words: a training-time collection (many SAE states) or a snapshot (one)."""
        if self.source != "train":
            older = (
                f"; older than the run's last training step {self.trained_step}"
                if self.trained_step is not None and self.trained_step > self.global_step else ""
            )
            return f"snapshot of one SAE state (step {self.global_step}, {self.source} run{older})"
        first, last = self.first_collected_step, self.last_collected_step
        if first is None or first == last:
            return "training-time collection" + ("" if first is None else f" (step {first})")
        return f"training-time collection, mixing the SAE states of steps {first}–{last}"

    @property
    def alive_fraction(self) -> float:
        """Share of latents that fired."""
        return self.alive_features / self.num_features_tracked if self.num_features_tracked else 0.0

    @property
    def dead_before(self) -> Optional[int]:
        """A latent whose last firing step is below this is dead (silent for ``dead_window_steps``), or ``None``.

        ``None`` while the collection does not cover one whole window up to its last collected step: then only the
        latents that never fired are dead.
        """
        window = int(self.config.get("dead_window_steps") or DEFAULT_DEAD_WINDOW_STEPS)
        last, first = self.last_collected_step, self.first_collected_step
        return last - window + 1 if last is not None and last - window + 1 >= (first or 0) else None

    @property
    def recent_window_steps(self) -> Optional[int]:
        """Block length in steps of the recent window (``None``: the run kept no recent window)."""
        steps = self.config.get("recent_window_steps")
        return int(steps) if steps else None

    @property
    def recent_window(self) -> Optional[tuple[int, int]]:
        """First and last step of the recent window at this save: the current and the previous block.

        ``None`` when the run kept no recent window or collected nothing.
        """
        block_steps = self.recent_window_steps
        if block_steps is None or self.last_collected_step is None:
            return None
        last = int(self.last_collected_step)
        start = (last // block_steps - 1) * block_steps
        if self.first_collected_step is not None:
            start = max(start, int(self.first_collected_step))
        return max(start, 0), last


_RANK_CHOICES = get_args(RankBy)
#: Settings of ``config`` that readers compute with, and the smallest value each may take (``None``: unset).
_CONFIG_INTEGERS = {"recent_window_steps": 0, "samples_per_feature_to_save": 0, "dead_window_steps": 0,
                    "max_samples_per_feature": 0, "samples_per_interval": 0}
#: Deepest nesting of ``config`` (the writer writes plain settings: one level, lists of ids in two).
_CONFIG_DEPTH = 8


def _config(value: Any) -> dict:
    """The summary's ``config`` checked where readers compute with it (the rest is shown as recorded)."""
    if value is None:
        return {}
    config = dict(_record(value, "`config`"))
    for key, minimum in _CONFIG_INTEGERS.items():
        if config.get(key) is not None:
            _int(config, key, minimum)
    rank = config.get("rank_features_by")
    if rank is not None and rank not in _RANK_CHOICES:
        raise ValueError(f"`config.rank_features_by` must be one of {', '.join(_RANK_CHOICES)}, got {rank!r:.60}")
    if config.get("activation_threshold") is not None:
        _float(config, "activation_threshold")
    nodes = [(v, 1) for v in config.values()]
    while nodes:
        node, depth = nodes.pop()
        if depth > _CONFIG_DEPTH:
            raise ValueError(f"`config` is nested more than {_CONFIG_DEPTH} levels deep")
        if isinstance(node, dict):
            nodes.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            nodes.extend((v, depth + 1) for v in node)
    return config
