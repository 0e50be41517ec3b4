"""Token sources: where shuffled activation rows find their token and its context window.

A row of activations trained on out of order (SAELens' mixing buffer, dictionary_learning's ``ActivationBuffer``,
a ``DataLoader`` over cached activations) carries a ``token_ref``: an int64 that says where its token stands in a
token source. :meth:`~ArrayTokenSource.windows` reads the context windows of a whole batch of refs in one gather,
exactly as a ``[B, T]`` batch's windows are cut: clipped at the sequence's edges and at padding.

- :class:`ArrayTokenSource`: pretokenized ``[S, T]`` data (a tensor, a numpy array or memmap, a ``datasets``
  column); the ref of sequence ``s``, position ``t`` is ``s * T + t``.
- :class:`TokenRing`: the recent token batches of a stream; :meth:`TokenRing.add` returns the ref of a batch's
  first token, refs keep increasing and are never reused.

An array source's refs are global and permanent, so a kept sample may hold its ref instead of its window
(``row_windows="refs"``); :func:`with_windows` reads the windows of a whole state's kept samples at write time.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_sae_samples.engine.rows import TokenWindows, clip_at_padding
from lightning_sae_samples.engine.sample_table import token_dtype_for
from lightning_sae_samples.inputs import LatentInputError, check_attention_mask, check_refs, check_tokens
from lightning_sae_samples.state.schema import ROW_WINDOWS_KEY, TABLE_NAMES, TOKEN_SOURCE_KEY, keeps_refs

__all__ = [
    "ArrayTokenSource", "TokenRing", "TokenSource", "TokenWindows", "check_refs", "check_same_source",
    "load_token_source", "row_windows_for", "with_windows",
]


#: Sequences of an array source its fingerprint reads (evenly spaced, the first and the last included).
FINGERPRINT_SEQUENCES = 64
FINGERPRINT_DIGITS = 16


class TokenSource:
    """What the collector asks a token source: the windows of a batch of refs, and whether refs are global.

    Subclasses implement :meth:`_read` (the raw windows of in-range refs) and :meth:`ref_range`.
    """

    #: Refs name the same token on every process (an array): the order key of a row is its ref alone. A ring's
    #: refs are per process, so the collector puts the rank above them, as it does for ``[B, T]`` batches.
    global_refs = True
    #: What to raise when a ref is outside :meth:`ref_range`.
    size_hint = ""

    def ref_range(self) -> tuple[int, int]:
        """The refs this source can read now, ``[low, high)``."""
        raise NotImplementedError

    def description(self) -> Optional[dict]:
        """What identifies the tokens behind the refs, if refs stay valid for good (else ``None``).

        A state that keeps refs records it, and reads its windows only from a source with the same description.
        """
        return None

    def check(self, refs: Tensor, key: str = "token_refs") -> None:
        """Raise :class:`LatentInputError` naming the first ref outside :meth:`ref_range`, before any read."""
        if not len(refs):
            return
        low, high = self.ref_range()
        outside = (refs < low) | (refs >= high)
        if bool(outside.any()):
            bad = int(refs[outside][0])
            raise LatentInputError(
                f"`{key}` holds ref {bad}, outside this {type(self).__name__}'s range [{low}, {high}) "
                f"({int(outside.sum())} of {len(refs)} refs are). {self.size_hint}"
            )

    def windows(self, refs: Tensor, half_window: int, key: str = "token_refs") -> TokenWindows:
        """The context windows of ``refs`` ``[N]``, as a ``[B, T]`` batch's windows are cut, in one gather.

        Raises:
            LatentInputError: A ref is out of range (or has left the ring); nothing is read.
        """
        refs = check_refs(refs, key)
        self.check(refs.cpu() if refs.device.type != "cpu" else refs, key)
        tokens, position, sequence, padding = self._read(refs, half_window)
        return TokenWindows(clip_at_padding(tokens, padding, half_window), position, sequence)

    def _read(self, refs: Tensor, half_window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(tokens [N, W], position [N], sequence [N], padding [N, W])`` for in-range refs."""
        raise NotImplementedError


