"""The HTML report: ``report.html.j2`` rendered from the shared views (``render/views.py``).

This module adds only HTML: each token's background style, SVG bar geometry and the ``·`` labels of token
chips. Token text is handed to the template raw and shown through the ``visible`` (or ``label``) filter;
Jinja autoescaping turns any markup in it into text. Nothing holding token text is marked safe.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from typing import Optional, Union

from lightning_sae_samples.analysis.records import FeatureSamples, RunSummary, Sample
from lightning_sae_samples.render import heat, views
from lightning_sae_samples.render.escaping import visible
from lightning_sae_samples.render.histogram import DisplayBin
from lightning_sae_samples.render.templates import HTML_TEMPLATE, RUN_INDEX_HTML_TEMPLATE, make_environment

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


def token_style(level: float) -> str:
    """Inline CSS of a context token at a heat level in ``[0, 1]``."""
    style = heat.css_background_level(level)
    return style + ("; color: #fff" if heat.needs_light_text(level) else "")


def is_mark(text: str) -> bool:
    """Whether a token shows as one or two punctuation marks (``.``, ``,``, ``·``): it gets a box of its own."""
    shown = visible(text).strip(" ")
    return 0 < len(shown) <= 2 and all(unicodedata.category(c)[0] in "PS" for c in shown)


def example_view(sample: Sample, feature_max: float) -> dict:
    """The shared example view with each token's ``style`` and ``punct`` (:func:`is_mark`)."""
    view = views.example_view(sample, feature_max)
    for token in view["tokens"]:
        token["style"] = token_style(token["level"])
        token["punct"] = is_mark(token["text"])
    return view


def feature_view(feature: FeatureSamples) -> dict:
    """Template variables of one feature section: the shared feature view plus its SVG ``bars``."""
    view = views.feature_view(feature, example_view)
    view["bars"] = svg_bars(view["bins"])
    return view


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
    run = views.summary_view(summary)
    template = make_environment(template_dir).get_template(HTML_TEMPLATE)
    return template.render(
        run=run,
        frequency_bars=svg_bars(run["frequency_bins"], width=480, height=110),
        features=[feature_view(f) for f in features],
        drift=views.drift_view(summary, features),
        rank_by=rank_by,
        explained=any(f.meaning is not None for f in features),
        report_features={f.feature_idx for f in features},
        svg={"width": SVG_WIDTH, "height": SVG_HEIGHT, "label_space": SVG_LABEL_SPACE},
    )


def render_run_index_html(
    path: object, saes: Sequence[object], links: dict, template_dir: Optional[Union[str, os.PathLike]] = None
) -> str:
    """Render ``run_index.html.j2``: a run's SAEs, one table row each, linking to its report (``links[name]``)."""
    template = make_environment(template_dir).get_template(RUN_INDEX_HTML_TEMPLATE)
    return template.render(run=views.run_index_view(path, saes, links))
