"""A collector state's samples as the JSON records of feature files."""

from __future__ import annotations

from typing import Any, Optional

import torch

from lightning_sae_samples.state.merge import merge_tables
from lightning_sae_samples.state.tables import dense_counts, row_samples, rows_index
from lightning_sae_samples.tokens import TokenDecoder


def sample_records(
    state: dict,
    feature_idx: int,
    limit: int,
    decoder: TokenDecoder,
    prefix: str = "top",
    interval: Optional[int] = None,
) -> list[dict]:
    """Up to ``limit`` kept samples of one latent as JSON records (``decoder`` must be prepared).

    Args:
        state: A collector state dict.
        feature_idx: The latent.
        limit: Most samples to return, best first.
        decoder: Prepared with every token id of the windows returned.
        prefix: Which table: ``"top"``, ``"recent"`` or ``"interval"``.
        interval: The activation interval, for ``prefix="interval"``.
    """
    row = feature_idx if interval is None else feature_idx * int(state["num_intervals"]) + interval
    samples = row_samples(state[prefix], row, limit)
    half = int(state["half_window"])
    columns = zip(
        samples["values"].tolist(),
        samples["context_tokens"].tolist(),
        samples["context_acts"].tolist(),
        samples["step"].tolist(),
        samples["position"].tolist(),
    )
    records = []
    for value, window, act, step, position in columns:
        start = next(i for i, t in enumerate(window) if t >= 0)
        stop = max(i for i, t in enumerate(window) if t >= 0) + 1
        context = window[start:stop]
        centre = half - start
        records.append(
            {
                "feature_idx": int(feature_idx),
                "activation_value": value,
                "step": step,
                "position": position,
                "tokens": context[max(0, centre - 1) : centre + 1],
                "text": decoder.token_str(context[centre]),
                "context_tokens": context,
                "context_text": decoder.context_text(context),
                "context_token_strs": [decoder.token_str(t) for t in context],
                # NaN: unknown (a shuffled row's neighbours), written as null.
                "context_activations": [None if a != a else a for a in act[start:stop]],
                "context_position": centre,
            }
        )
    return records


def with_recent_view(state: dict) -> dict:
    """A shallow copy of ``state`` whose ``recent`` table is the top over the current and previous block."""
    if "recent" not in state:
        return state
    view = dict(state)
    view["recent"] = merge_tables(state["recent"], state["recent_prev"])
    return view


def _activating_tokens(records: list[dict]) -> set[int]:
    return {r["context_tokens"][r["context_position"]] for r in records}


def sample_groups(state: dict, feature_idx: int, limit: int, decoder: TokenDecoder) -> dict[str, Any]:
    """The optional sample groups of one latent for its feature file: interval and recent samples.

    ``state`` must come through :func:`with_recent_view`. ``recent_overlap`` is the Jaccard overlap of the
    activating tokens of the recent and the all-time top samples (low: the latent's meaning moved).
    """
    groups: dict[str, Any] = {}
    if "interval" in state:
        edges = [float(e) for e in state["interval_edges"]]
        counts = dense_counts(state["interval_count"], slice(feature_idx, feature_idx + 1))[0].tolist()
        groups["interval_samples"] = [
            {
                "interval": [
                    edges[i] if i else float(state["threshold"]),
                    edges[i + 1] if i + 2 < len(edges) else None,
                ],
                "count": counts[i],
                "samples": sample_records(state, feature_idx, limit, decoder, "interval", i),
            }
            for i in range(len(counts))
        ]
    if "recent" in state:
        recent = sample_records(state, feature_idx, limit, decoder, "recent")
        top = sample_records(state, feature_idx, limit, decoder, "top")
        union = _activating_tokens(recent) | _activating_tokens(top)
        overlap = len(_activating_tokens(recent) & _activating_tokens(top)) / len(union) if union else 1.0
        groups["recent_samples"] = recent
        groups["recent_overlap"] = overlap
    return groups


def window_token_ids(state: dict, prefix: str, latents: list[int], limit: int) -> torch.Tensor:
    """Distinct token ids in the windows of the first ``limit`` samples of ``latents`` in one table.

    For ``"interval"``, of every interval of those latents.
    """
    table = state[prefix]
    rows = torch.tensor(latents, dtype=torch.int64)
    if prefix == "interval":
        intervals = int(state["num_intervals"])
        rows = (rows.unsqueeze(1) * intervals + torch.arange(intervals)).reshape(-1)
    windows = table["context_tokens"][rows_index(table, rows, limit)]
    return windows[windows >= 0].unique()


def _window_token_ids(state: dict, ranked: list[int], limit: int) -> list[int]:
    prefixes = [prefix for prefix in ("top", "interval", "recent") if prefix in state]
    ids = [window_token_ids(state, prefix, ranked, limit) for prefix in prefixes]
    return torch.cat(ids).unique().tolist()
