"""Planted truth for meaning changes: a plain-loop collection over a Zipf token stream, where some latents switch
their token at a known save and the others keep one token distribution while their frequency ranges from a
fraction of an activation per window to thousands. The history the collector writes must show the switches at
their window and leave the stable latents alone, and latents too rare to say anything are never born."""

import pytest
import torch

from lightning_sae_samples import ActivationSampleCollector
from lightning_sae_samples.analysis.history import FeatureHistory

VOCAB, BATCH, SEQ, STEPS_PER_WINDOW, WINDOWS = 500, 16, 64, 8, 6
TOKENS_PER_WINDOW = BATCH * SEQ * STEPS_PER_WINDOW
STABLE, SWITCHING = 300, 100
#: Stable latents' token distributions: (tokens, geometric ratio of their weights; 1.0: all alike).
STABLE_SHAPES = [(1, 1.0), (2, 0.5), (3, 0.6), (5, 1.0), (8, 0.7), (8, 1.0), (30, 1.0)]
#: A switching latent moves from one token (or a few, one dominant) to others.
SWITCH_SHAPES = [(1, 1.0), (2, 0.3), (3, 0.4)]


def token_probabilities():
    return 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)


def firing_column(gen, shape, expected_per_window, exclude=()):
    """Per token, the chance that the latent fires on it, and its tokens (the dominant one first).

    The dominant token is one frequent enough in the stream for the expected count (the most frequent one left
    otherwise); the others are any tokens, with geometrically smaller weights.
    """
    size, ratio = shape
    capacity = TOKENS_PER_WINDOW * token_probabilities() / token_probabilities().sum()  # occurrences a window
    free = torch.ones(VOCAB, dtype=torch.bool)
    free[list(exclude)] = False
    candidates = (free & (capacity >= expected_per_window)).nonzero().flatten()
    if not len(candidates):
        candidates = free.nonzero().flatten()[:1]
    dominant = candidates[torch.randint(len(candidates), (1,), generator=gen)]
    free[dominant] = False
    rest = free.nonzero().flatten()
    support = torch.cat([dominant, rest[torch.randperm(len(rest), generator=gen)[: size - 1]]])
    column = torch.zeros(VOCAB, dtype=torch.float64)
    column[support] = ratio ** torch.arange(size, dtype=torch.float64)
    scale = expected_per_window / float((capacity * column).sum())
    return (column * scale).clamp(max=1.0), support


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    gen = torch.Generator().manual_seed(0)
    stable_rates = torch.logspace(-0.5, 3.5, STABLE, dtype=torch.float64)  # 0.3 to 3,000 activations a window
    columns_before, columns_after, switch_window = [], [], {}
    for f in range(STABLE):
        column, _ = firing_column(gen, STABLE_SHAPES[f % len(STABLE_SHAPES)], float(stable_rates[f]))
        columns_before.append(column)
        columns_after.append(column)
    switch_rates = torch.logspace(1.6, 2.6, SWITCHING, dtype=torch.float64)  # 40 to 400 a window
    for i in range(SWITCHING):
        shape, rate = SWITCH_SHAPES[i % len(SWITCH_SHAPES)], float(switch_rates[i])
        before, support = firing_column(gen, shape, rate)
        after, _ = firing_column(gen, shape, rate, exclude=support.tolist())
        columns_before.append(before)
        columns_after.append(after)
        switch_window[STABLE + i] = 1 + i % (WINDOWS - 1)
    before_table = torch.stack(columns_before, 1).float()
    after_table = torch.stack(columns_after, 1).float()
    switched_at = torch.tensor([switch_window.get(f, WINDOWS) for f in range(STABLE + SWITCHING)])

    collector = ActivationSampleCollector(
        num_latents=STABLE + SWITCHING, activation_threshold=0.5, max_samples_per_feature=2, context_size=2,
        top_features_to_save=2, samples_per_feature_to_save=2, samples_per_interval=0, write_report=False,
        history_windows_per_level=WINDOWS,
    )
    dirpath = tmp_path_factory.mktemp("planted") / "samples"
    p = token_probabilities().float()
    for step in range(WINDOWS * STEPS_PER_WINDOW):
        window = step // STEPS_PER_WINDOW
        tokens = torch.multinomial(p, BATCH * SEQ, replacement=True, generator=gen).view(BATCH, SEQ)
        chance = torch.where(window >= switched_at, after_table[tokens], before_table[tokens])
        fired = torch.rand(chance.shape, generator=gen) < chance
        latents = fired * (1.0 + torch.rand(chance.shape, generator=gen))
        collector.update(tokens, latents=latents, step=step)
        if step % STEPS_PER_WINDOW == STEPS_PER_WINDOW - 1:
            collector.save(dirpath, full_state=False)
    collector.close()
    return FeatureHistory.from_dir(dirpath), stable_rates, switch_window


def test_the_history_has_one_window_per_save(planted):
    history, _, _ = planted
    ends = [STEPS_PER_WINDOW * (w + 1) - 1 for w in range(WINDOWS)]
    assert [(w.start, w.end) for w in history.windows] == list(zip([0, *ends[:-1]], ends))


def test_planted_switches_are_found_at_their_window(planted):
    history, _, switch_window = planted
    changes = [e for e in history.events() if e.kind == "meaning_change"]
    found = {(e.latent, e.window) for e in changes}
    hits = sum((latent, window) in found for latent, window in switch_window.items())
    assert hits >= 0.95 * len(switch_window), f"{hits} of {len(switch_window)} planted switches found"


def test_stable_latents_are_not_flagged_whatever_their_frequency(planted):
    history, stable_rates, _ = planted
    flagged = {e.latent for e in history.events() if e.kind == "meaning_change" and e.latent < STABLE}
    assert len(flagged) <= 0.02 * STABLE, f"{len(flagged)} of {STABLE} stable latents flagged: {sorted(flagged)}"
    # The stable latents do cover very rare to dense: a fraction of an activation a window to thousands.
    counts = [sum(s.count for s in history.feature(f)) / WINDOWS for f in range(STABLE)]
    assert min(counts) < 1 and max(counts) > 1000 and float(stable_rates[-1]) > 1000


def test_a_latent_firing_about_once_a_window_is_rare_not_born(planted):
    history, stable_rates, _ = planted
    rare = [f for f in range(STABLE) if stable_rates[f] <= 1.0 and history.feature(f)]
    born = [e.latent for e in history.events() if e.kind == "birth" and e.latent in rare]
    assert len(rare) >= 20 and len(born) <= 0.05 * len(rare), f"{len(born)} of {len(rare)} rare latents born"
    dense = [f for f in range(STABLE) if stable_rates[f] >= 100]
    births = {e.latent: e.window for e in history.events() if e.kind == "birth"}
    assert all(births.get(f) == 0 for f in dense)