class ArrayTokenSource(TokenSource):
    """Pretokenized sequences ``[S, T]``; the ref of sequence ``s``, position ``t`` is ``s * T + t``.

    Args:
        tokens: A ``[S, T]`` integer tensor, a numpy array or memmap (read where the windows are, never copied
            whole), or a ``datasets`` column or any sequence of equal-length token lists (SAELens' pretokenized
            datasets, the ``token_ids`` of its cached activations), read in one vectorized call per batch.
        pad_token_id: Also padding, like a negative id: an attention mask of ``tokens != pad_token_id``.

    Raises:
        ValueError: ``tokens`` is not two-dimensional integer data of equal-length sequences.
    """

    size_hint = "Refs index the source's tokens row-major (s * T + t); check which data the rows were made from."

    def __init__(self, tokens: Any, *, pad_token_id: Optional[int] = None) -> None:
        self.tokens = tokens
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self._kind, self.num_sequences, self.seq_len = _array_kind(tokens)
        self._fingerprint: Optional[str] = None

    def __len__(self) -> int:
        return self.num_sequences * self.seq_len

    def ref_range(self) -> tuple[int, int]:
        """``[0, S * T)``."""
        return 0, len(self)

    def __repr__(self) -> str:
        return f"ArrayTokenSource({self.num_sequences} sequences of {self.seq_len} tokens, {self._kind})"

    def description(self) -> dict:
        """What a state keeping refs into it records: kind, shape, ``pad_token_id`` and :meth:`fingerprint`."""
        return {"kind": type(self).__name__, "num_sequences": self.num_sequences, "seq_len": self.seq_len,
                "pad_token_id": self.pad_token_id, "fingerprint": self.fingerprint()}

    def fingerprint(self) -> str:
        """A digest of the token ids of up to :data:`FINGERPRINT_SEQUENCES` evenly spaced sequences (cached).

        It tells apart two sources of one shape that hold other tokens (another tokenizer, another shuffle of the
        data) at the cost of reading those sequences once, not the whole source.
        """
        if self._fingerprint is None:
            count = min(FINGERPRINT_SEQUENCES, self.num_sequences)
            picks = torch.linspace(0, self.num_sequences - 1, count).round().to(torch.int64).unique()
            ids = self._gather(picks, torch.arange(self.seq_len).expand(len(picks), -1))
            self._fingerprint = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:FINGERPRINT_DIGITS]
        return self._fingerprint

    def _read(self, refs: Tensor, half_window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        seq = self.seq_len
        device = refs.device
        refs = refs.cpu()
        sequence, position = refs // seq, refs % seq
        offsets = torch.arange(-half_window, half_window + 1)
        at = position.unsqueeze(1) + offsets
        inside = (at >= 0) & (at < seq)
        raw = self._gather(sequence, at.clamp(0, seq - 1))
        padding = ~inside | (raw < 0)
        if self.pad_token_id is not None:
            padding |= raw == self.pad_token_id
        return raw.to(device), position.to(device), sequence.to(device), padding.to(device)

    def _gather(self, sequence: Tensor, columns: Tensor) -> Tensor:
        """Token ids at ``(sequence[i], columns[i, j])`` as an int64 ``[N, W]`` tensor."""
        if self._kind == "tensor":
            rows = sequence.to(self.tokens.device)
            return self.tokens[rows.unsqueeze(1), columns.to(self.tokens.device)].cpu().to(torch.int64)
        import numpy as np

        if self._kind == "numpy":
            picked = self.tokens[sequence.numpy()[:, None], columns.numpy()]
            return torch.from_numpy(np.asarray(picked, dtype=np.int64))
        # A sequence of sequences: read the distinct rows at once, then take the windows from them.
        unique, inverse = torch.unique(sequence, return_inverse=True)
        rows = _read_rows(self.tokens, unique.tolist(), self.seq_len)
        return torch.from_numpy(rows)[inverse.unsqueeze(1), columns]


def _array_kind(tokens: Any) -> tuple[str, int, int]:
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(
                f"ArrayTokenSource needs [S, T] integer token ids, got {tuple(tokens.shape)} {tokens.dtype}."
            )
        return "tensor", tokens.shape[0], tokens.shape[1]
    if hasattr(tokens, "dtype") and hasattr(tokens, "shape") and hasattr(tokens, "ndim"):
        import numpy as np

        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"ArrayTokenSource needs [S, T] integer token ids, got {tokens.shape} {tokens.dtype}.")
        return "numpy", int(tokens.shape[0]), int(tokens.shape[1])
    if isinstance(tokens, Sequence) or hasattr(tokens, "column_name"):
        if not len(tokens):
            raise ValueError("ArrayTokenSource got no sequences.")
        first = tokens[0]
        if not hasattr(first, "__len__") or not len(first):
            raise ValueError("ArrayTokenSource needs a sequence of token-id lists (one per sequence, equal lengths).")
        return "rows", len(tokens), len(first)
    raise ValueError(
        "ArrayTokenSource takes a [S, T] tensor, a numpy array/memmap or a `datasets` column; got"
        f" {type(tokens).__name__}."
    )


