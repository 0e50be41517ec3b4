"""The Markdown report: ``report.md.j2`` rendered from the shared views (``render/views.py``).

This module adds only Markdown: every piece of token text reaches the template already escaped by
:mod:`lightning_sae_samples.render.escaping` (fields ending in ``_md``), the histograms as text bars.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

from lightning_sae_samples.analysis.records import FeatureSamples, RunSummary, Sample
from lightning_sae_samples.render import views
from lightning_sae_samples.render.escaping import markdown_emphasis, markdown_text, token_label
from lightning_sae_samples.render.histogram import text_histogram
from lightning_sae_samples.render.templates import MARKDOWN_TEMPLATE, RUN_INDEX_MARKDOWN_TEMPLATE, make_environment


def tokens_markdown(tokens: Sequence[dict]) -> str:
    """A context as one line of Markdown, the activating token in bold.

    The tokens (:func:`~lightning_sae_samples.render.views.token_views`) are glued as in the text; undecoded
    ids (``[12575]``) are spaced.
    """
    gaps = [" " if t["gap_before"] else "" for t in tokens]
    parts = [gap + ("" if t["activating"] else markdown_text(t["text"])) for gap, t in zip(gaps, tokens)]
    for n, token in enumerate(tokens):
        if token["activating"]:
            before = "".join(parts[:n]) + gaps[n]
            after = parts[n + 1] if n + 1 < len(parts) else ""
            parts[n] = gaps[n] + markdown_emphasis(token["text"], before, after)
    return "".join(parts)


def context_markdown(sample: Sample) -> str:
    """A sample's context as one line of Markdown with the activating token in bold."""
    return tokens_markdown(views.token_views(sample, 0.0))


def top_tokens_markdown(top_tokens: Sequence[tuple[str, int]], over: int) -> str:
    """``token ×n, ... (of N)`` for a table cell (leading spaces shown as ``·``)."""
    tokens = ", ".join(f"{markdown_text(token_label(text))} ×{n}" for text, n in top_tokens)
    return f"{tokens} (of {over})" if tokens else ""


def logit_effects_markdown(effects: Optional[dict]) -> Optional[dict]:
    """``{"promoted_md", "suppressed_md"}``: escaped ``token (+value)`` lists, or ``None`` when unknown."""
    if effects is None:
        return None

    def line(items: Sequence[dict]) -> str:
        return ", ".join(f"{markdown_text(token_label(t['text']))} ({t['value']})" for t in items) or "–"

    return {**effects, "promoted_md": line(effects["promoted"]), "suppressed_md": line(effects["suppressed"])}


def example_context(sample: Sample, feature_max: float = 0.0) -> dict:
    """One example line: the shared example view plus ``context_md``."""
    view = views.example_view(sample, feature_max)
    view["context_md"] = tokens_markdown(view["tokens"])
    return view


def feature_context(feature: FeatureSamples) -> dict:
    """Template variables of one feature section: the shared feature view plus its Markdown fields."""
    view = views.feature_view(feature, example_context)
    view["histogram_lines"] = text_histogram(view["bins"], 24)
    view["top_tokens_md"] = top_tokens_markdown(view["top_tokens"], view["top_tokens_over"])
    view["logit_effects"] = logit_effects_markdown(view["logit_effects"])
    recent = view["recent"]
    if recent is not None:
        recent["drift_md"] = None if recent["drift"] is None else markdown_text(recent["drift"])
    return view


def summary_context(summary: RunSummary) -> dict:
    """Template variables of the run summary: the shared view plus ``path_md`` and ``frequency_lines``."""
    view = views.summary_view(summary)
    view["path_md"] = markdown_text(str(summary.path))
    view["frequency_lines"] = text_histogram(view["frequency_bins"], 30)
    return view


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
        drift=views.drift_view(summary, features),
        rank_by=rank_by,
        explained=any(f.meaning is not None for f in features),
    )


def render_run_index_markdown(
    path: object, saes: Sequence[object], links: dict, template_dir: Optional[Union[str, os.PathLike]] = None
) -> str:
    """Render ``run_index.md.j2``: a run's SAEs, one table row each, linking to its report (``links[name]``)."""
    view = views.run_index_view(path, saes, links)
    view["path_md"] = markdown_text(view["path"])
    template = make_environment(template_dir).get_template(RUN_INDEX_MARKDOWN_TEMPLATE)
    return template.render(run=view)
