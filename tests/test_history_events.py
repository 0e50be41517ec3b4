"""Events read from a history: birth, death, revival and meaning change; the reader's rows and run series."""

import pytest
import torch

from lightning_sae_samples.analysis.history import FeatureHistory, story_line
from lightning_sae_samples.analysis.meaning_change import DEFAULT_RULE, EventRule, token_shift_test
from lightning_sae_samples.samples_dir.history_file import history_payload
from lightning_sae_samples.state.history import HISTORY_SAMPLE_FIELDS


def window(start, end, rows):
    """A window of ``rows``: latent -> (count, its top tokens as (token id, count), most frequent first)."""
    latents = sorted(rows)
    ids = torch.full((len(latents), 3), -1, dtype=torch.int32)
    counts = torch.zeros((len(latents), 3), dtype=torch.int64)
    for r, latent in enumerate(latents):
        tokens = rows[latent][1]
        ids[r, : len(tokens)] = torch.tensor([t for t, _ in tokens], dtype=torch.int32)
        counts[r, : len(tokens)] = torch.tensor([c for _, c in tokens], dtype=torch.int64)
    return {
        "start": start, "end": end, "level": 0, "saves": 1, "tokens_seen": 1000,
        "latent": torch.tensor(latents, dtype=torch.int32),
        "count": torch.tensor([rows[f][0] for f in latents], dtype=torch.int64),
        "sum": torch.tensor([rows[f][0] * 2.0 for f in latents], dtype=torch.float64),
        "max": torch.tensor([3.0] * len(latents)), "token_ids": ids, "token_counts": counts,
        "samples": {name: torch.empty((0, 3) if name.startswith("context_") else (0,), dtype=dtype)
                    for name, dtype in HISTORY_SAMPLE_FIELDS.items()},
    }


@pytest.fixture
def history():
    windows = [
        window(0, 100, {0: (50, [(1, 30), (2, 15), (3, 5)]), 1: (40, [(4, 30), (5, 10)]), 3: (1, [(9, 1)])}),
        window(100, 200, {0: (60, [(1, 33), (2, 20), (3, 7)]), 1: (20, [(4, 14), (5, 6)]), 2: (8, [(9, 8)])}),
        # Latent 0 changes meaning; latent 1 fires twice only: rare, not alive.
        window(200, 300, {0: (60, [(7, 35), (8, 20), (6, 5)]), 1: (2, [(4, 2)]), 2: (8, [(9, 8)]),
                          3: (1, [(8, 1)])}),
        window(300, 400, {0: (60, [(7, 30), (8, 30)]), 2: (30, [(9, 30)])}),
        # Latent 1 comes back; latent 3 fired in three windows, always rare: never born.
        window(400, 500, {0: (60, [(7, 30), (8, 30)]), 1: (30, [(5, 15), (4, 15)]), 2: (30, [(9, 30)]),
                          3: (2, [(9, 2)])}),
    ]
    vocab = {i: f"t{i}" for i in range(10)}
    payload = history_payload(windows, num_latents=4, top_tokens=3, context_window=3, dead_window_steps=150,
                              vocab=vocab)
    return FeatureHistory(payload)


def test_birth_death_revival_and_meaning_change_per_latent(history):
    assert [(e.kind, e.step) for e in history.events(0)] == [("birth", 0), ("meaning_change", 200)]
    change = history.events(0)[1]
    assert change.before == ("t1", "t2", "t3") and change.after == ("t7", "t8", "t6")
    assert change.before_window == 1 and change.p_value < 1e-20 and change.shift == 1.0
    # Last active in the window ending at 200 (twice in the next is rare): dead by the first window ending 150
    # steps later (400), back at 400.
    assert [(e.kind, e.step) for e in history.events(1)] == [("birth", 0), ("death", 400), ("revival", 400)]
    # Born where it first fired often enough (8 >= 5 times).
    assert [(e.kind, e.step) for e in history.events(2)] == [("birth", 100)]
    assert history.events(3) == []
    assert story_line(history, 3).startswith("rare (fewer than 5 activations in every window)")


def test_a_window_with_too_few_activations_is_skipped_and_the_change_placed_between_the_compared_windows():
    windows = [
        window(0, 100, {0: (40, [(1, 40)])}),
        window(100, 200, {0: (8, [(2, 8)])}),  # active, but too few to compare: neither a change nor a reference
        window(200, 300, {0: (40, [(2, 40)])}),
    ]
    payload = history_payload(windows, num_latents=1, top_tokens=3, context_window=3, dead_window_steps=1000,
                              vocab={i: f"t{i}" for i in range(3)})
    history = FeatureHistory(payload)
    change = [e for e in history.events(0) if e.kind == "meaning_change"]
    assert [(e.window, e.before_window, e.step) for e in change] == [(2, 0, 200)]
    assert 'meaning changed between steps 100 and 200 ("t1" → "t2")' in story_line(history, 0)
    # Compared window by window (8 activations are enough), the change is at window 1.
    assert [e.window for e in history.events(0, EventRule(min_tested_count=5)) if e.kind == "meaning_change"] == [1]