def _read_rows(column: Any, rows: list[int], seq_len: int) -> Any:
    """Rows of a ``datasets`` column (one Arrow read) or of a sequence of lists, as an int64 ``[U, T]`` array."""
    import numpy as np

    source = getattr(column, "source", None)
    name = getattr(column, "column_name", None)
    if source is not None and name is not None and hasattr(source, "with_format"):
        picked = source.with_format("numpy")[rows][name]
    else:
        picked = [column[i] for i in rows]
    if isinstance(picked, np.ndarray) and picked.dtype != object:
        out = picked
    else:
        out = np.asarray([np.asarray(row) for row in picked])
    if out.ndim != 2 or out.shape[1] != seq_len:
        raise LatentInputError(
            f"ArrayTokenSource's sequences must all have {seq_len} tokens; rows {rows[:5]} read as shape {out.shape}."
        )
    return out.astype(np.int64, copy=False)


class TokenRing(TokenSource):
    """The most recent token batches of a stream, for rows mixed across batches before the SAE sees them.

    Add each batch the activations are made from with :meth:`add`; it returns the ref of the batch's first
    token, and the batch's tokens have the refs ``first + b * T + t``. Refs keep increasing and are never reused;
    the oldest batches leave the ring when newer ones need room, and a ref of a batch that left is an error.

    Args:
        capacity_tokens: Tokens the ring holds: cover the mixing buffer (every batch whose rows may still come),
            e.g. SAELens' ``n_batches_in_buffer * store_batch_size_prompts * context_size``.
        pad_token_id: Also padding, like a negative id or a 0 in :meth:`add`'s ``attention_mask``.

    Raises:
        ValueError: ``capacity_tokens`` is not a positive integer.
    """

    global_refs = False

    def __init__(self, capacity_tokens: int, *, pad_token_id: Optional[int] = None) -> None:
        if isinstance(capacity_tokens, bool) or not isinstance(capacity_tokens, int) or capacity_tokens < 1:
            raise ValueError(
                f"`capacity_tokens` must be a positive integer, got {capacity_tokens!r}: the tokens of every batch"
                " whose rows may still be in the mixing buffer."
            )
        self.capacity_tokens = capacity_tokens
        self.pad_token_id = None if pad_token_id is None else int(pad_token_id)
        self._tokens: Optional[Tensor] = None
        self._row_start: Optional[Tensor] = None
        self._batches: deque[tuple[int, int]] = deque()
        self.next_ref = 0

    @property
    def size_hint(self) -> str:  # type: ignore[override]
        """What to raise when a ref has left the ring."""
        return (
            f"A ref below the range has left the ring: raise `capacity_tokens` (now {self.capacity_tokens}) to cover"
            " every batch whose rows may still be mixed; one above it was never added (add each batch with `add`)."
        )

    def ref_range(self) -> tuple[int, int]:
        """``[first ref of the oldest batch still held, next ref)``."""
        return (self._batches[0][0] if self._batches else self.next_ref), self.next_ref

    def __len__(self) -> int:
        low, high = self.ref_range()
        return high - low

    def __repr__(self) -> str:
        low, high = self.ref_range()
        return f"TokenRing(capacity_tokens={self.capacity_tokens}, refs [{low}, {high}))"

    def add(self, tokens: Tensor, attention_mask: Optional[Tensor] = None) -> int:
        """Hold a batch ``[B, T]`` (padding: negative ids, ``attention_mask`` 0, ``pad_token_id``); its first ref.

        Raises:
            LatentInputError: The batch alone is larger than ``capacity_tokens``, or not ``[B, T]`` integer ids.
        """
        tokens = check_tokens(tokens, "tokens")
        mask = check_attention_mask(attention_mask, tokens, "attention_mask")
        count = tokens.numel()
        if count > self.capacity_tokens:
            raise LatentInputError(
                f"A batch of {count} tokens does not fit a TokenRing of capacity_tokens={self.capacity_tokens}:"
                f" raise `capacity_tokens` to at least {count} (to cover the mixing buffer, many batches)."
            )
        if self._tokens is None:
            self._tokens = torch.full((self.capacity_tokens,), -1, dtype=torch.int64, device=tokens.device)
            self._row_start = torch.full((self.capacity_tokens,), -1, dtype=torch.int64, device=tokens.device)
        padding = tokens < 0
        if mask is not None:
            padding |= ~mask.to(tokens.device)
        if self.pad_token_id is not None:
            padding |= tokens == self.pad_token_id
        first = self.next_ref
        batch, seq = tokens.shape
        refs = first + torch.arange(count, device=self._tokens.device)
        slots = refs % self.capacity_tokens
        self._tokens[slots] = torch.where(padding, -1, tokens).reshape(-1).to(self._tokens.device)
        self._row_start[slots] = first + (torch.arange(count, device=slots.device) // max(seq, 1)) * seq
        self.next_ref = first + count
        self._batches.append((first, count))
        while self._batches and self._batches[0][0] < self.next_ref - self.capacity_tokens:
            self._batches.popleft()
        return first

    def _read(self, refs: Tensor, half_window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        assert self._tokens is not None and self._row_start is not None
        device = refs.device
        low, high = self.ref_range()
        refs = refs.to(self._tokens.device)
        at = refs.unsqueeze(1) + torch.arange(-half_window, half_window + 1, device=refs.device)
        slots = at.remainder(self.capacity_tokens)
        start = self._row_start[refs.remainder(self.capacity_tokens)]
        # A neighbour is of the row's sequence iff it is held and its slot records the same row start.
        inside = (at >= low) & (at < high) & (self._row_start[slots] == start.unsqueeze(1))
        raw = self._tokens[slots]
        padding = ~inside | (raw < 0)
        return raw.to(device), (refs - start).to(device), start.to(device), padding.to(device)


TokenSourceLike = Union[TokenSource, str]


def load_token_source(source: Any, owner: str = "ActivationSampleCallback") -> Optional[TokenSource]:
    """A token source object, or one named by an import path ``"package.module:attribute"`` (for YAML).

    The attribute may be a source, or a callable taking no arguments that returns one.

    Raises:
        ValueError: The path does not name a token source; the message says what it found.
    """
    if source is None or isinstance(source, TokenSource):
        return source
    if isinstance(source, str):
        import importlib

        module_name, _, attribute = source.partition(":")
        if not module_name or not attribute:
            raise ValueError(
                f"{owner}: `token_source` {source!r} must be an import path 'package.module:attribute' naming a"
                " token source (an ArrayTokenSource or TokenRing) or a function returning one."
            )
        try:
            found = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{owner}: cannot import `token_source` {source!r}: {err}") from None
        if callable(found) and not isinstance(found, TokenSource):
            found = found()
        source = found
    if not isinstance(source, TokenSource) and not callable(getattr(source, "windows", None)):
        raise ValueError(
            f"{owner}: `token_source` must be an ArrayTokenSource, a TokenRing or an import path to one, got"
            f" {type(source).__name__}."
        )
    return source


def row_windows_for(setting: str, source: Any, owner: str = "ActivationSampleCollector") -> str:
    """How kept samples of shuffled rows hold their windows: ``"refs"`` or ``"tokens"`` (see ``row_windows``).

    ``"auto"`` is ``"refs"`` for a source whose refs are permanent (an :class:`ArrayTokenSource`).

    Raises:
        ValueError: ``"refs"`` with a source whose refs do not last (a :class:`TokenRing`).
    """
    permanent = source is not None and callable(getattr(source, "description", None)) and (
        source.description() is not None)
    if setting == "auto":
        return "refs" if permanent else "tokens"
    if setting == "refs" and source is not None and not permanent:
        raise ValueError(
            f"{owner}: row_windows='refs' keeps each sample's token ref and reads its window when the samples are"
            f" written, which needs refs that last (an ArrayTokenSource); the refs of this {type(source).__name__}"
            " leave it as newer batches come. Set row_windows='tokens' (or 'auto', which keeps tokens here)."
        )
    return setting


def _shown(described: Any) -> str:
    if isinstance(described, dict) and {"num_sequences", "seq_len"} <= described.keys():
        pad = described.get("pad_token_id")
        return (f"an {described.get('kind', 'ArrayTokenSource')} of {described['num_sequences']} sequences of"
                f" {described['seq_len']} tokens" + (f" (pad_token_id={pad})" if pad is not None else ""))
    return repr(described)[:80]


def check_same_source(described: Any, source: Any, owner: str = "ActivationSampleCollector") -> None:
    """Raise unless ``source`` is the array source a state's refs point into (its recorded ``described``).

    Raises:
        ValueError: No source, or one of another shape or padding; the message says what to pass.
    """
    if not isinstance(described, dict):
        raise ValueError(f"{owner}: the collection keeps token refs but does not say which token source they point"
                         f" into (found {_shown(described)}); it was not written by lightning-sae-samples.")
    if source is None:
        raise ValueError(
            f"{owner}: the collection keeps token refs into {_shown(described)}, and no token source was given:"
            " pass that source as `token_source=` to resume or write it."
        )
    found = source.description() if callable(getattr(source, "description", None)) else None
    if found == described:
        return
    if isinstance(found, dict) and {**found, "fingerprint": None} == {**described, "fingerprint": None}:
        raise ValueError(
            f"{owner}: the collection's token refs point into {_shown(described)}, and the token source given"
            " has that shape but other tokens (its fingerprint differs: another tokenizer or order of the data?)."
            " Pass the token source the collection was made with, or start a new collection."
        )
    raise ValueError(
        f"{owner}: the collection's token refs point into {_shown(described)}, but the token source given is"
        f" {source!r}. Pass the token source the collection was made with (the same pretokenized data), or"
        " start a new collection."
    )


def with_windows(state: Optional[dict], source: Any, owner: str = "ActivationSampleCollector") -> Optional[dict]:
    """A state whose kept samples hold token refs, with their windows read from ``source`` instead.

    Every table's distinct refs are read in one gather; the windows are those the samples had when they were kept (a
    state keeping windows would hold the same ones), their activations unknown (NaN) but at the centre, where
    they are the sample's value. The result is the form of a state keeping windows (``row_windows="tokens"``);
    a state that keeps windows already is returned as it is.

    Raises:
        ValueError: ``source`` is not the one the refs point into (see :func:`check_same_source`).
        LatentInputError: A ref is outside the source.
    """
    if state is None or not keeps_refs(state):
        return state
    check_same_source(state.get(TOKEN_SOURCE_KEY), source, owner)
    half = int(state["half_window"])
    names = [name for name in TABLE_NAMES if name in state]
    refs = torch.cat([state[name]["token_ref"].reshape(-1).cpu().to(torch.int64) for name in names])
    # A row kept by several latents (and tables) is read once.
    distinct, inverse = torch.unique(refs, return_inverse=True)
    if len(distinct):
        tokens = source.windows(distinct, half, "token_ref").tokens.cpu()[inverse]
    else:
        tokens = torch.empty((0, 2 * half + 1), dtype=torch.int64)
    dtype = token_dtype_for(int(tokens.max()) if tokens.numel() else 0)
    out = {key: value for key, value in state.items() if key not in (ROW_WINDOWS_KEY, TOKEN_SOURCE_KEY)}
    start = 0
    for name in names:
        table = {key: value for key, value in state[name].items() if key != "token_ref"}
        stop = start + len(state[name]["token_ref"])
        table["context_tokens"] = tokens[start:stop].to(dtype)
        acts = torch.full((stop - start, 2 * half + 1), float("nan"), dtype=torch.float32)
        acts[:, half] = table["values"].cpu().float()
        table["context_acts"] = acts
        out[name], start = table, stop
    return out
