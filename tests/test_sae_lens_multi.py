"""SAELens' MultiSAETrainer on two hooks: rows with token refs through one permutation, exact per SAE, exact resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import read_dir
from oracle import RowsSeen, assert_dir_matches_oracle

from lightning_sae_samples import MultiSAECollector
from lightning_sae_samples.samples_dir.names import RUN_INDEX_NAME
from lightning_sae_samples.token_sources import ArrayTokenSource

pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[sae-lens]')")
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402

from lightning_sae_samples.integrations.sae_lens_multi import (  # noqa: E402
    STATE_NAME,
    MultiHookRows,
    SamplesMultiSAETrainer,
    mixed_multi_hook_rows,
)

S, T = 48, 12
HOOKS = {"blocks.1.hook_resid_pre": 8, "blocks.2.hook_resid_pre": 6}  # hook -> d_in
D_SAE = {"blocks.1.hook_resid_pre": 16, "blocks.2.hook_resid_pre": 12}
STEPS, BATCH = 24, 16


def synthetic(seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 40, (S, T), generator=gen)
    return tokens, {hook: torch.randn(S, T, d, generator=gen) for hook, d in HOOKS.items()}


def lm_batches(tokens, acts, per_batch=4):
    while True:
        for i in range(0, S, per_batch):
            refs = torch.arange(i * T, (i + per_batch) * T).view(per_batch, T)
            yield {hook: a[i:i + per_batch] for hook, a in acts.items()}, tokens[i:i + per_batch], refs


class Replay:
    """Batches (side by side) and their refs, replayed from a list: the same rows for a run and its resume."""

    def __init__(self, batches, source):
        self.items, self.token_source, self._last = iter(batches), source, None

    def __next__(self):
        self._last = next(self.items)
        return self._last[0]

    def refs_of(self, batch):
        return self._last[1] if self._last is not None and batch is self._last[0] else None


class RecordingCollector(MultiSAECollector):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed = []

    def update(self, tokens=None, *, token_refs=None, latents=None, step, **kwargs):
        self.fed.append((step, token_refs.clone(), {n: v.clone() for n, v in latents.items()}))
        super().update(tokens, token_refs=token_refs, latents=latents, step=step, **kwargs)


def make_trainer(tmp_path, provider, source, seed=0):
    torch.manual_seed(seed)
    saes = {hook: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=D_SAE[hook], k=3)) for hook, d in HOOKS.items()}
    cfg = SAETrainerConfig(total_training_samples=STEPS * BATCH, train_batch_size_samples=BATCH, lr=3e-3,
                           lr_end=3e-3, n_checkpoints=1, checkpoint_path=str(tmp_path / "checkpoints"))
    collector = RecordingCollector({hook: {"num_latents": f} for hook, f in D_SAE.items()}, token_source=source,
                                   context_size=4, activation_threshold=0.0, max_samples_per_feature=5,
                                   samples_per_feature_to_save=5, write_report=False)
    return SamplesMultiSAETrainer(cfg, saes, {hook: hook for hook in HOOKS}, provider, collector=collector,
                                  collection_freq={0: 3, 12: 1}, samples_dir=tmp_path / "samples")


def test_multi_sae_trainer_collects_each_sae_exactly_and_resumes_exactly(tmp_path):
    tokens, acts = synthetic()
    source = ArrayTokenSource(tokens)
    stream = mixed_multi_hook_rows(lm_batches(tokens, acts), buffer_size=96, batch_size=BATCH, token_source=source)
    recorded = []
    for batch in itertools.islice(stream, STEPS):
        refs = stream.refs_of(batch)
        for hook, rows in batch.items():  # one permutation: every hook's row i is the activation of ref i
            assert torch.equal(rows, acts[hook].reshape(-1, HOOKS[hook])[refs])
        recorded.append((torch.cat(list(batch.values()), dim=1), refs))

    def provider(start=0):
        return MultiHookRows(Replay(recorded[start:], source), HOOKS)

    full = make_trainer(tmp_path / "full", provider(), source)
    full.fit()
    fed = full.collector.fed
    assert [step for step, _, _ in fed] == [0, 3, 6, 9, *range(12, STEPS)]
    for hook in HOOKS:
        seen = []
        for i, (step, refs, latents) in enumerate(fed):
            dense = latents[hook]
            seen.append(RowsSeen(step, 0, refs.tolist(), dense, source=tokens, call=i))
        assert_dir_matches_oracle(read_dir(tmp_path / "full" / "samples" / hook), seen, D_SAE[hook], 5, 4, 0.0)
    assert (tmp_path / "full" / "samples" / RUN_INDEX_NAME).is_file()

    (checkpoint,) = (tmp_path / "full" / "checkpoints").iterdir()
    assert {STATE_NAME, *HOOKS} <= {p.name for p in checkpoint.iterdir()}
    taken = torch.load(checkpoint / STATE_NAME, weights_only=True)["steps_taken"]
    assert 0 < taken < STEPS
    resumed = make_trainer(tmp_path / "resumed", provider(taken), source, seed=1)
    resumed.load_checkpoint(checkpoint)
    assert resumed.steps_taken == taken
    resumed.fit()
    for hook in HOOKS:
        want = read_dir(tmp_path / "full" / "samples" / hook)["full_state.pt"]
        assert_identical(want, read_dir(tmp_path / "resumed" / "samples" / hook)["full_state.pt"], hook)


def assert_identical(a, b, where):
    """Two states are identical, NaN where the other has NaN (a row's neighbours' activations are unknown)."""
    assert a.keys() == b.keys(), where
    for key, value in a.items():
        if isinstance(value, dict):
            assert_identical(value, b[key], f"{where}.{key}")
        elif torch.is_tensor(value):
            assert value.dtype == b[key].dtype and value.shape == b[key].shape, f"{where}.{key}"
            assert torch.equal(value.nan_to_num(7.5), b[key].nan_to_num(7.5)), f"{where}.{key}"
        else:
            assert value == b[key], f"{where}.{key}"
