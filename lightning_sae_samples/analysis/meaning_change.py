"""When a history's counts say something: the rule of births, deaths, revivals and meaning changes.

A meaning change is a chi-square test of homogeneity between a latent's activating tokens in two windows, on
the counts the history keeps (per window, its top tokens with their counts and its total count), vectorized
over every pair of windows compared. See docs/history.md for the rule, its false-alarm rate and its limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sae_samples.arguments import finite_float, positive_int


@dataclass(frozen=True)
class EventRule:
    """The thresholds that tell a latent's events from sampling noise at the counts a window holds."""

    min_active_count: int = 5
    """Activations a window needs for the latent to be active in it (born, alive, revived).

    A latent that fires fewer times in a window is *rare* there: it is not born or revived by it, and a run
    of such windows for ``dead_window_steps`` is a death."""

    min_tested_count: int = 20
    """Activations each of two windows needs before their tokens are compared (fewer: not enough data).

    A window with fewer is skipped: the next window with enough is compared with the last one before it."""

    false_alarm_rate: float = 1e-3
    """Chance that one comparison of a latent whose tokens did not change flags it (the test's level)."""

    min_shift: float = 0.3
    """Share of the activations that must have moved to other tokens (total variation distance of the two
    windows' token shares) for a change to count: at large counts, tiny shifts are significant but mean
    nothing."""

    def __post_init__(self) -> None:
        positive_int(self.min_active_count, "min_active_count", "Use e.g. 5 activations in a window.")
        positive_int(self.min_tested_count, "min_tested_count", "Use e.g. 20 activations in each window.")
        rate = finite_float(self.false_alarm_rate, "false_alarm_rate", "Use e.g. 0.001.")
        if not 0.0 < rate < 1.0:
            raise ValueError(f"`false_alarm_rate` must be in (0, 1), got {rate!r}. Use e.g. 0.001.")
        shift = finite_float(self.min_shift, "min_shift", "Use e.g. 0.3.")
        if not 0.0 <= shift <= 1.0:
            raise ValueError(f"`min_shift` must be in [0, 1], got {shift!r}. Use e.g. 0.3.")


#: The rule the analyzer, reports, ``serve`` and ``export`` use.
DEFAULT_RULE = EventRule()


#: Pairs of windows tested at once: bounds the test's temporary tables (a few hundred bytes a pair each) on a
#: history of millions of rows.
PAIRS_AT_ONCE = 1 << 18


def token_shift_test(ids_a: Tensor, counts_a: Tensor, total_a: Tensor, ids_b: Tensor, counts_b: Tensor,
                     total_b: Tensor) -> tuple[Tensor, Tensor]:
    """Per pair of windows: the p-value of "same token distribution" and the share of activations that moved.

    Each window gives its top token ids ``[P, k]`` (``-1`` where fewer, counts descending) with their counts and
    its total count ``[P]``. The table has a column per token listed in either window and one for all other
    tokens. A listed token's count in the window that did not list it is known when that window's list is not
    full (it is 0); otherwise it is at most that window's smallest listed count, and is taken as the count the
    hypothesis of no change expects there, within that bound (and all such counts within the window's other
    tokens), so that falling off a top list is no evidence of change by itself.

    Returns:
        ``(p_value, shift)`` float64 ``[P]``: Pearson's chi-square test of homogeneity of the 2-row table, and
        the total variation distance between the two rows' shares.
    """
    inputs = (ids_a, counts_a, total_a, ids_b, counts_b, total_b)
    if len(total_a) <= PAIRS_AT_ONCE:
        return _shift_test(*inputs)
    parts = [_shift_test(*(x[at: at + PAIRS_AT_ONCE] for x in inputs)) for at in range(0, len(total_a), PAIRS_AT_ONCE)]
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])


def _shift_test(ids_a: Tensor, counts_a: Tensor, total_a: Tensor, ids_b: Tensor, counts_b: Tensor,
                total_b: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`token_shift_test` of one batch of pairs."""
    a = _Window(ids_a, counts_a, total_a)
    b = _Window(ids_b, counts_b, total_b)
    same = ids_a.unsqueeze(2) == torch.where(b.listed, ids_b, -2).unsqueeze(1)  # -1 (none) never meets -2
    b_of_a, a_of_b = same.any(2), same.any(1)  # A's tokens that B lists; B's tokens that A lists
    # Columns: A's listed tokens, B's listed tokens that A does not list (a token both list is in A's columns
    # only), and the other tokens. An unknown cell is only ever B's count of one of A's tokens or the reverse.
    b_in_a_columns = torch.where(b_of_a, b.counts.gather(1, same.to(torch.uint8).argmax(2)), 0.0)
    guess_b, other_b = b.fill(a.counts, a.listed & ~b_of_a & b.full.unsqueeze(1), a.total)
    b_in_b_columns = torch.where(a_of_b, 0.0, b.counts)
    guess_a, other_a = a.fill(b_in_b_columns, b.listed & ~a_of_b & a.full.unsqueeze(1), b.total)
    row_a = torch.cat([a.counts, guess_a, other_a.unsqueeze(1)], 1)
    row_b = torch.cat([b_in_a_columns + guess_b, b_in_b_columns, other_b.unsqueeze(1)], 1)
    # For a 2-row table the chi-square is sum over columns of (a_c n_b - b_c n_a)^2 / (n_a n_b (a_c + b_c)), and
    # the total variation distance half the sum of |a_c n_b - b_c n_a| / (n_a n_b).
    scale = (a.total * b.total).clamp(min=1)
    gap = row_a * b.total.unsqueeze(1) - row_b * a.total.unsqueeze(1)
    column = row_a + row_b
    chi2 = (gap.square() / column.clamp(min=1e-300)).sum(1) / scale
    dof = (column > 0).sum(1) - 1
    p_value = torch.where(dof > 0, torch.special.gammaincc(dof.clamp(min=1) / 2.0, chi2 / 2.0), 1.0)
    shift = 0.5 * gap.abs().sum(1) / scale
    return p_value, shift


class _Window:
    """One side of the compared pairs: its listed tokens, their counts and its total (float64)."""

    def __init__(self, ids: Tensor, counts: Tensor, total: Tensor) -> None:
        self.listed = ids >= 0
        self.counts = torch.where(self.listed, counts.double(), 0.0)
        self.total = total.double()
        self.full = self.listed.all(1)
        self.smallest = self.counts[:, -1:] if ids.shape[1] else torch.zeros_like(self.total).unsqueeze(1)
        self.other = (self.total - self.counts.sum(1)).clamp(min=0)

    def fill(self, other_counts: Tensor, unknown: Tensor, other_total: Tensor) -> tuple[Tensor, Tensor]:
        """This window's counts of the other's tokens where ``unknown`` (else 0), and what is left for the rest.

        An unknown count is filled as the other window's shares expect it, at most this window's smallest listed
        count, and all of them at most its other tokens.
        """
        guess = other_counts * (self.total / other_total.clamp(min=1)).unsqueeze(1)
        guess = torch.where(unknown, torch.minimum(guess, self.smallest), 0.0)
        wanted = guess.sum(1)
        guess = guess * torch.where(wanted > self.other, self.other / wanted.clamp(min=1e-300), 1.0).unsqueeze(1)
        return guess, (self.other - guess.sum(1)).clamp(min=0)
