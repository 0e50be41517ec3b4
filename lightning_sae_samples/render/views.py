"""One format-neutral view of a run and of each feature, shared by the Markdown, HTML and console renderers.

Every number is formatted here and every token keeps its raw text: each renderer adds only its own
escaping and markup (``render/markdown.py``, ``render/html.py``, ``render/console.py``). The views are
plain dicts because they are the variables of the report templates (``templates/``), which a user may
override.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

from lightning_sae_samples.analysis.records import DRIFT_THRESHOLD, FeatureSamples, RunSummary, Sample
from lightning_sae_samples.render import formatting, heat
from lightning_sae_samples.render.escaping import is_undecoded
from lightning_sae_samples.render.histogram import display_bins

ExampleView = Callable[[Sample, float], dict]


def interval_share(count: int, total: int) -> str:
    """Share of a latent's activations that fall in one interval (``"0%"`` when it has none)."""
    return formatting.frequency(count / total) if total else "0%"


def needs_gap(previous: str, current: str) -> bool:
    """Whether a space must separate two adjacent tokens so that an undecoded id (``[123]``) is not glued to text."""
    if not (is_undecoded(previous) or is_undecoded(current)):
        return False
    return not (previous[-1:].isspace() or current[:1].isspace())


def token_views(sample: Sample, feature_max: float) -> list[dict]:
    """Per-token data of a sample's context.

    Each: raw ``text``, ``token_id``, ``activation``, heat ``level``, ``activating``, formatted ``value``,
    hover ``title`` and ``gap_before`` (see :func:`needs_gap`).
    """
    views = []
    previous = None
    for i, token in enumerate(sample.context):
        views.append(
            {
                "text": token.text,
                "token_id": token.token_id,
                "activation": token.activation,
                "level": heat.strength(token.activation, feature_max),
                "activating": i == sample.context_position,
                "value": "" if token.activation is None else formatting.value(token.activation),
                "title": (
                    f"activation unknown: {UNKNOWN_REASON} (token id {token.token_id})" if token.activation is None
                    else f"activation {token.activation:.6g} (token id {token.token_id})"
                ),
                "gap_before": previous is not None and needs_gap(previous, token.text),
            }
        )
        previous = token.text
    return views


#: Why a shuffled row's context shows only the activating token's activation (said wherever it shows).
UNKNOWN_REASON = "trained on shuffled rows, each row knows only its own token's activation"
UNKNOWN_NOTE = (
    "Only the activating token is shaded: the SAE was trained on shuffled rows, and each row knows only its own"
    " token's activation; the neighbours' are unknown."
)


def unknown_note(samples: Sequence[Sample]) -> Optional[str]:
    """:data:`UNKNOWN_NOTE` when some of these samples do not know their neighbours' activations, else ``None``."""
    return UNKNOWN_NOTE if any(not s.neighbours_known for s in samples) else None


def example_view(sample: Sample, feature_max: float) -> dict:
    """One example: formatted ``value``, ``step``, ``position`` and its ``tokens`` (:func:`token_views`)."""
    return {
        "value": formatting.value(sample.activation_value),
        "step": sample.step,
        "position": sample.position,
        "tokens": token_views(sample, feature_max),
    }


def logit_effects_view(feature: FeatureSamples) -> Optional[dict]:
    """A latent's logit effects, or ``None`` when unknown.

    Returns:
        ``{"promoted": [...], "suppressed": [...]}`` of ``{"text", "token_id", "value", "title"}`` (raw text).
    """
    effects = feature.logit_effects
    if effects is None:
        return None

    def items(side: Sequence) -> list[dict]:
        return [
            {"text": t.token, "token_id": t.token_id, "value": formatting.signed(t.value),
             "title": f"token id {t.token_id}: {t.value:+.6g}"}
            for t in side
        ]

    return {"promoted": items(effects.promoted), "suppressed": items(effects.suppressed)}


def _score_notes(contexts: Optional[int], random_score: Optional[float]) -> str:
    notes = [f"{contexts} contexts"] if contexts else []
    if random_score is not None:
        notes.append(f"random explanation {random_score:.2f}")
    return ", ".join(notes)


