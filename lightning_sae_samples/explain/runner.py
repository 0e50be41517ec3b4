"""``explain``: choose the latents, explain them, score them, and append every result as it arrives.

The explainer is a language model (``explainer="llm"``, through a chat backend) or the plain top-tokens baseline
(``"top-tokens"``, :mod:`lightning_sae_samples.explain.top_tokens`). Two scorers: the embedding AUROC (with a
sentence embedder, :mod:`lightning_sae_samples.explain.embedding`; offline) and delphi's detection score (with
a chat backend). Resumable by construction: a latent already explained with the same model and prompt version
is not explained again (only scored, for each score it misses), and each explanation and each score is appended
to the sidecar (:mod:`lightning_sae_samples.analysis.explanations`) the moment it exists, so an interrupted run
loses nothing it had received.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.explanations import (
    ExplanationRecord,
    append_explanations,
    iter_explanation_records,
    utc_now,
)
from lightning_sae_samples.analysis.records import FeatureSamples, Sample
from lightning_sae_samples.explain.backends import ChatBackend
from lightning_sae_samples.explain.embedding import SentenceEmbedder, auroc, padded
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
    Decoys,
    balanced_accuracy,
    non_activating,
    split_samples,
)
from lightning_sae_samples.explain.top_tokens import TOP_TOKENS_MODEL, TOP_TOKENS_VERSION, top_tokens_explanation

#: Latents whose samples make up the pool of non-activating contexts: the save's first saved features.
POOL_LATENTS = 256
#: Tokens a yes/no answer may take.
DETECTION_MAX_TOKENS = 3


#: The explainers ``ExplainSettings.explainer`` names.
EXPLAINERS = ("llm", "top-tokens")


class RequestBudgetError(ValueError):
    """The run would send more requests than ``max_requests`` allows without ``yes``."""


@dataclass
class ExplainSettings:
    """What ``explain`` does (the command's options, one home).

    Attributes:
        explainer: ``"llm"``: a language model (the chat backend) writes the explanations; ``"top-tokens"``: the
            latent's most frequent activating tokens and their neighbours, no model needed.
        features: Latents to explain; default: those that fired, best first (``rank_by``).
        top: Explain at most this many of them.
        min_frequency: Skip latents that fire on a smaller share of tokens.
        rank_by: Ranking of the default latents (default: the run's).
        shown_top: Top samples in the explanation prompt.
        shown_interval: Interval samples (from across the activation range) in the explanation prompt.
        positives: Held-out activating contexts per detection score.
        negatives: Non-activating contexts (other latents' samples) per detection score.
        embedding_positives: Held-out activating contexts per embedding AUROC.
        embedding_negatives: Non-activating contexts per embedding AUROC.
        score: Score the explanations (and a random explanation): the embedding AUROC with an embedder, the
            detection score with a chat backend.
        max_tokens: Tokens an explanation answer may take.
        max_requests: Refuse to send more requests than this unless ``yes``.
        yes: Send however many requests the run needs.
    """

    explainer: Literal["llm", "top-tokens"] = "llm"
    features: Optional[list[int]] = None
    top: Optional[int] = None
    min_frequency: float = 0.0
    rank_by: Optional[str] = None
    shown_top: int = 10
    shown_interval: int = 5
    positives: int = 5
    negatives: int = 5
    embedding_positives: int = 20
    embedding_negatives: int = 20
    score: bool = True
    max_tokens: int = 60
    max_requests: int = 500
    yes: bool = False

    def __post_init__(self) -> None:
        if self.explainer not in EXPLAINERS:
            raise ValueError(f"`explainer` must be one of {', '.join(EXPLAINERS)}, got {self.explainer!r}.")
        for name in ("shown_top", "shown_interval", "positives", "negatives", "embedding_positives",
                     "embedding_negatives", "max_requests"):
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
        explained: Latents it explained.
        scored: Latents it gave a detection score.
        embedded: Latents it gave an embedding AUROC.
        skipped: Latents already explained (and scored) with this model and prompt version.
        requests: Requests it sent.
        seconds: Wall time of the requests.
        records: The final record of every latent it explained or scored.
    """

    latents: list[int]
    explained: list[int] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)
    embedded: list[int] = field(default_factory=list)
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


def _ours(record: ExplanationRecord, model: str, version: str) -> bool:
    return (record.kind == "explanation" and record.source == "explain" and record.model == model
            and record.prompt_version == version)


def _all_samples(feature: FeatureSamples) -> list[Sample]:
    return list(feature.samples) + [s for g in feature.interval_groups for s in g.samples]


def _pool(analyzer: ActivationSampleAnalyzer) -> list[Sample]:
    """Samples of many latents: where the non-activating contexts come from.

    Taken from the save alone, never from the latents this run explains, so that a latent's contexts and scores
    are the same whether it is explained with others, alone, or in a run resumed after an interruption.
    """
    pool: list[Sample] = []
    for idx in analyzer.saved_features[:POOL_LATENTS]:
        pool += _all_samples(analyzer.feature(idx))
    return pool


def explain_latents(
    samples_dir: Any,
    backend: Optional[ChatBackend],
    settings: Optional[ExplainSettings] = None,
    console: Any = None,
    analyzer: Optional[ActivationSampleAnalyzer] = None,
    embedder: Optional[SentenceEmbedder] = None,
) -> ExplainResult:
    """Explain and score latents of ``samples_dir``; every result is appended as it arrives.

    Args:
        samples_dir: The samples directory.
        backend: Where the requests go: it writes the explanations (``settings.explainer == "llm"``) and gives
            the detection score; ``None`` with the top-tokens explainer for no detection score.
        settings: What to do (default: :class:`ExplainSettings`).
        console: A rich console for the progress (:class:`ExplainProgress`; none without one).
        analyzer: The opened directory, if the caller has it.
        embedder: The sentence embedder of the embedding AUROC; ``None``: no embedding AUROC.

    Raises:
        RequestBudgetError: More requests than ``settings.max_requests`` and not ``settings.yes``.
        SamplesDirectoryError: The directory or its sidecar is not valid.
    """
    settings = settings or ExplainSettings()
    by_model = settings.explainer == "llm"
    if by_model and backend is None:
        raise ValueError("The `llm` explainer needs a chat backend; pass one, or use explainer='top-tokens'.")
    model, version = (backend.model_name, PROMPT_VERSION) if by_model else (TOP_TOKENS_MODEL, TOP_TOKENS_VERSION)
    analyzer = analyzer or ActivationSampleAnalyzer(samples_dir)
    samples_dir = Path(analyzer.directory.path)
    latents = choose_latents(analyzer, settings)
    result = ExplainResult(latents=latents)
    existing: dict[int, ExplanationRecord] = {}
    for record in iter_explanation_records(samples_dir):
        if _ours(record, model, version):
            existing[record.latent] = record
    to_explain = [i for i in latents if i not in existing]
    detect = settings.score and backend is not None
    to_score = [i for i in latents if detect and (i not in existing or existing[i].score is None)]
    embed = settings.score and embedder is not None
    to_embed = [i for i in latents if embed and (i not in existing or existing[i].embedding_score is None)]
    result.skipped = [i for i in latents if i not in to_explain and i not in to_score and i not in to_embed]
    contexts = settings.positives + settings.negatives
    needed = (len(to_explain) if by_model else 0) + 2 * contexts * len(to_score)
    if needed > settings.max_requests and not settings.yes:
        raise RequestBudgetError(
            f"This run would send up to {needed} requests ({len(to_explain) if by_model else 0} explanations,"
            f" {len(to_score)} latents scored on {contexts} contexts twice: their explanation and a random one),"
            f" more than --max-requests {settings.max_requests}. Pass --yes to send them, raise --max-requests, or"
            " explain fewer latents (--top N, --features, --min-frequency)."
        )
    work = sorted(set(to_explain) | set(to_score) | set(to_embed), key=latents.index)
    num_examples = settings.shown_top + settings.positives + 10
    wide = {i: analyzer.feature(i, settings.shown_top + max(settings.positives, settings.embedding_positives) + 10)
            for i in work}
    # The detection score's samples are the first ``num_examples`` (as before the embedding score existed).
    loaded = {i: dataclasses.replace(f, samples=f.samples[:num_examples]) for i, f in wide.items()}
    splits = {i: split_samples(loaded[i], settings.shown_top, settings.shown_interval, settings.positives)
              for i in work}
    step = analyzer.summary.global_step
    pool = _pool(analyzer) if to_score or to_embed else []
    progress = ExplainProgress(console, needed, len(to_explain) if by_model else 0, len(to_score))
    started = time.perf_counter()
    try:
        if to_explain and by_model:
            assert backend is not None
            conversations = [explanation_prompt(splits[i].shown) for i in to_explain]
            for n, answer in backend.answers(conversations, settings.max_tokens):
                latent = to_explain[n]
                text = parse_explanation(answer) or " ".join(answer.split())[:200] or "(no answer)"
                record = ExplanationRecord(latent=latent, text=text, model=model, prompt_version=version,
                                           samples_step=step, source="explain")
                append_explanations(samples_dir, [record])
                existing[latent] = result.records[latent] = record
                result.explained.append(latent)
                result.requests += 1
                progress.advance("explained")
        elif to_explain:
            records = [ExplanationRecord(latent=i, text=top_tokens_explanation(splits[i].shown), model=model,
                                         prompt_version=version, samples_step=step, source="explain")
                       for i in to_explain]
            append_explanations(samples_dir, records)
            for record in records:
                existing[record.latent] = result.records[record.latent] = record
            result.explained += to_explain
        if to_embed:
            assert embedder is not None
            progress.pause()
            _embedding_scores(samples_dir, embedder, settings, wide, splits, pool, to_embed, existing, result,
                              console)
            progress.resume()
        if to_score:
            assert backend is not None
            _score(samples_dir, backend, settings, loaded, splits, pool, to_score, existing, result, progress)
    finally:
        progress.stop()
        result.seconds = time.perf_counter() - started
    return result


def _embedding_scores(
    samples_dir: Path,
    embedder: SentenceEmbedder,
    settings: ExplainSettings,
    wide: dict[int, FeatureSamples],
    splits: dict[int, Any],
    pool: Sequence[Sample],
    to_embed: Sequence[int],
    existing: dict[int, ExplanationRecord],
    result: ExplainResult,
    console: Any,
) -> None:
    """The embedding AUROC of each latent's explanation and of its random explanation, every text embedded once."""
    pool_texts = [context_text(s) for s in pool]
    decoys = Decoys(pool)
    texts: dict[str, int] = {}

    def index(text: str) -> int:
        return texts.setdefault(text, len(texts))

    queries, baselines, positives, negatives = [], [], [], []
    for latent in to_embed:
        feature = wide[latent]
        shown = {context_text(s) for s in splits[latent].shown}
        split = split_samples(feature, settings.shown_top, settings.shown_interval, settings.embedding_positives)
        queries.append(index(existing[latent].text))
        baselines.append(index(decoys(latent)))
        # Never a context the explainer saw (the wider split's prompt could differ when many samples repeat).
        positives.append([index(context_text(s)) for s in split.held_out if context_text(s) not in shown])
        negatives.append([index(context_text(s)) for s in non_activating(
            latent, pool, _all_samples(feature), settings.embedding_negatives, pool_texts)])
    progress = ExplainProgress(console, len(texts), 0, 0, unit="texts",
                               title=f"embedding {len(texts)} texts for the embedding AUROC of {len(to_embed)} latents")
    try:
        vectors = embedder.embed(list(texts), advance=lambda n: progress.advance(count=n))
    finally:
        progress.stop()
    pos, neg = padded(positives), padded(negatives)
    real = auroc(torch.tensor(queries), pos, neg, vectors).tolist()
    baseline = auroc(torch.tensor(baselines), pos, neg, vectors).tolist()
    records = []
    for k, latent in enumerate(to_embed):
        scored = real[k] == real[k]  # not nan: it had activating and non-activating contexts
        record = dataclasses.replace(
            existing[latent],
            embedding_score=real[k] if scored else None,
            embedding_contexts=len(positives[k]) + len(negatives[k]),
            embedding_random_score=baseline[k] if scored else None,
            time=utc_now(),
        )
        existing[latent] = result.records[latent] = record
        records.append(record)
    append_explanations(samples_dir, records)
    result.embedded += list(to_embed)


def _score(
    samples_dir: Path,
    backend: ChatBackend,
    settings: ExplainSettings,
    loaded: dict[int, FeatureSamples],
    splits: dict[int, Any],
    pool: Sequence[Sample],
    to_score: Sequence[int],
    existing: dict[int, ExplanationRecord],
    result: ExplainResult,
    progress: ExplainProgress,
) -> None:
    pool_texts = [context_text(s) for s in pool]
    decoys = Decoys(pool)
    conversations: list[list[dict[str, str]]] = []
    owners: list[tuple[int, bool, bool]] = []  # (latent, activating, random explanation)
    for latent in to_score:
        positives = list(splits[latent].held_out)
        negatives = non_activating(latent, pool, _all_samples(loaded[latent]), settings.negatives, pool_texts)
        # From the save alone (not from the explanations that exist by now), as are the contexts.
        baseline = decoys(latent)
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
