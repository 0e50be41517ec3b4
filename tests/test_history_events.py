"""Events read from a history: birth, death, revival and meaning change; the reader's rows and run series."""

import pytest
import torch

from lightning_sae_samples.analysis.history import FeatureHistory
from lightning_sae_samples.samples_dir.history_file import history_payload
from lightning_sae_samples.state.history import HISTORY_SAMPLE_FIELDS


def window(start, end, rows):
    """A window of ``rows``: latent -> (count, list of top token ids)."""
    latents = sorted(rows)
    ids = torch.full((len(latents), 3), -1, dtype=torch.int32)
    for r, latent in enumerate(latents):
        tokens = rows[latent][1]
        ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
    return {
        "start": start, "end": end, "level": 0, "saves": 1, "tokens_seen": 100,
        "latent": torch.tensor(latents, dtype=torch.int32),
        "count": torch.tensor([rows[f][0] for f in latents], dtype=torch.int64),
        "sum": torch.tensor([rows[f][0] * 2.0 for f in latents], dtype=torch.float64),
        "max": torch.tensor([3.0] * len(latents)), "token_ids": ids, "token_counts": (ids >= 0).long() * 2,
        "samples": {name: torch.empty((0, 3) if name.startswith("context_") else (0,), dtype=dtype)
                    for name, dtype in HISTORY_SAMPLE_FIELDS.items()},
    }


@pytest.fixture
def history():
    windows = [
        window(0, 100, {0: (5, [1, 2, 3]), 1: (4, [4, 5])}),
        window(100, 200, {0: (6, [1, 2, 3]), 1: (2, [4, 5]), 2: (1, [9])}),
        window(200, 300, {0: (6, [7, 8, 6]), 2: (1, [9])}),  # latent 0 changes meaning; latent 1 goes silent
        window(300, 400, {0: (6, [7, 8]), 2: (3, [9])}),
        window(400, 500, {0: (6, [7, 8]), 1: (3, [5, 4]), 2: (3, [9])}),  # latent 1 comes back
    ]
    vocab = {i: f"t{i}" for i in range(10)}
    payload = history_payload(windows, num_latents=4, top_tokens=3, context_window=3, dead_window_steps=150,
                              vocab=vocab)
    return FeatureHistory(payload)


def test_birth_death_revival_and_meaning_change_per_latent(history):
    assert [(e.kind, e.step) for e in history.events(0)] == [("birth", 0), ("meaning_change", 200)]
    change = history.events(0)[1]
    assert change.before == ("t1", "t2", "t3") and change.after == ("t7", "t8", "t6") and change.overlap == 0.0
    # Last fired in the window ending at 200: dead by the first window ending 150 steps later (400), back at 400.
    assert [(e.kind, e.step) for e in history.events(1)] == [("birth", 0), ("death", 400), ("revival", 400)]
    assert [(e.kind, e.step) for e in history.events(2)] == [("birth", 100)]
    assert history.events(3) == []


def test_one_latents_events_alone_equal_its_share_of_the_run_events():
    gen = torch.Generator().manual_seed(3)
    windows = []
    for w in range(12):
        fired = (torch.rand(8, generator=gen) < 0.5).nonzero().flatten().tolist()
        rows = {f: (1 + f, torch.randint(0, 6, (3,), generator=gen).unique().tolist()) for f in fired}
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
    assert [w["alive"] for w in series] == [2, 3, 2, 2, 3]
    assert [w["births"] for w in series] == [2, 1, 0, 0, 0] and [w["deaths"] for w in series] == [0, 0, 0, 1, 0]


def test_a_stricter_threshold_finds_more_meaning_changes(history):
    # Latent 1's tokens {4, 5} are the same set in another order: never a change; latent 0's {7, 8, 6} -> {7, 8}.
    assert [e.step for e in history.events(0, change_overlap=0.7) if e.kind == "meaning_change"] == [200, 300]


def test_rows_are_the_export_rows(history):
    rows = history.rows()
    assert rows[0] == {"step": 100, "window_start": 0, "latent": 0, "count": 5, "max": 3.0, "mean": 2.0,
                       "frequency": 0.05, "top_token_ids": [1, 2, 3], "top_tokens": ["t1", "t2", "t3"],
                       "top_token_counts": [2, 2, 2]}
    assert len(rows) == 12