def meaning_view(feature: FeatureSamples) -> Optional[dict]:
    """A latent's explanation and label, or ``None`` when it has neither.

    Returns:
        ``explanation`` (raw text or ``None``), ``score`` (formatted detection score, ``"–"`` unscored),
        ``score_note`` (contexts and the random-explanation baseline), ``embedding_score`` (formatted embedding
        AUROC, ``"–"`` unscored), ``embedding_note`` (likewise), ``scores`` (both in words, e.g. ``detection
        0.80 (10 contexts, random explanation 0.50); embedding AUROC 0.91 (40 contexts, ...)``, or ``"not
        scored"``), ``model``, ``stale`` (the sentence saying it was written from older samples, or ``None``)
        and ``label`` (raw text or ``None``).
    """
    m = feature.meaning
    if m is None:
        return None
    notes = _score_notes(m.score_contexts, m.random_score)
    embedding_notes = _score_notes(m.embedding_contexts, m.embedding_random_score)
    named = [f"{name} {value:.2f}" + (f" ({note})" if note else "") for name, value, note in
             (("detection", m.score, notes), ("embedding AUROC", m.embedding_score, embedding_notes))
             if value is not None]
    stale = None
    if m.explanation is not None and m.stale:
        stale = f"written from the samples of step {m.samples_step}, older than these"
    return {
        "explanation": m.explanation,
        "score": "–" if m.score is None else f"{m.score:.2f}",
        "score_note": notes,
        "embedding_score": "–" if m.embedding_score is None else f"{m.embedding_score:.2f}",
        "embedding_note": embedding_notes,
        "scores": "; ".join(named) or "not scored",
        "model": m.model,
        "stale": stale,
        "label": m.label,
    }


def neighbours_view(feature: FeatureSamples) -> list[dict]:
    """A latent's neighbours, best first.

    Each: ``idx``, ``anchor``, ``cosine`` (formatted), ``explanation`` (raw text or ``None``) and ``top_tokens`` (raw
    texts, when it has no explanation).
    """
    return [
        {"idx": n.feature_idx, "anchor": f"feature-{n.feature_idx}", "cosine": f"{n.cosine:.3f}",
         "explanation": n.explanation, "top_tokens": list(n.top_tokens)}
        for n in feature.neighbours
    ]


def groups_view(feature: FeatureSamples, example: ExampleView = example_view) -> dict:
    """A feature's sample groups.

    Args:
        feature: The latent.
        example: Builds one example's view (a renderer may add its markup to :func:`example_view`).

    Returns:
        ``interval_groups``: the intervals it reached, lowest first, each with ``label``, ``count``, ``share``
        and ``examples``; ``has_intervals``: whether the run kept interval samples; ``recent``: ``None``
        without a recent window, else ``overlap``, ``drift`` (the flag sentence, or ``None``) and ``examples``.
    """
    feature_max = feature.stats.max_activation
    total = feature.stats.activation_count
    groups = [
        {
            "label": formatting.interval(g.low, g.high, g.low_open),
            "count": formatting.count(g.count),
            "share": interval_share(g.count, total),
            "examples": [example(s, feature_max) for s in g.samples],
        }
        for g in feature.interval_groups
        if g.count or g.samples
    ]
    recent = None
    if feature.recent_overlap is not None:
        recent = {
            "overlap": formatting.overlap(feature.recent_overlap),
            "drift": formatting.drift_note(feature.recent_overlap, len(feature.recent_samples), DRIFT_THRESHOLD),
            "examples": [example(s, feature_max) for s in feature.recent_samples],
        }
    return {"interval_groups": groups, "has_intervals": bool(feature.interval_groups), "recent": recent}


