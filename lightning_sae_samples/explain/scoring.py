"""Which samples the explainer sees, which it is scored on, and the detection score (delphi's definition).

A latent's samples (its top samples, then its interval samples) are split once, with a generator seeded by the
latent index, after dropping samples whose text repeats an earlier one: the explanation prompt
gets the first ``shown_top`` top samples and every other interval sample;
the scorer gets up to ``positives`` of the rest (held out: never in the prompt). The non-activating contexts are
samples of other latents (their text differs from every context of this latent), drawn from a pool that the save
alone gives, so a latent's contexts do not depend on which latents one run explains. The score is the balanced
accuracy of the model's yes/no answers: the mean of the share of activating contexts it called activating and
the share of non-activating ones it called not activating. 0.5 is chance, whatever the mix.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from lightning_sae_samples.analysis.records import FeatureSamples, Sample
from lightning_sae_samples.explain.prompts import context_text


@dataclass(frozen=True)
class SplitSamples:
    """A latent's samples for the explanation prompt, and its held-out ones for scoring."""

    shown: tuple[Sample, ...]
    held_out: tuple[Sample, ...]


def _key(sample: Sample) -> str:
    """Samples with the same text are one for the explainer: a held-out one must differ in text from those shown."""
    return context_text(sample)


def split_samples(feature: FeatureSamples, shown_top: int, shown_interval: int, positives: int) -> SplitSamples:
    """The prompt's samples and up to ``positives`` held-out ones (none shared, duplicates dropped)."""
    rng = random.Random(feature.feature_idx)
    seen: set[str] = set()

    def fresh(samples: Sequence[Sample]) -> list[Sample]:
        kept = []
        for sample in samples:
            if _key(sample) not in seen:
                seen.add(_key(sample))
                kept.append(sample)
        return kept

    top = fresh(feature.samples)
    interval = fresh([s for group in feature.interval_groups for s in group.samples])
    shown = top[:shown_top] + interval[0::2][:shown_interval]
    shown_keys = {_key(s) for s in shown}
    rest = [s for s in top[shown_top:] + interval if _key(s) not in shown_keys]
    rng.shuffle(rest)
    return SplitSamples(tuple(shown), tuple(rest[:positives]))


def non_activating(
    latent: int, pool: Sequence[Sample], avoid: Sequence[Sample], count: int,
    pool_texts: Optional[Sequence[str]] = None,
) -> list[Sample]:
    """``count`` samples of other latents drawn from ``pool`` (seeded by ``latent``), none with a text in ``avoid``.

    ``pool_texts``: the pool's :func:`context_text`, when the caller has them (many latents draw from one pool).
    """
    texts = {context_text(s) for s in avoid}
    pool_texts = pool_texts if pool_texts is not None else [context_text(s) for s in pool]
    candidates = [(s, t) for s, t in zip(pool, pool_texts) if s.feature_idx != latent and t not in texts]
    rng = random.Random(latent + 1_000_003)
    rng.shuffle(candidates)
    chosen, used = [], set()
    for sample, text in candidates:
        if text not in used:
            used.add(text)
            chosen.append(sample)
            if len(chosen) == count:
                break
    return chosen


def balanced_accuracy(activating: Sequence[bool], predicted: Sequence[bool]) -> float:
    """Mean of the true-positive and true-negative rates (a class with no example counts as 0.5)."""
    if len(activating) != len(predicted):
        raise ValueError("`activating` and `predicted` differ in length")
    positives = [p for a, p in zip(activating, predicted) if a]
    negatives = [not p for a, p in zip(activating, predicted) if not a]
    tpr = sum(positives) / len(positives) if positives else 0.5
    tnr = sum(negatives) / len(negatives) if negatives else 0.5
    return (tpr + tnr) / 2


class Decoys:
    """Random explanations of many latents from one pool (:func:`decoy_explanation`, the pool read once)."""

    def __init__(self, pool: Sequence[Sample], count: int = 3) -> None:
        self.pool, self.count = pool, count
        self.latents = sorted({s.feature_idx for s in pool})
        self._tokens: dict[int, str] = {}

    def _tokens_of(self, latent: int) -> str:
        if not self._tokens:
            counts: dict[int, Counter] = {i: Counter() for i in self.latents}
            for s in self.pool:
                counts[s.feature_idx][" ".join(s.activating_token.text.split())] += 1
            for i, c in counts.items():
                tokens = [t for t, _ in sorted(c.items(), key=lambda item: (-item[1], item[0])) if t][: self.count]
                self._tokens[i] = " ".join(tokens)
        return self._tokens[latent]

    def __call__(self, latent: int) -> str:
        """The random explanation of ``latent``."""
        rng = random.Random(latent)
        others = [i for i in self.latents if i != latent]
        if not others:
            return random_words(rng, self.pool)
        return self._tokens_of(rng.choice(others)) or random_words(rng, self.pool)


def decoy_explanation(latent: int, pool: Sequence[Sample], count: int = 3) -> str:
    """A plausible but wrong explanation of ``latent``, from the pool alone: another latent's tokens.

    The other latent is drawn from the pool's (seeded by ``latent``); the explanation is the ``count`` tokens it
    fires on most often there, most frequent first (ties: in text order), as a keyword explanation reads. With no
    other latent in the pool: :func:`random_words`.
    """
    return Decoys(pool, count)(latent)


def random_words(rng: random.Random, pool: Sequence[Sample], count: int = 4) -> str:
    """A nonsense explanation: ``count`` words drawn from the pool's contexts (the baseline when no other exists)."""
    words = sorted({w for s in pool for w in context_text(s).split() if w.isalpha()})
    return " ".join(rng.sample(words, min(count, len(words)))) if words else "the token x"
