"""Shuffled activation rows: each row points at its token in a token source, which gives its context window.

A row knows only its own activation; the activations of its window's other tokens are unknown (NaN), never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from lightning_sae_samples.engine.sample_table import BatchContext
from lightning_sae_samples.state.schema import EMPTY


@dataclass(frozen=True)
class TokenWindows:
    """The context windows of ``N`` rows, as a token source reads them in one gather.

    Attributes:
        tokens: Token ids ``[N, 2 * half_window + 1]`` (int64), the row's token at ``half_window``; ``-1``
            outside its sequence and past the nearest padding on each side. A padding row has ``-1`` at its
            centre too.
        position: The row token's position in its sequence ``[N]``.
        sequence: An id of the row's sequence ``[N]`` (int64): rows with equal ids come from one sequence.
    """

    tokens: Tensor
    position: Tensor
    sequence: Tensor

    def to(self, device: torch.device) -> TokenWindows:
        """The same windows on ``device``."""
        return TokenWindows(self.tokens.to(device), self.position.to(device), self.sequence.to(device))


def clip_at_padding(raw: Tensor, padding: Tensor, half_window: int) -> Tensor:
    """Windows ``raw`` ``[N, W]`` cut before the nearest ``padding`` position on each side of the centre.

    ``padding`` ``[N, W]`` is True at padding and outside the sequence; cut places (and a padding centre) read -1,
    as a ``[B, T]`` batch's window stops at a sequence edge and at padding.
    """
    if raw.shape[1] == 0:
        return raw
    real = ~padding
    right = torch.cumprod(real[:, half_window:].to(torch.int8), dim=1).bool()
    left = torch.cumprod(real[:, : half_window + 1].flip(1).to(torch.int8), dim=1).bool().flip(1)
    keep = torch.cat([left[:, :half_window], right], dim=1)
    return torch.where(keep, raw, EMPTY)


class RowBatchContext(BatchContext):
    """A batch of rows: windows come from the token source's gather, order keys from the rows' refs.

    Args:
        windows: The rows' windows (on the tables' device).
        token_idx: Row index of each candidate, ascending.
        step: Global optimizer step.
        order: Order key of every row ``[N]`` (its ref, so that ties do not depend on the shuffle).
        half_window: Context tokens kept on each side.
        window_acts: ``candidates [S] -> [S, W]``: the row's own activation at the centre, NaN elsewhere.
        token_dtype: Dtype of the window token ids.
        refs: Token ref of every row ``[N]``, for tables that keep refs instead of windows (``None``: none do).
    """

    def __init__(
        self,
        windows: TokenWindows,
        token_idx: Tensor,
        step: int,
        order: Tensor,
        half_window: int,
        window_acts: Callable[[Tensor], Tensor],
        token_dtype: torch.dtype = torch.int32,
        refs: Tensor | None = None,
    ) -> None:
        super().__init__(windows.tokens, token_idx, step, 0, half_window, window_acts, token_dtype=token_dtype)
        self.rows = windows
        self.order = order
        self.refs = refs

    def token_order(self, token_idx: Tensor) -> Tensor:
        """The rows' order keys."""
        return self.order[token_idx]

    def sequence_positions(self, token_idx: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's source sequence, and its position there."""
        return self.rows.sequence[token_idx], self.rows.position[token_idx]

    def window_tokens(self, token_idx: Tensor) -> Tensor:
        """The gathered windows of these rows."""
        return self.rows.tokens.index_select(0, token_idx).to(self.token_dtype)

    def positions_of(self, token_idx: Tensor) -> Tensor:
        """The rows' positions in their sequences."""
        return self.rows.position[token_idx].to(torch.int32)

    def token_refs(self, token_idx: Tensor) -> Tensor:
        """The rows' token refs."""
        if self.refs is None:
            raise ValueError("These rows came without their token refs, which a table keeping refs needs.")
        return self.refs[token_idx]


def unknown_neighbours(values: Tensor, half_window: int, dtype: torch.dtype) -> Tensor:
    """Window activations ``[S, W]`` of rows: their own ``values`` at the centre, NaN (unknown) elsewhere."""
    acts = torch.full((len(values), 2 * half_window + 1), float("nan"), dtype=dtype, device=values.device)
    acts[:, half_window] = values.to(dtype)
    return acts
