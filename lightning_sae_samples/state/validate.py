"""Check a compact collector state read from disk before anything indexes into it.

A ``full_state.pt`` (or a checkpoint entry) is input from a stranger: every declared field must be there with
the dtype kind and shape the schema gives it, every table's counts must add up to its packed samples, and every
index must stay inside what it indexes. Values are checked too, as the collector produces them: no NaN (but for
the unknown context activations of shuffled rows), no infinity except the empty fill of ``max``/``min``, counts
and steps not below their empty value, activations and bin edges within the float32 range, and token ids not
below ``EMPTY`` (the fill outside a sequence; never at a sample's own token). A state whose samples keep token
refs (``row_windows="refs"``) has no window fields: its refs must lie inside the array source it records.
:func:`check_state` raises a ``ValueError`` naming the field otherwise.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sae_samples.state.schema import (
    EMPTY,
    INTERVAL_FIELDS,
    REF_TABLE_FIELDS,
    ROW_WINDOWS_KEY,
    STAT_FIELDS,
    TABLE_FIELDS,
    TABLE_NAMES,
    TOKEN_SOURCE_KEY,
)

#: Largest magnitude of an activation or a bin edge: activations are float32.
FLOAT_LIMIT = float(torch.finfo(torch.float32).max)


def _integer(state: dict, key: str, minimum: int = 0) -> int:
    value = state.get(key)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{key}` must be an integer >= {minimum}, got {_show(value)}")
    return value


def _values(ok: Tensor, key: str, rule: str) -> None:
    """Raise naming ``key`` and its first offending entry unless ``ok`` holds everywhere."""
    if ok.numel() and not bool(ok.all()):
        first = int((~ok).reshape(-1).nonzero()[0])
        raise ValueError(f"`{key}` must hold {rule}; entry {first} does not")


def _finite(value: Tensor, key: str, limit: float = FLOAT_LIMIT) -> None:
    bound = "" if math.isinf(limit) else f" of magnitude <= {limit:.4g}"
    _values(torch.isfinite(value) & (value.abs() <= limit), key, f"finite numbers{bound}")


def _at_least(value: Tensor, key: str, minimum: int) -> None:
    _values(value >= minimum, key, f"values >= {minimum}")


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


def _ref_source(state: dict) -> tuple[int, int]:
    """``(S * T, T)`` of the array source a state keeping refs records: its refs lie in ``[0, S * T)``."""
    described = state.get(TOKEN_SOURCE_KEY)
    if not isinstance(described, dict):
        raise ValueError(f"`{TOKEN_SOURCE_KEY}` must describe the array source the refs point into, got"
                         f" {_show(described)}")
    pad = described.get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int)):
        raise ValueError(f"`{TOKEN_SOURCE_KEY}.pad_token_id` must be an integer or None, got {_show(pad)}")
    if not isinstance(described.get("kind"), str):
        raise ValueError(f"`{TOKEN_SOURCE_KEY}.kind` must name the source's class, got {_show(described.get('kind'))}")
    fingerprint = described.get("fingerprint")
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{16}", fingerprint):
        raise ValueError(f"`{TOKEN_SOURCE_KEY}.fingerprint` must be 16 hex digits, got {_show(fingerprint)}")
    seq_len = _integer(described, "seq_len", 1)
    return _integer(described, "num_sequences", 1) * seq_len, seq_len


def _table(state: dict, name: str, rows: int, window: int, ref_source: Optional[tuple[int, int]] = None) -> None:
    table = state[name]
    if not isinstance(table, dict):
        raise ValueError(f"`{name}` must be a sample table, got {_show(table)}")
    capacity = _integer(table, "capacity")
    count = _tensor(table.get("count"), f"{name}.count", (rows,), floating=False)
    if len(count) and (int(count.min()) < 0 or int(count.max()) > capacity):
        raise ValueError(f"`{name}.count` must lie in [0, {capacity}] (the table's capacity)")
    stored = int(count.sum())
    for field in TABLE_FIELDS if ref_source is None else REF_TABLE_FIELDS:
        shape = (stored, window) if field.startswith("context_") else (stored,)
        _tensor(table.get(field), f"{name}.{field}", shape, floating=field in ("values", "context_acts"))
    _finite(table["values"], f"{name}.values")
    for field in ("step", "order", "position"):
        _at_least(table[field], f"{name}.{field}", 0)
    if ref_source is not None:
        limit, seq_len = ref_source
        refs = table["token_ref"]
        _values((refs >= 0) & (refs < limit), f"{name}.token_ref", f"token refs in [0, {limit})")
        _values(table["position"] == refs % seq_len, f"{name}.position", "each sample's ref modulo the seq_len")
        _priority(table, name, stored)
        return
    # A shuffled row's neighbours were seen in other rows: their activations are unknown, stored as NaN.
    acts = table["context_acts"]
    _values(torch.isnan(acts) | (acts.abs() <= FLOAT_LIMIT), f"{name}.context_acts",
            f"finite numbers of magnitude <= {FLOAT_LIMIT:.4g}, or NaN (unknown)")
    tokens = table["context_tokens"]
    _at_least(tokens, f"{name}.context_tokens", EMPTY)
    centre = window // 2
    inside = (tokens >= 0).to(torch.int8)
    edges_only = (inside[:, 1 : centre + 1] >= inside[:, :centre]).all(1) & (
        inside[:, centre + 1 :] <= inside[:, centre:-1]
    ).all(1)
    _values(inside[:, centre].bool() & edges_only, f"{name}.context_tokens",
            f"token ids >= 0 from each sample's own position (column {centre}) outwards, {EMPTY} only beyond the"
            " sequence's edges")
    _priority(table, name, stored)


def _priority(table: dict, name: str, stored: int) -> None:
    if "priority" in table:
        priority = table["priority"]
        if not isinstance(priority, Tensor) or tuple(priority.shape) != (stored,) or not priority.is_floating_point():
            raise ValueError(f"`{name}.priority` must be a floating-point tensor of shape {(stored,)}, got"
                             f" {_show(priority)}")
        _values(~torch.isnan(priority), f"{name}.priority", "numbers (no NaN)")


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
    _finite(edges, "hist_edges")
    tokens_seen = _integer(state, "tokens_seen")
    for key, minimum in (("steps_collected", 0), ("nonfinite_skipped", 0), ("first_collected_step", EMPTY),
                         ("last_collected_step", EMPTY)):
        if key in state:
            _integer(state, key, minimum)
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
        if not isinstance(interval_edges, Tensor) or tuple(interval_edges.shape) != (intervals + 1,) or (
            not interval_edges.is_floating_point()
        ):
            raise ValueError(f"`interval_edges` must have {intervals + 1} entries, got {_show(interval_edges)}")
        _finite(interval_edges, "interval_edges")
        _values(interval_edges[1:] > interval_edges[:-1], "interval_edges", "ascending edges")
        threshold = state.get("threshold")
        if isinstance(threshold, Tensor) and threshold.numel() == 1:
            threshold = threshold.item()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"`threshold` must be a finite number, got {_show(threshold)}")
    if "recent" in state and "recent_prev" not in state:
        raise ValueError("`recent_prev` is missing beside `recent`")
    if "top" not in state:
        raise ValueError("`top` (the top samples' table) is missing")
    mode = state.get(ROW_WINDOWS_KEY, "tokens")
    if mode not in ("tokens", "refs"):
        raise ValueError(f"`{ROW_WINDOWS_KEY}` must be 'tokens' or 'refs', got {_show(mode)}")
    ref_source = _ref_source(state) if mode == "refs" else None
    for name in TABLE_NAMES:
        if name in state:
            rows = num_latents * int(state["num_intervals"]) if name == "interval" else num_latents
            _table(state, name, rows, 2 * half + 1, ref_source)
    _check_statistics(state, tokens_seen)


def _count_values(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else value["value"]


def _check_statistics(state: dict, tokens_seen: int) -> None:
    """The per-latent statistics hold values the collector can produce (shapes are checked already)."""
    count = state["count"]
    _values((count >= 0) & (count <= tokens_seen), "count", f"counts in [0, tokens_seen = {tokens_seen}]")
    # Sums of float32 activations: their mean, and mean square, stay within float32's range (0 where none).
    counted = count.to(torch.float64)
    _finite(state["sum"], "sum", math.inf)
    _values(state["sum"].abs() <= counted * FLOAT_LIMIT, "sum", "sums of count float32 activations")
    _finite(state["sum_sq"], "sum_sq", math.inf)
    _values((state["sum_sq"] >= 0) & (state["sum_sq"] <= counted * FLOAT_LIMIT**2), "sum_sq",
            "sums of count squared float32 activations")
    fired = count > 0
    for key, empty in (("max", -math.inf), ("min", math.inf)):
        value = state[key]
        _values((torch.isfinite(value) & (value.abs() <= FLOAT_LIMIT)) | (~fired & (value == empty)), key,
                f"finite activations (or {empty} where the latent never fired)")
    for key in ("first_step", "last_step"):
        _at_least(state[key], key, EMPTY)
    first, last = state["first_step"], state["last_step"]
    # A collection derives a latent's first step from its last where it has none: the two are set together.
    _values((first == EMPTY) == (last == EMPTY), "first_step", "EMPTY (-1) exactly where `last_step` is")
    _values(first <= last, "first_step", "steps no later than `last_step`")
    _at_least(_count_values(state["hist"]), "hist", 0)
    if "interval_count" in state:
        _at_least(_count_values(state["interval_count"]), "interval_count", 0)
