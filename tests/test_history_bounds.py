"""Hostile `training_history.pt` files, crafted one case at a time: each is one line naming the file and the field.

Issue 33 (item 5): window counts thinning cannot produce, rows out of order within a window, steps whose sums
overflow int64, infinite values, and samples without their activating token were accepted (or took minutes and
gigabytes to load, or raised an ``IndexError`` later).
"""

import time

import pytest
import torch

from lightning_sae_samples import CollectionConfig
from lightning_sae_samples.analysis.history import FeatureHistory, story_line
from lightning_sae_samples.config import MAX_HISTORY_WINDOWS_PER_LEVEL
from lightning_sae_samples.samples_dir.history_file import history_payload
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError

WIDTH = 3  # context window of the samples: the activating token at index 1


def window(start, end, latents, level=0, samples=()):
    """A window where each of ``latents`` fired 6 times; ``samples``: ``(latent, value, context tokens)``."""
    n = len(latents)
    ids = torch.tensor([[1, 2, -1]] * n, dtype=torch.int32).view(n, 3)
    return {
        "start": start, "end": end, "level": level, "saves": 2**level, "tokens_seen": 100,
        "latent": torch.tensor(latents, dtype=torch.int32), "count": torch.full((n,), 6, dtype=torch.int64),
        "sum": torch.full((n,), 6.0, dtype=torch.float64), "max": torch.full((n,), 2.0),
        "token_ids": ids, "token_counts": (ids >= 0).long(),
        "samples": {
            "latent": torch.tensor([s[0] for s in samples], dtype=torch.int32),
            "values": torch.tensor([s[1] for s in samples], dtype=torch.float32),
            "step": torch.tensor([end - 1] * len(samples), dtype=torch.int64),
            "order": torch.arange(len(samples), dtype=torch.int64),
            "context_tokens": torch.tensor([s[2] for s in samples], dtype=torch.int32).view(-1, WIDTH),
            "context_acts": torch.ones(len(samples), WIDTH),
        },
    }


def sound_windows():
    return [window(0, 10, [0, 2], samples=[(0, 2.0, [1, 2, 3])]), window(10, 20, [1, 2]),
            window(20, 30, [0], samples=[(0, 1.5, [-1, 4, 5])])]


def save(tmp_path, windows, dead_window_steps=15):
    path = tmp_path / "training_history.pt"
    torch.save(history_payload(windows, num_latents=4, top_tokens=3, context_window=WIDTH,
                               dead_window_steps=dead_window_steps, vocab={i: f"t{i}" for i in range(6)}), path)
    return path


def read_everything(path):
    history = FeatureHistory.from_file(path)
    history.events(), history.rows(), history.run_series()
    for latent in range(history.num_latents):
        story_line(history, latent)
        for stats in history.feature(latent):
            [sample.text for sample in stats.samples]
    return history


def refused(path, field):
    with pytest.raises(SamplesDirectoryError) as err:
        read_everything(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"`{field}`" in message, message
    return message


def test_a_sound_crafted_history_reads_back(tmp_path):
    history = read_everything(save(tmp_path, sound_windows()))
    assert [(e.kind, e.latent, e.step) for e in history.events()] == [("birth", 0, 0), ("birth", 2, 0),
                                                                       ("birth", 1, 10)]
    assert history.feature(0)[1].samples[0].text == "t4"


def test_more_windows_than_thinning_keeps_are_refused_before_anything_is_built(tmp_path):
    """A 200,000-window file took 91 s and 1.8 GB to load; it is refused from the window table's length."""
    count = 200_000
    steps = torch.arange(count, dtype=torch.int64)
    payload = history_payload([], num_latents=4, top_tokens=3, context_window=WIDTH, dead_window_steps=15, vocab={})
    zeros = torch.zeros(count, dtype=torch.int64)
    payload["windows"] = {"start": steps, "end": steps + 1, "level": zeros, "saves": zeros + 1,
                          "tokens_seen": zeros + 1, "rows": zeros, "sample_rows": zeros}
    path = tmp_path / "training_history.pt"
    torch.save(payload, path)
    began = time.perf_counter()
    message = refused(path, "windows")
    assert time.perf_counter() - began < 5 and "200000 windows" in message


def test_more_windows_on_one_level_than_thinning_keeps_are_refused(tmp_path):
    crowded = MAX_HISTORY_WINDOWS_PER_LEVEL + 1
    windows = [window(10 * i, 10 * i + 10, [i % 4]) for i in range(crowded)]
    assert "puts 257 windows on one level" in refused(save(tmp_path, windows), "windows.level")
    with pytest.raises(ValueError, match="`history_windows_per_level` must be at most 256"):
        CollectionConfig(history_windows_per_level=crowded)
    read_everything(save(tmp_path, windows[:-1]))  # as many as thinning keeps on a level: read


@pytest.mark.parametrize("latents", [[2, 0], [1, 1]], ids=["unsorted", "duplicated"])
def test_rows_out_of_order_within_a_window_are_refused(tmp_path, latents):
    windows = sound_windows()
    windows[1] = window(10, 20, latents)
    refused(save(tmp_path, windows), "rows.latent")


def test_steps_whose_sums_overflow_int64_are_refused(tmp_path):
    """Window ends near 2**62 plus a `dead_window_steps` near 2**62 wrapped around: a 5-step run reported deaths."""
    top = 2**62
    windows = [window(top - 5 + i, top - 4 + i, [0, 1, 2, 3] if i == 0 else [0]) for i in range(5)]
    message = refused(save(tmp_path, windows, dead_window_steps=top), "dead_window_steps")
    assert "int64" in message
    history = read_everything(save(tmp_path, windows, dead_window_steps=2**61))  # far, but no overflow: no deaths
    assert [e.kind for e in history.events()].count("death") == 0


@pytest.mark.parametrize("field, group", [("max", None), ("sum", None), ("values", "samples")])
@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_infinite_values_are_refused(tmp_path, field, group, value):
    windows = sound_windows()
    target = windows[0] if group is None else windows[0][group]
    target[field] = target[field].clone()
    target[field][0] = value
    refused(save(tmp_path, windows), f"{'rows' if group is None else group}.{field}")


def test_a_sample_without_its_activating_token_is_refused(tmp_path):
    """Its tokens all -1: `HistorySample.text` raised IndexError."""
    windows = sound_windows()
    windows[2] = window(20, 30, [0], samples=[(0, 1.5, [-1, -1, -1])])
    refused(save(tmp_path, windows), "samples.context_tokens")
