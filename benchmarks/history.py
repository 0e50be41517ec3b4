"""Size and save time of the history (``training_history.pt``) at 131,072 and 1,048,576 latents.

Run from the repository root::

    python benchmarks/history.py                                  # F = 131072 and 1048576
    python benchmarks/history.py --num-latents 131072 --collections 8

For each latent count, a real collector folds ``--collections`` sparse collections (k = 32, 2048 tokens each,
latents drawn with a Zipf-like skew so that some fire often and most rarely) into one history window; then:

- one window's bytes in the file (``torch.save`` of a one-window history), its rows (latents that fired);
- the windows 1,000 saves keep under the thinning rule (``history_windows_per_level`` = 4), and the history's
  bytes for 1,000 saves: measured (that many windows like this one) and the bound (every latent in every
  window);
- the size of one ``full_state.pt`` once the tops are full (``estimate_state_bytes``: 100 samples per latent,
  context 20, the defaults), which the history of 1,000 saves must stay below;
- the time a save spends on the history: building the window, reading the previous history, appending and
  thinning, writing the file, with a previous history of 0 and of the 1,000-save window count;
- the ``serve`` timeline answer of one feature (``/api/history/features/N``) on that history: the first one
  (which finds every latent's events once) and a later one.

Nothing here asserts a time or a size; the budget is printed next to the measurements.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_sae_samples.analysis.history import FeatureHistory  # noqa: E402
from lightning_sae_samples.config import CollectionConfig  # noqa: E402
from lightning_sae_samples.engine.memory import estimate_state_bytes  # noqa: E402
from lightning_sae_samples.engine.sample_collector import SampleCollector  # noqa: E402
from lightning_sae_samples.samples_dir.history_file import history_payload  # noqa: E402
from lightning_sae_samples.samples_dir.names import HISTORY_NAME  # noqa: E402
from lightning_sae_samples.samples_dir.writer import _write_history  # noqa: E402
from lightning_sae_samples.serve.history_api import timeline  # noqa: E402
from lightning_sae_samples.state.history import window_of_state  # noqa: E402
from lightning_sae_samples.tokens import TokenDecoder  # noqa: E402

SAVES = 1000
PER_LEVEL = 4
#: The defaults' context_size=20: 10 tokens each side of the activating one.
HALF_WINDOW = 10
CONTEXT_WINDOW = 2 * HALF_WINDOW + 1


def levels_kept(saves: int, per_level: int) -> list[int]:
    """The levels of the windows the thinning rule keeps after ``saves`` saves, oldest first (no data)."""
    levels: list[int] = []
    for _ in range(saves):
        levels.append(0)
        level = 0
        while level <= max(levels):
            at = [i for i, lv in enumerate(levels) if lv == level]
            if len(at) > per_level:
                levels[at[0]: at[1] + 1] = [level + 1]
                continue
            level += 1
    return levels


def collected_state(num_latents: int, collections: int, seed: int = 0) -> dict:
    config = CollectionConfig(num_latents=num_latents, samples_per_interval=0)
    collector = SampleCollector(config)
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, num_latents + 1, dtype=torch.float64) ** 0.7
    for step in range(collections):
        tokens = torch.randint(0, 30_000, (16, 128), generator=gen)
        base = torch.multinomial(weights, 16 * 128, replacement=True, generator=gen)
        picks = (base.unsqueeze(1) + torch.arange(32) * 4099) % num_latents  # 32 distinct latents per token
        values = torch.rand(16 * 128, 32, generator=gen) * 5
        collector.update_sparse(tokens, picks.view(16, 128, 32), values.view(16, 128, 32), step)
    return collector.state_dict()


def file_bytes(payload: dict) -> int:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-latents", type=int, nargs="+", default=[131072, 1048576])
    parser.add_argument("--collections", type=int, default=4)
    args = parser.parse_args()
    levels = levels_kept(SAVES - 1, PER_LEVEL)
    kept = len(levels_kept(SAVES, PER_LEVEL))
    settings = {"top_tokens": 5, "per_level": PER_LEVEL, "samples_per_feature": 3, "dead_window_steps": 10_000}
    print(f"windows kept after {SAVES} saves with history_windows_per_level={PER_LEVEL}: {kept}")
    print("| latents | rows/window | bytes/window | bytes/row | 1,000 saves (measured) | 1,000 saves (bound) |"
          f" one full_state.pt | save: build+append+write (0 / {len(levels)} prior windows) |"
          " serve timeline (cold / warm) |")
    print("|---|---|---|---|---|---|---|---|---|")
    prior_count = len(levels)
    for num_latents in args.num_latents:
        state = collected_state(num_latents, args.collections)
        saved = list(range(100))
        window = window_of_state(state, 100, settings["top_tokens"], saved, settings["samples_per_feature"])
        rows = len(window["latent"])
        payload = history_payload([window], num_latents=num_latents, top_tokens=5, context_window=CONTEXT_WINDOW,
                                  dead_window_steps=10_000, vocab={})
        one = file_bytes(payload)
        empty = file_bytes(history_payload([], num_latents=num_latents, top_tokens=5, context_window=CONTEXT_WINDOW,
                                           dead_window_steps=10_000, vocab={}))
        per_row = (one - empty - 3 * len(saved) * CONTEXT_WINDOW * 8) / max(rows, 1)
        measured = kept * (one - empty) + empty
        bound = kept * num_latents * per_row
        full = estimate_state_bytes(CollectionConfig(num_latents=num_latents), latent_dtype=torch.bfloat16,
                                    vocab_size=30_000)["total"]
        times = []
        for prior in (0, prior_count):
            with tempfile.TemporaryDirectory() as tmp:
                root = Path(tmp)
                pending = root / "pending"
                pending.mkdir()
                if prior:
                    # The windows 999 saves leave, with their levels; each as wide as this one (rows).
                    previous = [dict(window, start=100 * i, end=100 * (i + 1), level=lv) for i, lv in enumerate(levels)]
                    torch.save(history_payload(previous, num_latents=num_latents, top_tokens=5,
                                               context_window=CONTEXT_WINDOW, dead_window_steps=10_000, vocab={}),
                               root / HISTORY_NAME)
                state["window_start"] = 100 * prior
                start = time.perf_counter()
                built = window_of_state(state, 100 * (prior + 1), settings["top_tokens"], saved,
                                        settings["samples_per_feature"])
                _write_history(root, pending, built, num_latents, HALF_WINDOW, settings, TokenDecoder(None))
                times.append(time.perf_counter() - start)
                if prior:
                    # The serve timeline answer of one feature, on the history this save wrote (cold: first events).
                    history = FeatureHistory.from_file(pending / HISTORY_NAME)
                    start = time.perf_counter()
                    timeline(history, 0)
                    cold = time.perf_counter() - start
                    start = time.perf_counter()
                    timeline(history, 1)
                    warm = time.perf_counter() - start
        print(f"| {num_latents:,} | {rows:,} | {one - empty:,} | {per_row:.0f} | {measured / 1e6:,.0f} MB |"
              f" {bound / 1e9:,.2f} GB | {full / 1e9:,.1f} GB | {times[0]:.2f} s / {times[1]:.2f} s |"
              f" {cold * 1e3:.0f} ms / {warm * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
