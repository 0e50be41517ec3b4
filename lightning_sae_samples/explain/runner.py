"""``explain``: choose the latents, ask for explanations, score them, and append every result as it arrives.

Resumable by construction: a latent already explained with the same model and prompt version is not asked
again (only scored, if its score is missing), and each explanation and each score is appended to the sidecar
(:mod:`lightning_sae_samples.analysis.explanations`) the moment it exists, so an interrupted run loses nothing
it had received.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.explanations import (
    ExplanationRecord,
    append_explanations,
    iter_explanation_records,
    utc_now,
)
from lightning_sae_samples.analysis.records import FeatureSamples, Sample
from lightning_sae_samples.explain.backends import ChatBackend
from lightning_sae_samples.explain.progress import ExplainProgress
from lightning_sae_samples.explain.prompts import (
    PROMPT_VERSION,
    context_text,
    detection_prompt,
    explanation_prompt,
    parse_detection,
    parse_explanation,
)
from lightning_sae_samples.explain.scoring import (
    balanced_accuracy,
    decoy_explanation,
    non_activating,
    split_samples,
)

#: Latents whose samples make up the pool of non-activating contexts: the save's first saved features.
POOL_LATENTS = 256
#: Tokens a yes/no answer may take.
DETECTION_MAX_TOKENS = 3


class RequestBudgetError(ValueError):
    """The run would send more requests than ``max_requests`` allows without ``yes``."""


@dataclass
class ExplainSettings:
    """What ``explain`` does (the command's options, one home).

    Attributes:
        features: Latents to explain; default: those that fired, best first (``rank_by``).
        top: Explain at most this many of them.
        min_frequency: Skip latents that fire on a smaller share of tokens.
        rank_by: Ranking of the default latents (default: the run's).
        shown_top: Top samples in the explanation prompt.
        shown_interval: Interval samples (from across the activation range) in the explanation prompt.
        positives: Held-out activating contexts per score.
        negatives: Non-activating contexts (other latents' samples) per score.
        score: Score the explanations (and a random explanation) with the detection scorer.
        max_tokens: Tokens an explanation answer may take.
        max_requests: Refuse to send more requests than this unless ``yes``.
        yes: Send however many requests the run needs.
    """

    features: Optional[list[int]] = None
    top: Optional[int] = None
    min_frequency: float = 0.0
    rank_by: Optional[str] = None
    shown_top: int = 10
    shown_interval: int = 5
    positives: int = 5
    negatives: int = 5
    score: bool = True
    max_tokens: int = 60
    max_requests: int = 500
    yes: bool = False

    def __post_init__(self) -> None:
        for name in ("shown_top", "shown_interval", "positives", "negatives", "max_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.shown_top + self.shown_interval < 1:
            raise ValueError("The explanation prompt needs at least one sample: raise `shown_top`.")
        if self.top is not None and self.top < 0:
            raise ValueError(f"`top` must be >= 0, got {self.top}.")
        if self.max_tokens < 1:
            raise ValueError(f"`max_tokens` must be >= 1, got {self.max_tokens}.")
        if self.score and self.positives + self.negatives < 1:
            raise ValueError("Scoring needs contexts: raise `positives`/`negatives`, or turn scoring off.")


@dataclass
class ExplainResult:
    """What one ``explain`` run did.

    Attributes:
        latents: The latents it considered, in order.
        explained: Latents it asked an explanation for.
        scored: Latents it scored.
        skipped: Latents already explained (and scored) with this model and prompt version.
        requests: Requests it sent.
        seconds: Wall time of the requests.
        records: The final record of every latent it explained or scored.
    """

    latents: list[int]
    explained: list[int] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0
    records: dict[int, ExplanationRecord] = field(default_factory=dict)


def choose_latents(analyzer: ActivationSampleAnalyzer, settings: ExplainSettings) -> list[int]:
    """The latents to explain: ``features`` as given, else those that fired, best first, filtered and cut."""
    if settings.features is not None:
        return [analyzer.feature(i, 0).feature_idx for i in dict.fromkeys(settings.features)]
    stats = analyzer.features(settings.rank_by)
    chosen = [s.feature_idx for s in stats if s.activation_count > 0 and s.frequency >= settings.min_frequency]
    return chosen if settings.top is None else chosen[: settings.top]


def _ours(record: ExplanationRecord, model: str) -> bool:
    return (record.kind == "explanation" and record.source == "explain" and record.model == model
            and record.prompt_version == PROMPT_VERSION)


def _pool(analyzer: ActivationSampleAnalyzer) -> list[Sample]:
    """Samples of many latents: where the non-activating contexts come from.

    Taken from the save alone, never from the latents this run explains, so that a latent's contexts and scores
    are the same whether it is explained with others, alone, or in a run resumed after an interruption.
    """
    pool: list[Sample] = []
    for idx in analyzer.saved_features[:POOL_LATENTS]:
        feature = analyzer.feature(idx)
        pool += list(feature.samples) + [s for g in feature.interval_groups for s in g.samples]
    return pool


def explain_latents(
    samples_dir: Any,
    backend: ChatBackend,
    settings: Optional[ExplainSettings] = None,
    console: Any = None,
    analyzer: Optional[ActivationSampleAnalyzer] = None,
) -> ExplainResult:
    """Explain (and score) latents of ``samples_dir`` with ``backend``; every result is appended as it arrives.

    Args:
        samples_dir: The samples directory.
        backend: Where the requests go.
        settings: What to do (default: :class:`ExplainSettings`).
        console: A rich console for the progress (:class:`ExplainProgress`; none without one).
        analyzer: The opened directory, if the caller has it.

    Raises:
        RequestBudgetError: More requests than ``settings.max_requests`` and not ``settings.yes``.
        SamplesDirectoryError: The directory or its sidecar is not valid.
    """
    settings = settings or ExplainSettings()
    analyzer = analyzer or ActivationSampleAnalyzer(samples_dir)
    samples_dir = Path(analyzer.directory.path)
    latents = choose_latents(analyzer, settings)
    result = ExplainResult(latents=latents)
    existing: dict[int, ExplanationRecord] = {}
    for record in iter_explanation_records(samples_dir):
        if _ours(record, backend.model_name):
            existing[record.latent] = record
    to_explain = [i for i in latents if i not in existing]
    to_score = [i for i in latents if settings.score and (i not in existing or existing[i].score is None)]
    result.skipped = [i for i in latents if i not in to_explain and i not in to_score]
    contexts = settings.positives + settings.negatives
    needed = len(to_explain) + 2 * contexts * len(to_score)
    if needed > settings.max_requests and not settings.yes:
        raise RequestBudgetError(
            f"This run would send up to {needed} requests ({len(to_explain)} explanations, {len(to_score)} latents"
            f" scored on {contexts} contexts twice: their explanation and a random one), more than --max-requests"
            f" {settings.max_requests}. Pass --yes to send them, raise --max-requests, or explain fewer latents"
            " (--top N, --features, --min-frequency)."
        )
    work = sorted(set(to_explain) | set(to_score), key=latents.index)
    num_examples = settings.shown_top + settings.positives + 10
    loaded = {i: analyzer.feature(i, num_examples) for i in work}
    splits = {i: split_samples(loaded[i], settings.shown_top, settings.shown_interval, settings.positives)
              for i in work}
    step = analyzer.summary.global_step
    progress = ExplainProgress(console, needed, len(to_explain), len(to_score))
    started = time.perf_counter()
    try:
        if to_explain:
            conversations = [explanation_prompt(splits[i].shown) for i in to_explain]
            for n, answer in backend.answers(conversations, settings.max_tokens):
                latent = to_explain[n]
                text = parse_explanation(answer) or " ".join(answer.split())[:200] or "(no answer)"
                record = ExplanationRecord(latent=latent, text=text, model=backend.model_name,
                                           prompt_version=PROMPT_VERSION, samples_step=step, source="explain")
                append_explanations(samples_dir, [record])
                existing[latent] = result.records[latent] = record
                result.explained.append(latent)
                result.requests += 1
                progress.advance("explained")
        if to_score:
            _score(samples_dir, backend, settings, analyzer, loaded, splits, to_score, existing, result,
                   progress)
    finally:
        progress.stop()
        result.seconds = time.perf_counter() - started
    return result


def _score(
    samples_dir: Path,
    backend: ChatBackend,
    settings: ExplainSettings,
    analyzer: ActivationSampleAnalyzer,
    loaded: dict[int, FeatureSamples],
    splits: dict[int, Any],
    to_score: Sequence[int],
    existing: dict[int, ExplanationRecord],
    result: ExplainResult,
    progress: ExplainProgress,
) -> None:
    pool = _pool(analyzer)
    conversations: list[list[dict[str, str]]] = []
    owners: list[tuple[int, bool, bool]] = []  # (latent, activating, random explanation)
    for latent in to_score:
        feature = loaded[latent]
        own = list(feature.samples) + [s for g in feature.interval_groups for s in g.samples]
        positives = list(splits[latent].held_out)
        negatives = non_activating(latent, pool, own, settings.negatives)
        # From the save alone (not from the explanations that exist by now), as are the contexts.
        baseline = decoy_explanation(latent, pool)
        for sample, activating in [(s, True) for s in positives] + [(s, False) for s in negatives]:
            for explanation, is_random in ((existing[latent].text, False), (baseline, True)):
                conversations.append(detection_prompt(explanation, context_text(sample)))
                owners.append((latent, activating, is_random))
    answers: dict[int, dict[bool, list[tuple[bool, bool]]]] = {i: {False: [], True: []} for i in to_score}
    remaining = {i: sum(1 for o in owners if o[0] == i) for i in to_score}
    progress.expect(len(conversations))  # the budget counted every context; a latent may have fewer
    for n, answer in backend.answers(conversations, DETECTION_MAX_TOKENS):
        latent, activating, is_random = owners[n]
        answers[latent][is_random].append((activating, parse_detection(answer)))
        result.requests += 1
        remaining[latent] -= 1
        if remaining[latent] > 0:
            progress.advance()
        else:
            real, baseline_answers = answers[latent][False], answers[latent][True]
            record = dataclasses.replace(
                existing[latent],
                score=balanced_accuracy([a for a, _ in real], [p for _, p in real]) if real else None,
                score_contexts=len(real),
                random_score=balanced_accuracy([a for a, _ in baseline_answers], [p for _, p in baseline_answers])
                if baseline_answers else None,
                time=utc_now(),
            )
            append_explanations(samples_dir, [record])
            existing[latent] = result.records[latent] = record
            result.scored.append(latent)
            progress.advance("scored")
