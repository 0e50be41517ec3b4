"""The history answers of ``serve`` (``/api/history/...``): a feature's timeline, the run's chart, filtered lists.

Kept apart from the other answers so that each stays one idea; every answer reads the loaded save's
``FeatureHistory`` (``ActivationSampleAnalyzer.history``) and only memory.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from lightning_sae_samples.analysis.history import FeatureHistory, HistorySample
from lightning_sae_samples.analysis.meaning_change import DEFAULT_RULE
from lightning_sae_samples.analysis.records import ContextToken, Sample
from lightning_sae_samples.render import formatting
from lightning_sae_samples.render.escaping import token_label
from lightning_sae_samples.serve.index import example_json

#: History list filters: latents born after a step, that died, came back, or changed meaning.
HISTORY_FILTERS = ("all", "born_after", "died", "revived", "changed")


#: History list orders.
HISTORY_SORTS = ("changes", "birth", "latent")


def sample_of(sample: HistorySample, latent: int) -> Sample:
    """A window's kept sample as the page's samples are (its sequence position is not recorded: ``None``)."""
    context = tuple(
        ContextToken(token_id, text, value if math.isfinite(value) or i == sample.context_position else None)
        for i, (token_id, text, value) in enumerate(zip(sample.context_tokens, sample.context_token_strs,
                                                        sample.context_activations))
    )
    return Sample(feature_idx=latent, activation_value=sample.activation_value, step=sample.step, position=None,
                  context=context, context_position=sample.context_position,
                  context_text="".join(sample.context_token_strs))


def timeline(history: FeatureHistory, latent: int) -> dict[str, Any]:
    """A feature's timeline: its windows, its events, and every window's steps.

    Per window where it fired (``windows``; a silent one has no entry, ``steps`` lists them all): its steps, count,
    frequency, max, mean, top tokens, how many samples were kept (:func:`window_samples` gives them), whether it
    fired too rarely there to be active (``rare``) and whether it had enough data to compare (``tested``).

    The samples are left out so that the answer stays small however many windows keep some (30 windows of 3
    samples of 21 tokens, rendered, are about 0.4 MB).
    """
    windows = []
    for stats in history.feature(latent):
        windows.append({
            "index": stats.window.index, "start": stats.window.start, "end": stats.window.end,
            "count": stats.count, "frequency": stats.frequency, "max": stats.max_activation,
            "mean": stats.mean_activation, "tokens_seen": stats.window.tokens_seen,
            "shown": {"frequency": formatting.frequency(stats.frequency), "max": formatting.value(stats.max_activation),
                      "mean": formatting.value(stats.mean_activation)},
            "top_tokens": [{"token_id": t.token_id, "text": t.text, "label": token_label(t.text), "count": t.count}
                           for t in stats.top_tokens],
            "kept_samples": len(stats.samples),
            "rare": stats.count < DEFAULT_RULE.min_active_count, "tested": stats.count >= DEFAULT_RULE.min_tested_count,
        })
    return {"latent": int(latent), "windows": windows, "events": [e.to_json() for e in history.events(latent)],
            "steps": [[w.start, w.end] for w in history.windows]}


def window_samples(history: FeatureHistory, latent: int, window: int) -> dict[str, Any]:
    """The samples kept of a latent in one window, rendered as the feature page's (shaded by the window's max).

    Raises:
        IndexError: There is no such window.
    """
    samples = history.samples(latent, window)
    top = max((s.activation_value for s in samples), default=0.0)
    info = history.windows[window]
    return {"latent": int(latent), "window": window, "start": info.start, "end": info.end,
            "samples": [example_json(sample_of(s, latent), top) for s in samples]}


def run_chart(history: FeatureHistory) -> dict[str, Any]:
    """Per window: alive latents, births, deaths, revivals and meaning changes (what health logs, for the run)."""
    return {"windows": history.run_series(), "dead_window_steps": history.dead_window_steps}


def history_list(history: FeatureHistory, kind: str = "all", step: Optional[int] = None, sort: str = "changes",
                 offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """Latents filtered by their events and sorted, one page of rows ``{latent, birth, changes, deaths, ...}``.

    Raises:
        ValueError: An unknown filter or sort, or ``born_after`` without a step.
    """
    if kind not in HISTORY_FILTERS:
        raise ValueError(f"`filter` must be one of {HISTORY_FILTERS}; got {kind!r}.")
    if sort not in HISTORY_SORTS:
        raise ValueError(f"`sort` must be one of {HISTORY_SORTS}; got {sort!r}.")
    counts = history.event_counts()
    birth = history.first_event_step("birth")
    keep = birth >= 0
    if kind == "born_after":
        if step is None:
            raise ValueError("`filter=born_after` needs `step`: the step after which the latents were born.")
        keep &= birth > step
    elif kind == "died":
        keep &= counts["death"] > 0
    elif kind == "revived":
        keep &= counts["revival"] > 0
    elif kind == "changed":
        keep &= counts["meaning_change"] > 0
    latents = keep.nonzero(as_tuple=True)[0]
    if sort == "changes":
        latents = latents[torch.argsort(-counts["meaning_change"][latents], stable=True)]
    elif sort == "birth":
        latents = latents[torch.argsort(birth[latents], stable=True)]
    page = latents[offset: offset + limit].tolist()
    rows = [{"latent": i, "birth": int(birth[i]), "changes": int(counts["meaning_change"][i]),
             "deaths": int(counts["death"][i]), "revivals": int(counts["revival"][i])} for i in page]
    return {"total": len(latents), "offset": offset, "rows": rows}
