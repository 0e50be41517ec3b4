"""Check a compact collector state read from disk before anything indexes into it.

A ``full_state.pt`` (or a checkpoint entry) is input from a stranger: every declared field must be there with
the dtype kind and shape the schema gives it, every table's counts must add up to its packed samples, and every
index must stay inside what it indexes. :func:`check_state` raises a ``ValueError`` naming the field otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_sae_samples.state.schema import INTERVAL_FIELDS, STAT_FIELDS, TABLE_FIELDS, TABLE_NAMES


def _integer(state: dict, key: str, minimum: int = 0) -> int:
    value = state.get(key)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{key}` must be an integer >= {minimum}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value)[:60]


def _tensor(value: Any, key: str, shape: tuple[int, ...], floating: bool) -> Tensor:
    if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.is_floating_point() != floating or (
        value.dtype == torch.bool
    ):
        kind = "floating-point" if floating else "integer"
        raise ValueError(f"`{key}` must be an {kind} tensor of shape {shape}, got {_show(value)}")
    return value


def _counts(value: Any, key: str, shape: tuple[int, ...]) -> None:
    """A dense count tensor, or its sparse form ``{"shape", "index", "value"}`` of that shape."""
    if isinstance(value, Tensor):
        _tensor(value, key, shape, floating=False)
        return
    if not isinstance(value, dict) or [*value.get("shape", [None])] != list(shape):
        raise ValueError(f"`{key}` must be counts of shape {shape}, got {_show(value)}")
    index = value.get("index")
    if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point():
        raise ValueError(f"`{key}.index` must be a 1-D integer tensor, got {_show(index)}")
    _tensor(value.get("value"), f"{key}.value", tuple(index.shape), floating=False)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= math.prod(shape) or bool((index[1:] <= index[:-1])
                                                                                             .any())):
        raise ValueError(f"`{key}.index` must be ascending positions below {math.prod(shape)}")


def _table(state: dict, name: str, rows: int, window: int) -> None:
    table = state[name]
    if not isinstance(table, dict):
        raise ValueError(f"`{name}` must be a sample table, got {_show(table)}")
    capacity = _integer(table, "capacity")
    count = _tensor(table.get("count"), f"{name}.count", (rows,), floating=False)
    if len(count) and (int(count.min()) < 0 or int(count.max()) > capacity):
        raise ValueError(f"`{name}.count` must lie in [0, {capacity}] (the table's capacity)")
    stored = int(count.sum())
    for field in TABLE_FIELDS:
        shape = (stored, window) if field.startswith("context_") else (stored,)
        _tensor(table.get(field), f"{name}.{field}", shape, floating=field in ("values", "context_acts"))


def check_state(state: Any) -> None:
    """Raise a ``ValueError`` naming the first field of ``state`` that a reader could not use safely."""
    if not isinstance(state, dict):
        raise ValueError(f"a collector state must be a dict, got {_show(state)}")
    num_latents = _integer(state, "num_latents", 1)
    half = _integer(state, "half_window")
    edges = state.get("hist_edges")
    if not isinstance(edges, Tensor) or edges.dim() != 1 or len(edges) < 2 or not edges.is_floating_point() or not (
        bool(torch.isfinite(edges).all()) and bool((edges[1:] > edges[:-1]).all())
    ):
        raise ValueError(f"`hist_edges` must be ascending finite bin edges, got {_show(edges)}")
    _integer(state, "tokens_seen")
    for field in STAT_FIELDS:
        if field.name not in state:
            raise ValueError(f"`{field.name}` is missing")
        if field.name == "hist":
            _counts(state["hist"], "hist", (num_latents, len(edges) - 1))
        else:
            _tensor(state[field.name], field.name, (num_latents,), floating=field.dtype.is_floating_point)
    if "interval" in state:
        intervals = _integer(state, "num_intervals", 1)
        for field in INTERVAL_FIELDS:
            _counts(state.get(field.name), field.name, (num_latents, intervals))
        interval_edges = state.get("interval_edges")
        if not isinstance(interval_edges, Tensor) or tuple(interval_edges.shape) != (intervals + 1,):
            raise ValueError(f"`interval_edges` must have {intervals + 1} entries, got {_show(interval_edges)}")
    if "recent" in state and "recent_prev" not in state:
        raise ValueError("`recent_prev` is missing beside `recent`")
    if "top" not in state:
        raise ValueError("`top` (the top samples' table) is missing")
    for name in TABLE_NAMES:
        if name in state:
            rows = num_latents * int(state["num_intervals"]) if name == "interval" else num_latents
            _table(state, name, rows, 2 * half + 1)