def feature_view(feature: FeatureSamples, example: ExampleView = example_view) -> dict:
    """Everything a report shows of one feature, formatted, token text raw.

    Returns:
        ``idx``, ``anchor``, ``saved``, ``stats``, the formatted statistics (``max``, ``mean``, ``std``, ``min``,
        ``count``, ``frequency``, ``num_samples``, ``first_step``, ``last_step``, ``recent_overlap``), the
        histogram's display ``bins``, ``top_tokens`` (``(text, samples)``) and ``top_tokens_over`` (over how many
        kept samples), ``logit_effects`` (:func:`logit_effects_view`), ``story`` (the "through training" line, raw
        text, or ``None``), ``meaning`` (:func:`meaning_view`), ``neighbours`` (:func:`neighbours_view`),
        ``examples``, ``unknown_note`` (:func:`unknown_note`) and the keys of :func:`groups_view`.
    """
    stats = feature.stats
    return {
        "idx": stats.feature_idx,
        "anchor": f"feature-{stats.feature_idx}",
        "saved": feature.saved,
        "stats": stats,
        "max": formatting.value(stats.max_activation),
        "mean": formatting.value(stats.mean_activation),
        "std": formatting.value(stats.std_activation),
        "min": formatting.value(stats.min_activation),
        "count": formatting.count(stats.activation_count),
        "frequency": formatting.frequency(stats.frequency),
        "num_samples": formatting.count(stats.num_samples),
        "first_step": formatting.step(stats.first_step),
        "last_step": formatting.step(stats.last_step),
        "recent_overlap": formatting.overlap(feature.recent_overlap),
        "bins": display_bins(stats.histogram.bin_edges, stats.histogram.counts),
        "top_tokens": feature.top_tokens(3),
        "top_tokens_over": feature.top_tokens_over,
        "logit_effects": logit_effects_view(feature),
        "story": feature.story,
        "meaning": meaning_view(feature),
        "neighbours": neighbours_view(feature),
        "examples": [example(s, stats.max_activation) for s in feature.samples],
        "unknown_note": unknown_note([*feature.samples, *feature.recent_samples,
                                      *(s for g in feature.interval_groups for s in g.samples)]),
        **groups_view(feature, example),
    }


def drift_view(summary: RunSummary, features: Sequence[FeatureSamples]) -> Optional[dict]:
    """The run-level recent-window facts, or ``None`` when the run kept no recent window.

    Returns:
        ``window`` (steps of the recent window), ``block_steps``, ``threshold`` and ``flagged``: the reported
        features below :data:`~lightning_sae_samples.analysis.records.DRIFT_THRESHOLD` as ``{"idx", "anchor",
        "overlap"}``, in report order.
    """
    if summary.recent_window_steps is None:
        return None
    flagged = [
        {"idx": f.feature_idx, "anchor": f"feature-{f.feature_idx}", "overlap": formatting.overlap(f.recent_overlap)}
        for f in features
        if f.recent_drift
    ]
    return {
        "window": formatting.step_range(summary.recent_window),
        "block_steps": summary.recent_window_steps,
        "threshold": f"{DRIFT_THRESHOLD:g}",
        "flagged": flagged,
    }


def summary_view(summary: RunSummary) -> dict:
    """The run summary, formatted (``frequency_bins``: the firing-frequency histogram's display bins)."""
    freq = summary.frequency_histogram
    return {
        "summary": summary,
        "global_step": summary.global_step,
        "kind": summary.kind,
        "steps_collected": formatting.count(summary.steps_collected),
        "first_step": formatting.step(summary.first_collected_step),
        "last_step": formatting.step(summary.last_collected_step),
        "tokens_seen": formatting.count(summary.tokens_seen),
        "latents": formatting.count(summary.num_features_tracked),
        "alive": formatting.count(summary.alive_features),
        "alive_share": formatting.frequency(summary.alive_fraction),
        "never_fired": formatting.count(summary.never_fired_features),
        "samples_seen": formatting.count(summary.total_samples_seen),
        "samples_stored": formatting.count(summary.total_samples_stored),
        "frequency_bins": display_bins(freq.bin_edges, freq.counts, log10_edges=True),
        "recent_window": formatting.step_range(summary.recent_window),
        "has_recent": summary.recent_window_steps is not None,
    }


def run_index_view(path: object, saes: Sequence[object], links: dict) -> dict:
    """The index page of a run of many SAEs: its folder and one row per SAE, each linking to its report.

    ``saes`` are :class:`~lightning_sae_samples.analysis.run.SAESummary` rows; ``links`` maps an SAE name to the
    address of its report (percent-encoded here, so that a report name with spaces stays one link).
    """
    from urllib.parse import quote

    def known(number: Optional[int]) -> str:
        return "–" if number is None else formatting.count(number)

    rows = [
        {"name": s.name, "href": quote(links[s.name]), "latents": formatting.count(s.num_latents),
         "alive": formatting.count(s.alive), "dead": known(s.dead), "dense": known(s.dense),
         "tokens_seen": formatting.count(s.tokens_seen), "global_step": s.global_step,
         "saved_features": formatting.count(s.saved_features)}
        for s in saes  # type: ignore[attr-defined]
    ]
    return {"path": str(path), "saes": rows, "health_unknown": any(s.dead is None for s in saes)}  # type: ignore[attr-defined]
