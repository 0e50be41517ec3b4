"""A latent's story through training: one window per save, appended and thinned, in pure torch.

A *window* is what the collection saw between two saves: for every latent that fired in it, its count, sum and
max, its most frequent activating token ids with their counts, and for the features saved then, its top
samples. A history is the list of windows, oldest first. Each save appends one window of level 0; whenever
more than ``per_level`` windows share a level, the two oldest of that level (always neighbours) merge into one
of the next level, so ``n`` saves keep about ``per_level * log2(n / per_level)`` windows and the recent ones
stay fine-grained. Merging sums counts, sums and token counts, takes the max, and keeps the best samples; the
merged top tokens are the top of the two windows' recorded top tokens (exact up to that truncation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_sae_samples.state.merge import sort_samples
from lightning_sae_samples.state.schema import TOKEN_BITS, WINDOW_TOKENS
from lightning_sae_samples.state.tables import rows_index
from lightning_sae_samples.state.window_tokens import compact_pairs, empty_pairs, top_tokens

#: Version of ``training_history.pt``.
HISTORY_FORMAT_VERSION = 1


#: Per-row fields of a window (one row per latent that fired in it), with their dtypes.
ROW_FIELDS = {"latent": torch.int32, "count": torch.int64, "sum": torch.float64, "max": torch.float32,
              "token_ids": torch.int32, "token_counts": torch.int64}


#: Per-sample fields of a window's kept samples, with their dtypes.
HISTORY_SAMPLE_FIELDS = {"latent": torch.int32, "values": torch.float32, "step": torch.int64, "order": torch.int64,
                         "context_tokens": torch.int32, "context_acts": torch.float32}


#: Per-window scalars.
WINDOW_SCALARS = ("start", "end", "level", "saves", "tokens_seen")


def window_of_state(state: dict, end: int, top_token_count: int, saved: Optional[list[int]] = None,
                    samples_per_feature: Optional[int] = None) -> dict:
    """The history window a merged state holds (its ``window_*`` entries), ending at step ``end``.

    Args:
        state: A merged compact collector state.
        end: The step of the save that closes the window.
        top_token_count: Token ids recorded per latent.
        saved: Latents whose window samples are recorded (the saved features); ``None``: none.
        samples_per_feature: Samples recorded per saved latent (default: all the window table keeps).
    """
    count = state["window_count"]
    latents = (count > 0).nonzero(as_tuple=True)[0]
    ids, counts = top_tokens(state.get(WINDOW_TOKENS.name) or empty_pairs(), latents, top_token_count)
    window = {
        "start": int(state.get("window_start", 0)), "end": int(end), "level": 0, "saves": 1,
        "tokens_seen": int(state.get("window_tokens_seen", 0)),
        "latent": latents.to(torch.int32), "count": count[latents].to(torch.int64),
        "sum": state["window_sum"][latents].to(torch.float64), "max": state["window_max"][latents].float(),
        "token_ids": ids, "token_counts": counts,
    }
    width = 2 * int(state["half_window"]) + 1
    window["samples"] = _no_samples(width)
    table = state.get("window")
    if table is not None and saved:
        rows = torch.tensor(sorted(set(int(i) for i in saved)), dtype=torch.int64)
        rows = rows[count[rows] > 0]
        at = rows_index(table, rows, samples_per_feature)
        offsets = table["count"].to(torch.int64)[rows]
        if samples_per_feature is not None:
            offsets = offsets.clamp(max=samples_per_feature)
        window["samples"] = {
            "latent": torch.repeat_interleave(rows, offsets).to(torch.int32),
            "values": table["values"][at].float(), "step": table["step"][at].long(),
            "order": table["order"][at].long(),
            "context_tokens": table["context_tokens"][at].to(torch.int32),
            "context_acts": table["context_acts"][at].float(),
        }
    return window


def join_windows(parts: list[tuple[int, dict]]) -> dict:
    """One window of all latents from the windows of consecutive shards, as ``(offset, window)`` in order.

    The shards saw the same tokens (their scalars agree); latent ids become global, rows and samples stay sorted.
    """
    first = parts[0][1]
    window = {name: first[name] for name in WINDOW_SCALARS}
    for name in ROW_FIELDS:
        values = [part[name] for _, part in parts]
        window[name] = torch.cat([v + offset for (offset, _), v in zip(parts, values)] if name == "latent" else values)
    window["samples"] = {
        name: torch.cat([part["samples"][name] + offset if name == "latent" else part["samples"][name]
                         for offset, part in parts])
        for name in HISTORY_SAMPLE_FIELDS
    }
    return window


def _no_samples(width: int) -> dict[str, Tensor]:
    return {name: torch.empty((0, width) if name.startswith("context_") else (0,), dtype=dtype)
            for name, dtype in HISTORY_SAMPLE_FIELDS.items()}


def merge_windows(older: dict, newer: dict, samples_per_feature: int) -> dict:
    """One window covering two neighbouring ones (``older`` first), one level up."""
    latents = torch.cat([older["latent"], newer["latent"]]).long()
    unique, inverse = torch.unique(latents, sorted=True, return_inverse=True)
    n = len(unique)
    count = torch.zeros(n, dtype=torch.int64).index_add_(0, inverse, torch.cat([older["count"], newer["count"]]))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, inverse, torch.cat([older["sum"], newer["sum"]]))
    peak = torch.full((n,), -float("inf")).scatter_reduce_(
        0, inverse, torch.cat([older["max"], newer["max"]]), reduce="amax"
    )
    token_ids = torch.cat([older["token_ids"], newer["token_ids"]])
    token_counts = torch.cat([older["token_counts"], newer["token_counts"]])
    present = token_ids >= 0
    row_latent = latents.unsqueeze(1).expand_as(token_ids)
    pairs = compact_pairs((row_latent[present] << TOKEN_BITS) | token_ids[present].long(), token_counts[present])
    limit = older["token_ids"].shape[1]
    ids, counts = top_tokens(pairs, unique, limit)
    samples = {name: torch.cat([older["samples"][name], newer["samples"][name]]) for name in HISTORY_SAMPLE_FIELDS}
    samples = best_samples(samples, samples_per_feature)
    return {
        "start": older["start"], "end": newer["end"], "level": max(older["level"], newer["level"]) + 1,
        "saves": older["saves"] + newer["saves"], "tokens_seen": older["tokens_seen"] + newer["tokens_seen"],
        "latent": unique.to(torch.int32), "count": count, "sum": total, "max": peak,
        "token_ids": ids, "token_counts": counts, "samples": samples,
    }


def best_samples(samples: dict[str, Tensor], limit: int) -> dict[str, Tensor]:
    """Per latent, its ``limit`` best samples (value desc, then earliest step and order), latents ascending."""
    if not len(samples["latent"]):
        return samples
    best = sort_samples(samples["values"].double(), samples["step"], samples["order"])
    order = best[torch.argsort(samples["latent"][best], stable=True)]
    latent = samples["latent"][order]
    first = torch.ones(len(latent), dtype=torch.bool)
    first[1:] = latent[1:] != latent[:-1]
    start = torch.cummax(torch.where(first, torch.arange(len(latent)), 0), 0).values
    keep = order[(torch.arange(len(latent)) - start) < limit]
    return {name: value[keep] for name, value in samples.items()}


def append_window(windows: list[dict], window: dict, per_level: int, samples_per_feature: int) -> list[dict]:
    """The history with ``window`` appended, windows that end after it begins dropped, then thinned.

    A window ending after the new one's start comes from a later point of a run that was resumed from an
    earlier checkpoint; the resumed run replaces it.
    """
    kept = [w for w in windows if w["end"] <= window["start"]]
    kept.append(window)
    return thin(kept, per_level, samples_per_feature)


def thin(windows: list[dict], per_level: int, samples_per_feature: int) -> list[dict]:
    """Merge the two oldest windows of any level that holds more than ``per_level`` (see the module's rule)."""
    windows = list(windows)
    level = 0
    while level <= max((w["level"] for w in windows), default=0):
        at = [i for i, w in enumerate(windows) if w["level"] == level]
        if len(at) > per_level:
            first, second = at[0], at[1]
            merged = merge_windows(windows[first], windows[second], samples_per_feature)
            windows[first: second + 1] = [merged, *windows[first + 1: second]]
            continue
        level += 1
    return windows


def reset_window_entries(state: dict, step: int) -> dict:
    """A shallow copy of ``state`` whose history window is empty and starts at ``step`` (what follows a save)."""
    out = dict(state)
    for name, fill in (("window_count", 0), ("window_sum", 0.0), ("window_max", -float("inf"))):
        if name in out:
            out[name] = torch.full_like(out[name], fill)
    out[WINDOW_TOKENS.name] = empty_pairs()
    out["window_tokens_seen"] = torch.zeros_like(torch.as_tensor(out.get("window_tokens_seen", 0)))
    out["window_start"] = int(step)
    table = out.get("window")
    if isinstance(table, dict):
        out["window"] = {
            "capacity": table["capacity"], "count": torch.zeros_like(table["count"]),
            **{name: value[:0] for name, value in table.items() if name not in ("capacity", "count")},
        }
    return out


#: State entries of the current history window (the checkpoint keeps them; ``full_state.pt`` does not).
WINDOW_ENTRIES = ("window_count", "window_sum", "window_max", WINDOW_TOKENS.name, "window_tokens_seen",
                  "window_start", "window")


def without_window_entries(state: dict) -> dict:
    """A shallow copy of ``state`` without its history window, which the history file already holds."""
    return {key: value for key, value in state.items() if key not in WINDOW_ENTRIES}
