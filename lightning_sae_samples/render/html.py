"""The HTML report: ``report.html.j2`` with autoescaping on, inline CSS, SVG and a small filter script.

Token text is handed to the template raw and shown through the ``visible`` filter; Jinja
autoescaping turns any markup in it into text. Nothing holding token text is marked safe.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional, Union

from lightning_sae_samples.render import formatting, heat
from lightning_sae_samples.render.histogram import DisplayBin, display_bins
from lightning_sae_samples.render.markdown import drift_context, interval_share, summary_context
from lightning_sae_samples.render.templates import HTML_TEMPLATE, make_environment

if TYPE_CHECKING:
    from lightning_sae_samples.analyzer import FeatureSamples, RunSummary, Sample

SVG_WIDTH = 320
SVG_HEIGHT = 90
SVG_LABEL_SPACE = 16


def svg_bars(bins: Sequence[DisplayBin], width: int = SVG_WIDTH, height: int = SVG_HEIGHT) -> list[dict]:
    """Rectangle geometry of an SVG bar chart (one dict per bin: ``x``, ``y``, ``w``, ``h``, ``bin``)."""
    if not bins:
        return []
    plot = height - SVG_LABEL_SPACE
    step = width / len(bins)
    bars = []
    for i, b in enumerate(bins):
        h = max(1.0, b.fraction * plot) if b.count else 0.0
        bars.append({"x": round(i * step + 1, 2), "y": round(plot - h, 2), "w": round(max(step - 2, 1), 2),
                     "h": round(h, 2), "bin": b})
    return bars


def token_views(sample: Sample, feature_max: float) -> list[dict]:
    """Per-token display data: raw ``text`` (escaped by the template), background CSS and hover title."""
    views = []
    for i, token in enumerate(sample.context):
        level = heat.strength(token.activation, feature_max)
        views.append(
            {
                "text": token.text,
                "style": heat.css_background(token.activation, feature_max)
                + ("; color: #fff" if heat.needs_light_text(level) else ""),
                "title": f"activation {token.activation:.6g} (token id {token.token_id})",
                "activating": i == sample.context_position,
                "value": formatting.value(token.activation),
            }
        )
    return views


def logit_effects_view(feature: FeatureSamples) -> Optional[dict]:
    """``{"promoted": [...], "suppressed": [...]}`` of ``{"text", "value", "title"}`` (raw text), or ``None``."""
    effects = feature.logit_effects
    if effects is None:
        return None

    def items(effects_list: Sequence) -> list[dict]:
        return [
            {"text": t.token, "value": formatting.signed(t.value), "title": f"token id {t.token_id}: {t.value:+.6g}"}
            for t in effects_list
        ]

    return {"promoted": items(effects.promoted), "suppressed": items(effects.suppressed)}


def feature_view(feature: FeatureSamples) -> dict:
    """Template variables of one feature section."""
    stats = feature.stats
    bins = display_bins(stats.histogram.bin_edges, stats.histogram.counts)
    return {
        "idx": stats.feature_idx,
        "anchor": f"feature-{stats.feature_idx}",
        "saved": feature.saved,
        "max": formatting.value(stats.max_activation),
        "mean": formatting.value(stats.mean_activation),
        "std": formatting.value(stats.std_activation),
        "min": formatting.value(stats.min_activation),
        "count": formatting.count(stats.activation_count),
        "frequency": formatting.frequency(stats.frequency),
        "num_samples": formatting.count(stats.num_samples),
        "first_step": formatting.step(stats.first_step),
        "last_step": formatting.step(stats.last_step),
        "bins": bins,
        "bars": svg_bars(bins),
        "top_tokens": feature.top_tokens(3),
        "logit_effects": logit_effects_view(feature),
        "examples": [example_view(s, stats.max_activation) for s in feature.samples],
        "recent_overlap": formatting.overlap(feature.recent_overlap),
        **groups_view(feature),
    }


def example_view(sample: Sample, feature_max: float) -> dict:
    """Template variables of one example: value, step, position and per-token views (raw text)."""
    return {
        "value": formatting.value(sample.activation_value),
        "step": sample.step,
        "position": sample.position,
        "tokens": token_views(sample, feature_max),
    }


def groups_view(feature: FeatureSamples) -> dict:
    """Template variables of a feature's sample groups.

    Returns:
        ``interval_groups`` (non-empty intervals with ``label``, ``count``, ``share``, ``examples``),
        ``has_intervals`` and ``recent`` (``None`` without a recent window, else ``overlap``, ``drift``
        (the flag text or ``None``) and ``examples``).
    """
    from lightning_sae_samples.analyzer import DRIFT_THRESHOLD

    feature_max = feature.stats.max_activation
    groups = [
        {
            "label": formatting.interval(g.low, g.high, g.low_open),
            "count": formatting.count(g.count),
            "share": interval_share(g.count, feature.stats.activation_count),
            "examples": [example_view(s, feature_max) for s in g.samples],
        }
        for g in feature.interval_groups
        if g.count or g.samples
    ]
    recent = None
    if feature.recent_overlap is not None:
        recent = {
            "overlap": formatting.overlap(feature.recent_overlap),
            "drift": formatting.drift_note(feature.recent_overlap, len(feature.recent_samples), DRIFT_THRESHOLD),
            "examples": [example_view(s, feature_max) for s in feature.recent_samples],
        }
    return {"interval_groups": groups, "has_intervals": bool(feature.interval_groups), "recent": recent}


def render_html(
    summary: RunSummary,
    features: Sequence[FeatureSamples],
    rank_by: str,
    template_dir: Optional[Union[str, os.PathLike]] = None,
) -> str:
    """Render ``report.html.j2``.

    Args:
        summary: The run summary.
        features: Features in report order, with their examples.
        rank_by: The ranking the order follows.
        template_dir: Folder overriding the shipped template.
    """
    freq = summary.frequency_histogram
    freq_bins = display_bins(freq.bin_edges, freq.counts, log10_edges=True)
    template = make_environment(template_dir).get_template(HTML_TEMPLATE)
    return template.render(
        run=summary_context(summary),
        frequency_bars=svg_bars(freq_bins, width=480, height=110),
        features=[feature_view(f) for f in features],
        drift=drift_context(summary, features),
        rank_by=rank_by,
        svg={"width": SVG_WIDTH, "height": SVG_HEIGHT, "label_space": SVG_LABEL_SPACE},
    )
