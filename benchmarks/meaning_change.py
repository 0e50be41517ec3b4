"""False alarms and power of the meaning-change test (``analysis.meaning_change``) on simulated windows.

Run from the repository root::

    python benchmarks/meaning_change.py                   # 2,000 latents per cell
    python benchmarks/meaning_change.py --latents 500     # quicker

Each cell draws two windows of a latent's activating tokens (Poisson counts around ``n``, tokens from a fixed
distribution over 200 tokens), records each window as the history does (top 5 tokens with their counts, ties to
the smaller id, and the total), and runs the test. For **stable** latents both windows share the distribution:
the share flagged is the false-alarm rate. For **switched** latents the second window's distribution is the
first's moved to other tokens: the share flagged is the power. Each cell prints the share with p below the
false-alarm rate alone, then with the default minimum shift too (what the history flags).

Shapes: ``one`` token; ``geometric`` weights 0.6^i; ``flat8`` / ``flat30`` / ``flat200`` tokens alike;
``zipf`` 1/i and ``zipf2`` 1/i^2 over all 200 tokens.
"""

from __future__ import annotations

import argparse

import torch

from lightning_sae_samples.analysis.meaning_change import DEFAULT_RULE, token_shift_test

VOCAB, TOP = 200, 5
SHAPES = ("one", "geometric", "flat8", "flat30", "flat200", "zipf", "zipf2")
COUNTS = (5, 10, 20, 50, 200, 2000)


def shape_weights(shape: str) -> torch.Tensor:
    rank = torch.arange(VOCAB, dtype=torch.float64)
    weights = {
        "one": (rank == 0).double(), "geometric": 0.6**rank, "flat8": (rank < 8).double(),
        "flat30": (rank < 30).double(), "flat200": torch.ones(VOCAB, dtype=torch.float64),
        "zipf": 1.0 / (rank + 1), "zipf2": 1.0 / (rank + 1) ** 2,
    }[shape]
    return weights / weights.sum()


def recorded(probabilities: torch.Tensor, totals: torch.Tensor, gen: torch.Generator):
    """Token counts drawn per latent, kept as the history keeps them: top ids, their counts, the total."""
    counts = torch.zeros(len(totals), VOCAB, dtype=torch.int64)
    for i, total in enumerate(totals.tolist()):
        if total:
            counts[i] = torch.multinomial(probabilities, total, replacement=True, generator=gen).bincount(
                minlength=VOCAB)
    key = counts * (VOCAB + 1) + (VOCAB - torch.arange(VOCAB))  # count first, then the smaller id
    order = torch.argsort(key, 1, descending=True)[:, :TOP]
    top = torch.gather(counts, 1, order)
    return torch.where(top > 0, order, -1), top, totals


def flagged(first, second) -> tuple[float, float]:
    p_value, shift = token_shift_test(*first, *second)
    significant = p_value < DEFAULT_RULE.false_alarm_rate
    return float(significant.double().mean()), float((significant & (shift >= DEFAULT_RULE.min_shift)).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latents", type=int, default=2000, help="simulated latents per cell")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"rule: {DEFAULT_RULE}")
    for title, moved in (("stable (false alarms)", False), ("switched to other tokens (power)", True)):
        print(f"\n{title}: share flagged by p alone / by p and the minimum shift")
        print("| shape | " + " | ".join(f"n = {n:,}" for n in COUNTS) + " |")
        print("|---" * (len(COUNTS) + 1) + "|")
        for shape in SHAPES:
            if moved and shape == "flat200":
                continue  # every token already: nowhere to move to
            before = shape_weights(shape)
            after = torch.roll(before, VOCAB // 2) if moved else before
            cells = []
            for n in COUNTS:
                size = torch.full((args.latents,), float(n))
                first = recorded(before, torch.poisson(size, generator=gen).long(), gen)
                second = recorded(after, torch.poisson(size, generator=gen).long(), gen)
                by_p, by_rule = flagged(first, second)
                cells.append(f"{by_p:.3f} / {by_rule:.3f}")
            print(f"| {shape} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
