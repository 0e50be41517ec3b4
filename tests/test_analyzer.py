import shutil

import pytest
import torch
from helpers import SyntheticSAE, loader, trainer
from render_support import FakeTokenizer, write_fixture_dir

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer, UnknownFeatureError
from lightning_sae_samples.analysis.records import FeatureSamples, FeatureStats
from lightning_sae_samples.callback import ActivationSampleCallback
from lightning_sae_samples.samples_dir.names import SamplesDirectoryError
from lightning_sae_samples.state.tables import padded_state

VOCAB = [f"w{i}" for i in range(30)]
F, SAVED, PER_FILE, K = 10, 3, 2, 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A samples directory written by a real Trainer run with the callback."""
    root = tmp_path_factory.mktemp("run")
    cb = ActivationSampleCallback(
        collection_freq=1, max_samples_per_feature=K, context_size=4, activation_threshold=0.5,
        top_features_to_save=SAVED, samples_per_feature_to_save=PER_FILE, dirpath=root / "samples",
        tokenizer=FakeTokenizer(VOCAB), write_report=False,
    )
    trainer(root, [cb], max_epochs=1).fit(SyntheticSAE(num_latents=F), loader())
    return root / "samples"


def test_analyzer_reads_a_trainer_run(run_dir):
    analyzer = ActivationSampleAnalyzer(run_dir)
    state = padded_state(torch.load(run_dir / "full_state.pt", weights_only=True))
    summary = analyzer.summary
    assert summary.num_features_tracked == F and summary.has_full_state
    assert summary.tokens_seen == int(state["tokens_seen"]) and summary.steps_collected == 6
    assert summary.alive_features + summary.never_fired_features == F
    assert len(analyzer.saved_features) == SAVED

    # features(): every latent that fired (full state), ranked by each key.
    alive = int((state["count"] > 0).sum())
    for rank_by, key in [("max_activation", "max_activation"), ("activation_count", "activation_count"),
                         ("frequency", "frequency")]:
        stats = analyzer.features(rank_by=rank_by)
        assert len(stats) == alive and all(isinstance(s, FeatureStats) for s in stats)
        values = [getattr(s, key) for s in stats]
        assert values == sorted(values, reverse=True)
    assert [s.feature_idx for s in analyzer.features(limit=SAVED)] == analyzer.saved_features
    for s in analyzer.features():
        assert s.activation_count == int(state["count"][s.feature_idx])

    # feature(): a saved feature, extended past its file from the full state.
    top = analyzer.feature(analyzer.saved_features[0], num_examples=K)
    assert isinstance(top, FeatureSamples) and top.saved and len(top.samples) == K
    values = [s.activation_value for s in top.samples]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(top.stats.max_activation)
    assert values == pytest.approx(state["top_values"][top.feature_idx].tolist())
    for sample in top.samples:
        assert sample.activating_token.activation == pytest.approx(sample.activation_value)
        assert sample.activating_token.text == VOCAB[sample.activating_token.token_id]

    # A latent only the full state holds is reachable, with token strings known from the saved files or ids.
    unsaved = next(s.feature_idx for s in analyzer.features() if s.feature_idx not in analyzer.saved_features)
    other = analyzer.feature(unsaved)
    assert not other.saved and len(other.samples) == min(K, other.stats.activation_count)
    saved = [analyzer.feature(i) for i in analyzer.saved_features]
    saved_samples = [s for f in saved for group in (f.samples, f.recent_samples, *(g.samples for g in
                     f.interval_groups)) for s in group]  # every sample in the files lends its strings
    known = {t.token_id: t.text for s in saved_samples for t in s.context}
    for token in (t for s in other.samples for t in s.context):
        assert token.text == known.get(token.token_id, f"[{token.token_id}]")
    # ... and decoded when a tokenizer is given.
    decoded = ActivationSampleAnalyzer(run_dir, tokenizer=FakeTokenizer(VOCAB)).feature(unsaved)
    assert all(t.text == VOCAB[t.token_id] for s in decoded.samples for t in s.context)

    # A latent that never fired: statistics, no samples.
    dead = analyzer.feature(0)
    assert dead.stats.activation_count == 0 and dead.samples == () and dead.stats.first_step is None


def test_unknown_feature_errors_name_range_and_nearby(run_dir, tmp_path):
    analyzer = ActivationSampleAnalyzer(run_dir)
    with pytest.raises(UnknownFeatureError, match=rf"valid indices are 0 to {F - 1}") as err:
        analyzer.feature(F)
    assert isinstance(err.value, KeyError)
    assert all(str(i) in str(err.value) for i in analyzer.saved_features)
    with pytest.raises(UnknownFeatureError):
        analyzer.feature(-1)
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    (copy / "full_state.pt").unlink()
    partial = ActivationSampleAnalyzer(copy)
    assert [s.feature_idx for s in partial.features()] == partial.saved_features
    unsaved = next(i for i in range(2, F) if i not in partial.saved_features)
    with pytest.raises(UnknownFeatureError, match="no full_state.pt") as err:
        partial.feature(unsaved)
    assert "Saved features near" in str(err.value)


def test_missing_empty_and_corrupt_directories_raise_one_clear_error(tmp_path):
    with pytest.raises(SamplesDirectoryError, match="does not exist"):
        ActivationSampleAnalyzer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamplesDirectoryError, match="collection_summary.json is missing"):
        ActivationSampleAnalyzer(tmp_path / "empty")

    good = write_fixture_dir(tmp_path / "good")
    analyzer = ActivationSampleAnalyzer(good)
    victim = f"feature_{analyzer.saved_features[1]:05d}_samples.json"

    bad = shutil.copytree(good, tmp_path / "bad_json")
    (bad / victim).write_text("{not json")
    with pytest.raises(SamplesDirectoryError, match=victim):
        ActivationSampleAnalyzer(bad)

    wrong = shutil.copytree(good, tmp_path / "bad_shape")
    (wrong / victim).write_text('{"statistics": {}, "top_samples": []}')
    with pytest.raises(SamplesDirectoryError, match=victim):
        ActivationSampleAnalyzer(wrong)

    state = shutil.copytree(good, tmp_path / "bad_state")
    (state / "full_state.pt").write_bytes(b"garbage")
    lazy = ActivationSampleAnalyzer(state)  # saved features need no full state
    assert lazy.feature(lazy.saved_features[0]).samples
    with pytest.raises(SamplesDirectoryError, match="full_state.pt"):
        lazy.feature(15)


def test_rank_by_is_validated(tmp_path):
    analyzer = ActivationSampleAnalyzer(write_fixture_dir(tmp_path / "s"))
    with pytest.raises(ValueError, match="max_activation, activation_count, frequency"):
        analyzer.features(rank_by="loudness")


# ---------------------------------------------------------------- decoding latents only full_state.pt holds
def _unsaved_feature(analyzer):
    return next(s.feature_idx for s in analyzer.features() if s.feature_idx not in analyzer.saved_features)


def test_unsaved_features_decode_with_the_tokenizer_the_run_recorded(tmp_path):
    from render_support import save_word_tokenizer

    words = [f"tok{i}" for i in range(30)]
    folder = save_word_tokenizer(tmp_path / "tokenizer", words)
    samples = write_fixture_dir(tmp_path / "samples", tokenizer=None, top_features=2, recorded_tokenizer=str(folder))
    analyzer = ActivationSampleAnalyzer(samples)
    feature = analyzer.feature(_unsaved_feature(analyzer))
    assert not feature.saved and feature.samples
    for sample in feature.samples:
        assert [t.text for t in sample.context] == [words[t.token_id] for t in sample.context]
    assert analyzer.decoding_note is None


def test_undecoded_ids_are_bracketed_spaced_and_the_note_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples = write_fixture_dir(tmp_path / "samples", tokenizer=None, top_features=2,
                                recorded_tokenizer="no-such-org/no-such-tokenizer")
    analyzer = ActivationSampleAnalyzer(samples)
    assert analyzer.decoding_note is None  # nothing shown yet
    feature = analyzer.feature(_unsaved_feature(analyzer))
    sample = feature.samples[0]
    assert [t.text for t in sample.context] == [f"[{t.token_id}]" for t in sample.context]
    assert sample.context_text == " ".join(f"[{t.token_id}]" for t in sample.context)
    note = analyzer.decoding_note
    assert note is not None and "no-such-org/no-such-tokenizer" in note and "--tokenizer" in note

    from io import StringIO

    from rich.console import Console

    console = Console(file=StringIO(), width=200, color_system=None)
    analyzer.print_feature_report(feature.feature_idx, 3, console=console)
    shown = console.file.getvalue()
    ids = [t.token_id for t in sample.context]
    assert " ".join(f"[{i}]" for i in ids[: sample.context_position]) in shown  # spaced, never glued
