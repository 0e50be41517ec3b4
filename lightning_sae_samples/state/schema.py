"""The collector state, declared once: its fields, their scope, dtype, fill value and merge rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from lightning_sae_samples.config import engine_fields

#: Version of the collection summary and feature files (``collection_summary.json``).
FORMAT_VERSION = 1


#: Version of the collector state (checkpoint entry and ``full_state.pt``): 2 is the compact form.
STATE_FORMAT_VERSION = 2


EMPTY = -1


#: Sample tables, in the order they appear in a state.
TABLE_NAMES = ("top", "interval", "recent", "recent_prev", "window")


#: Per-sample fields that say where a sample was seen; the rest of a sample's fields are its sort keys.
WINDOW_FIELDS = ("position", "context_tokens", "context_acts")


#: Per-sample fields every table has (``priority`` and ``hash`` only where random or de-duplicated).
TABLE_FIELDS = ("values", "step", "order", *WINDOW_FIELDS)


#: Where a kept sample was seen when shuffled rows keep their token refs (``row_windows="refs"``): its position
#: and the ref into an array token source, which gives the window when the sample is written; no window tokens,
#: and no activations (a row knows only its own, which is the sample's value).
REF_FIELDS = ("position", "token_ref")


#: Per-sample fields of a table that keeps token refs.
REF_TABLE_FIELDS = ("values", "step", "order", *REF_FIELDS)


#: Run-level entries of a state whose tables keep token refs: ``"refs"``, and the array source they point into
#: (see :meth:`~lightning_sae_samples.token_sources.ArrayTokenSource.description`). A state without them keeps
#: windows.
ROW_WINDOWS_KEY = "row_windows"
TOKEN_SOURCE_KEY = "token_source"


Number = Union[int, float]


@dataclass(frozen=True)
class StateField:
    """One declared entry of a collector state.

    Args:
        name: Key in the state (for a sample field: key inside its table's dict).
        scope: ``"latent"`` (first dimension ``F``), ``"interval"`` (``[F, num_intervals]``), ``"run"`` (one
            value per run) or ``"sample"`` (one per kept sample of a table).
        dtype: Tensor dtype (``None``: a plain Python value).
        fill: Value of an empty entry.
        merge: How two states combine: ``"sum"``, ``"min"``, ``"max"``, ``"first"`` (earliest step, ignoring
            ``EMPTY``), ``"last"`` (latest step), ``"same"`` (must be equal; checked on merge), or
            ``"top-k"`` (sample fields: re-ranked over both, see :func:`merge_padded_tables`).
        sparse: Counts stored by their nonzero entries (see :func:`sparse_counts`): dense in memory, but
            in the compact form only what was counted.
    """

    name: str
    scope: str
    dtype: Optional[torch.dtype]
    fill: Number
    merge: str
    sparse: bool = False


#: State keys of the settings whose difference makes two states unmergeable (the threshold shows in the edges).
MERGE_KEYS = tuple(f.metadata["state"] for f in engine_fields() if f.metadata["merge"])


#: Run-level counters.
RUN_FIELDS = (
    StateField("tokens_seen", "run", torch.int64, 0, "sum"),
    StateField("nonfinite_skipped", "run", torch.int64, 0, "sum"),
    StateField("steps_collected", "run", None, 0, "max"),
    StateField("first_collected_step", "run", None, EMPTY, "first"),
    StateField("last_collected_step", "run", None, EMPTY, "last"),
    StateField("recent_block", "run", None, EMPTY, "same"),
    # The current history window (since the last save): its tokens, and the step it began at (the last save's).
    StateField("window_tokens_seen", "run", torch.int64, 0, "sum"),
    StateField("window_start", "run", None, 0, "max"),
)


#: Streaming statistics per latent (``hist`` has a second dimension: the histogram bins).
STAT_FIELDS = (
    StateField("count", "latent", torch.int64, 0, "sum"),
    StateField("sum", "latent", torch.float64, 0.0, "sum"),
    StateField("sum_sq", "latent", torch.float64, 0.0, "sum"),
    StateField("max", "latent", torch.float32, -math.inf, "max"),
    StateField("min", "latent", torch.float32, math.inf, "min"),
    StateField("hist", "latent", torch.int64, 0, "sum", sparse=True),
    StateField("first_step", "latent", torch.int64, EMPTY, "first"),
    StateField("last_step", "latent", torch.int64, EMPTY, "last"),
)


#: Statistics per latent of the current history window (since the last save), reset by each save.
WINDOW_STAT_FIELDS = (
    StateField("window_count", "latent", torch.int64, 0, "sum"),
    StateField("window_sum", "latent", torch.float64, 0.0, "sum"),
    StateField("window_max", "latent", torch.float32, -math.inf, "max"),
)


#: The current history window's activations per (latent, token id): a run-level entry holding the sorted
#: distinct keys ``latent << 32 | token`` and their counts; two states merge by summing the counts of equal keys.
WINDOW_TOKENS = StateField("window_tokens", "pairs", torch.int64, 0, "sum")


#: Bits of a window token key below the latent.
TOKEN_BITS = 32


#: Activations per latent and interval (only with interval sampling).
INTERVAL_FIELDS = (StateField("interval_count", "interval", torch.int64, 0, "sum", sparse=True),)


#: Fields of one kept sample, in every table.
SAMPLE_FIELDS = (
    StateField("values", "sample", torch.float32, -math.inf, "top-k"),
    StateField("priority", "sample", torch.float64, -math.inf, "top-k"),
    StateField("step", "sample", torch.int64, EMPTY, "top-k"),
    StateField("order", "sample", torch.int64, EMPTY, "top-k"),
    StateField("hash", "sample", torch.int64, 0, "top-k"),
    StateField("position", "sample", torch.int32, EMPTY, "top-k"),
    # Window fields are stored in the smallest dtype that holds them: token ids in int16 while every id seen is
    # below 2**15, else int32; activations in the latents' own bfloat16/float16, else float32. Merges widen.
    StateField("context_tokens", "sample", torch.int32, EMPTY, "top-k"),
    StateField("context_acts", "sample", torch.float32, 0.0, "top-k"),
    StateField("token_ref", "sample", torch.int64, EMPTY, "top-k"),
)


SAMPLE_FIELD = {f.name: f for f in SAMPLE_FIELDS}


#: Per-latent tensors of a state (indexed by latent), with their declarations.
LATENT_FIELDS = (*STAT_FIELDS, *WINDOW_STAT_FIELDS, *INTERVAL_FIELDS)


def empty_field(field: StateField, shape: tuple[int, ...], device: Union[torch.device, str] = "cpu") -> Tensor:
    """A tensor of ``shape`` holding ``field``'s empty value."""
    return torch.full(shape, field.fill, dtype=field.dtype, device=device)


# ---------------------------------------------------------------------- whole states
def keeps_refs(state: dict) -> bool:
    """Whether a state's kept samples hold token refs instead of their windows (``row_windows="refs"``)."""
    return state.get(ROW_WINDOWS_KEY) == "refs"


def check_state_version(state: object, source: str = "collector state") -> None:
    """Raise a clear error unless ``state`` is a compact collector state of this version."""
    if not isinstance(state, dict):
        raise ValueError(f"The {source} is not a dict; it was not written by lightning-sae-samples.")
    version = state.get("format_version")
    if version != STATE_FORMAT_VERSION:
        raise ValueError(
            f"The {source} has state format_version {version!r}; this version of lightning-sae-samples reads"
            f" {STATE_FORMAT_VERSION} (compact tables). Read it with the lightning-sae-samples version that"
            " wrote it, or collect again."
        )
