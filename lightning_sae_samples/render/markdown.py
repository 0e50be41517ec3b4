"""The Markdown report: ``report.md.j2`` rendered with pre-escaped token text.

Every piece of token text reaches the template already escaped by
:mod:`lightning_sae_samples.render.escaping` (fields ending in ``_md``); numbers are formatted here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional, Union

from lightning_sae_samples.render import formatting
from lightning_sae_samples.render.escaping import markdown_emphasis, markdown_text
from lightning_sae_samples.render.histogram import display_bins, text_histogram
from lightning_sae_samples.render.templates import MARKDOWN_TEMPLATE, make_environment

if TYPE_CHECKING:
    from lightning_sae_samples.analyzer import FeatureSamples, RunSummary, Sample


def context_markdown(sample: Sample) -> str:
    """A sample's context as one line of Markdown with the activating token in bold."""
    parts = []
    for i, token in enumerate(sample.context):
        parts.append(markdown_emphasis(token.text) if i == sample.context_position else markdown_text(token.text))
    return "".join(parts)


def top_tokens_markdown(feature: FeatureSamples, limit: int = 3) -> str:
    """``token ×n, ...`` for a table cell."""
    return ", ".join(f"{markdown_text(text)} ×{n}" for text, n in feature.top_tokens(limit))


def logit_effects_markdown(feature: FeatureSamples) -> Optional[dict]:
    """``{"promoted_md", "suppressed_md"}``: escaped ``token (+value)`` lists, or ``None`` when unknown."""
    effects = feature.logit_effects
    if effects is None:
        return None

    def line(items: Sequence) -> str:
        return ", ".join(f"{markdown_text(t.token)} ({formatting.signed(t.value)})" for t in items) or "–"

    return {"promoted_md": line(effects.promoted), "suppressed_md": line(effects.suppressed)}


def feature_context(feature: FeatureSamples) -> dict:
    """Template variables of one feature section."""
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
        "histogram_lines": text_histogram(display_bins(stats.histogram.bin_edges, stats.histogram.counts), 24),
        "top_tokens_md": top_tokens_markdown(feature),
        "recent_overlap": formatting.overlap(feature.recent_overlap),
        "logit_effects": logit_effects_markdown(feature),
        "examples": [example_context(s) for s in feature.samples],
        **groups_context(feature),
    }


def example_context(sample: Sample) -> dict:
    """Template variables of one example line: value, step, position and escaped context."""
    return {
        "value": formatting.value(sample.activation_value),
        "step": sample.step,
        "position": sample.position,
        "context_md": context_markdown(sample),
    }


def interval_share(count: int, total: int) -> str:
    """Share of a latent's activations that fall in one interval."""
    return formatting.frequency(count / total) if total else "0%"


def groups_context(feature: FeatureSamples) -> dict:
    """Template variables of a feature's sample groups (also used by the HTML renderer's shape).

    Returns:
        ``interval_groups``: the non-empty intervals, lowest first, each with ``label``, ``count``,
        ``share`` and ``examples``; ``has_intervals``: whether the run kept interval samples; ``recent``:
        ``None`` without a recent window, else ``overlap``, ``drift_md`` (the flag, or ``None``) and
        ``examples``.
    """
    from lightning_sae_samples.analyzer import DRIFT_THRESHOLD

    total = feature.stats.activation_count
    groups = [
        {
            "label": formatting.interval(g.low, g.high, g.low_open),  # numbers only: no escaping needed
            "count": formatting.count(g.count),
            "share": interval_share(g.count, total),
            "examples": [example_context(s) for s in g.samples],
        }
        for g in feature.interval_groups
        if g.count or g.samples
    ]
    recent = None
    if feature.recent_overlap is not None:
        note = formatting.drift_note(feature.recent_overlap, len(feature.recent_samples), DRIFT_THRESHOLD)
        recent = {
            "overlap": formatting.overlap(feature.recent_overlap),
            "drift": note is not None,
            "drift_md": None if note is None else markdown_text(note),
            "examples": [example_context(s) for s in feature.recent_samples],
        }
    return {"interval_groups": groups, "has_intervals": bool(feature.interval_groups), "recent": recent}


def drift_context(summary: RunSummary, features: Sequence[FeatureSamples]) -> Optional[dict]:
    """The run-level recent-window facts, or ``None`` when the run kept no recent window.

    Returns:
        ``window`` (steps of the recent window), ``block_steps``, ``threshold`` and ``flagged``: the reported
        features below the drift threshold as ``{"idx", "anchor", "overlap"}``, in report order.
    """
    from lightning_sae_samples.analyzer import DRIFT_THRESHOLD

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


def summary_context(summary: RunSummary) -> dict:
    """Template variables of the run summary."""
    freq = summary.frequency_histogram
    return {
        "summary": summary,
        "path_md": markdown_text(str(summary.path)),
        "global_step": summary.global_step,
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
        "frequency_lines": text_histogram(display_bins(freq.bin_edges, freq.counts, log10_edges=True), 30),
        "recent_window": formatting.step_range(summary.recent_window),
        "has_recent": summary.recent_window_steps is not None,
    }


def render_markdown(
    summary: RunSummary,
    features: Sequence[FeatureSamples],
    rank_by: str,
    template_dir: Optional[Union[str, os.PathLike]] = None,
) -> str:
    """Render ``report.md.j2``.

    Args:
        summary: The run summary.
        features: Features in report order, with their examples.
        rank_by: The ranking the order follows.
        template_dir: Folder overriding the shipped template.
    """
    template = make_environment(template_dir).get_template(MARKDOWN_TEMPLATE)
    return template.render(
        run=summary_context(summary),
        features=[feature_context(f) for f in features],
        drift=drift_context(summary, features),
        rank_by=rank_by,
    )