def test_one_latents_events_alone_equal_its_share_of_the_run_events():
    gen = torch.Generator().manual_seed(3)
    windows = []
    for w in range(12):
        fired = (torch.rand(8, generator=gen) < 0.6).nonzero().flatten().tolist()
        rows = {}
        for f in fired:
            count = int(torch.randint(1, 80, (1,), generator=gen))
            tokens = torch.randint(0, 6, (count,), generator=gen).bincount(minlength=6)
            tokens[torch.randint(0, 6, (1,), generator=gen)] += 3 * count  # one token dominates
            top = torch.argsort(-tokens, stable=True)[:3]
            rows[f] = (int(tokens.sum()), [(int(t), int(tokens[t])) for t in top if tokens[t] > 0])
        windows.append(window(100 * w, 100 * (w + 1), rows))
    payload = history_payload(windows, num_latents=8, top_tokens=3, context_window=3, dead_window_steps=150,
                              vocab={i: f"t{i}" for i in range(6)})
    run = FeatureHistory(payload).events()
    assert {e.kind for e in run} == {"birth", "death", "revival", "meaning_change"}
    for latent in range(8):
        alone = FeatureHistory(payload).events(latent)  # a fresh reader: from the latent's own windows
        assert alone == [e for e in run if e.latent == latent]


def test_run_events_are_listed_by_step_and_counted_per_latent(history):
    steps = [e.step for e in history.events()]
    assert steps == sorted(steps) and len(steps) == 6
    counts = history.event_counts()
    assert counts["meaning_change"].tolist() == [1, 0, 0, 0] and counts["revival"].tolist() == [0, 1, 0, 0]
    assert history.first_event_step("birth").tolist() == [0, 0, 100, -1]
    assert history.most_changed() == [0]
    series = history.run_series()
    assert [w["alive"] for w in series] == [2, 3, 2, 2, 3] and [w["rare"] for w in series] == [1, 0, 2, 0, 1]
    assert [w["births"] for w in series] == [2, 1, 0, 0, 0] and [w["deaths"] for w in series] == [0, 0, 0, 1, 0]


def test_a_looser_rule_finds_more_meaning_changes(history):
    # Latent 0's (35, 20, 5) -> (30, 30, 0) at step 300 is likely under sampling noise (p about 0.02): no change at
    # the default 0.001; a rule that accepts a 5 % false-alarm rate and small shifts flags it.
    loose = EventRule(false_alarm_rate=0.05, min_shift=0.1)
    assert [e.step for e in history.events(0, loose) if e.kind == "meaning_change"] == [200, 300]
    assert [e.step for e in history.events(0) if e.kind == "meaning_change"] == [200]
    # Fewer activations needed to be active: latent 3 is born at its first window.
    assert [(e.kind, e.step) for e in history.events(3, EventRule(min_active_count=1))][0] == ("birth", 0)


def shift_test(a, b):
    """``token_shift_test`` of two windows given as (total, [(token, count), ...])."""
    def side(total, tokens):
        ids = torch.tensor([[t for t, _ in tokens] + [-1] * (3 - len(tokens))])
        return ids, torch.tensor([[c for _, c in tokens] + [0] * (3 - len(tokens))]), torch.tensor([total])
    p_value, shift = token_shift_test(*side(*a), *side(*b))
    return float(p_value[0]), float(shift[0])


def test_huge_counts_need_a_real_shift_and_a_reshuffled_top_list_is_no_change():
    # 100,000 activations: a 5-point shift is far beyond sampling noise, yet only 5 % of the activations moved.
    p_value, shift = shift_test((100_000, [(1, 60_000), (2, 40_000)]), (100_000, [(1, 55_000), (2, 45_000)]))
    assert p_value < 1e-100 and shift == pytest.approx(0.05) and shift < DEFAULT_RULE.min_shift
    # A broad latent's full top lists differ only in which near-tied tokens made them: the others may hold them.
    p_value, shift = shift_test((1000, [(1, 100), (2, 90), (3, 80)]), (1000, [(4, 100), (5, 95), (6, 85)]))
    assert p_value > 0.1 and shift < 0.1
    # Lists that are not full are complete: the other window's tokens are known zeros there, a real change.
    p_value, shift = shift_test((100, [(1, 60), (2, 40)]), (100, [(4, 50), (5, 50)]))
    assert p_value < 1e-20 and shift == 1.0


def test_the_rule_refuses_settings_that_mean_nothing():
    for bad in (dict(min_active_count=0), dict(min_tested_count=1.5), dict(false_alarm_rate=0.0),
                dict(false_alarm_rate=1.0), dict(min_shift=1.5), dict(min_shift=float("nan"))):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            EventRule(**bad)


def test_rows_are_the_export_rows(history):
    rows = history.rows()
    assert rows[0] == {"step": 100, "window_start": 0, "latent": 0, "count": 50, "max": 3.0, "mean": 2.0,
                       "frequency": 0.05, "top_token_ids": [1, 2, 3], "top_tokens": ["t1", "t2", "t3"],
                       "top_token_counts": [30, 15, 5]}
    assert len(rows) == 16


def test_pairs_tested_in_batches_give_the_same_events(monkeypatch):
    from lightning_sae_samples.analysis import meaning_change

    gen = torch.Generator().manual_seed(5)
    windows = []
    for w in range(6):
        rows = {}
        for f in range(40):
            tokens = torch.randint(0, 4 + f % 3, (int(torch.randint(1, 120, (1,), generator=gen)),), generator=gen)
            counts = tokens.bincount()
            top = torch.argsort(-counts, stable=True)[:3]
            rows[f] = (len(tokens), [(int(t), int(counts[t])) for t in top if counts[t] > 0])
        windows.append(window(100 * w, 100 * (w + 1), rows))
    payload = history_payload(windows, num_latents=40, top_tokens=3, context_window=3, dead_window_steps=150,
                              vocab={i: f"t{i}" for i in range(6)})
    whole = FeatureHistory(payload).events(rule=EventRule(false_alarm_rate=0.2, min_shift=0.1))
    monkeypatch.setattr(meaning_change, "PAIRS_AT_ONCE", 7)
    batched = FeatureHistory(payload).events(rule=EventRule(false_alarm_rate=0.2, min_shift=0.1))
    assert batched == whole and sum(e.kind == "meaning_change" for e in whole) > 7
