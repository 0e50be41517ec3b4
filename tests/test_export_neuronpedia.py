"""The Neuronpedia export: a real Trainer's samples directory, read back by the ``neuronpedia`` package's classes."""

import gzip
import json
import os
import shutil
import subprocess
import sys
import types
import warnings
from datetime import datetime, timezone

import pytest
import torch
from helpers import SyntheticSAE, TokenDataset, loader, make_collector, trainer
from neuronpedia.np_activation import Activation  # the `neuronpedia` package (test extra)
from neuronpedia.np_feature import Feature
from neuronpedia.requests.feature_request import FeatureRequest
from render_support import save_word_tokenizer

from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples.analysis import neuronpedia as npx
from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer

NUM_LATENTS, D_MODEL, LOGITS_K = 10, 4, 25
# Vocabulary pieces as byte-level BPE stores them: Neuronpedia shows "Ġ" as a space, "Ċ" as a newline, ...
WORDS = [
    "[UNK]", "Ġthe", "ĠLord", "Ċ", "ĉtab", "âĢĶ", "âĢľquoteâĢĿ", "<script>alert(1)</script>", "a\u2028b", "x\x85y",
    "**bold**", "|", "ĠĠ", "&amp;", "'\"", "🎉", "said", "Ġunto", "ĠMoses", ",", "Ġand", "Ġpeople", ".", "##ing",
    "\\", "</td>", "Ġ<img src=x onerror=alert(2)>", "`code`", "Ġ", "end",
]
# What Neuronpedia's dashboard runner makes of each piece (SAEDashboard's replacements, written out by hand).
SHOWN = {
    "Ġthe": " the", "ĠLord": " Lord", "Ċ": "\n", "ĉtab": "\ttab", "âĢĶ": "—", "âĢľquoteâĢĿ": "“quote”", "ĠĠ": "  ",
    "Ġunto": " unto", "ĠMoses": " Moses", "Ġand": " and", "Ġpeople": " people", "Ġ": " ",
    "Ġ<img src=x onerror=alert(2)>": " <img src=x onerror=alert(2)>",
}
CREATED = datetime(2026, 1, 2, tzinfo=timezone.utc)


def shown(token_id):
    word = WORDS[token_id]
    return SHOWN.get(word, word)


def logit_matrices(module):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(NUM_LATENTS, D_MODEL, generator=gen), torch.randn(D_MODEL, len(WORDS), generator=gen)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A samples directory written by a real Trainer run: interval groups, logit effects, a real HF tokenizer."""
    root = tmp_path_factory.mktemp("np_run")
    tok = save_word_tokenizer(root / "tok", WORDS)
    cb = ActivationSampleCallback(
        dirpath=root / "samples", tokenizer=str(tok), logit_effects=logit_matrices, collection_freq=1,
        max_samples_per_feature=5, context_size=4, activation_threshold=0.5, top_features_to_save=8,
        samples_per_feature_to_save=4, samples_per_interval=2, logit_effects_k=LOGITS_K, write_report=False,
    )
    trainer(root, [cb], max_epochs=1).fit(SyntheticSAE(vocab=len(WORDS), num_latents=NUM_LATENTS),
                                           loader(TokenDataset(vocab=len(WORDS))))
    return root / "samples", tok


def export(samples, out, **kwargs):
    analyzer = ActivationSampleAnalyzer(samples)
    source = npx.NeuronpediaSource(model_id="tiny-lm", source_set="test-saes", layer=3, creator_name="me",
                                   created_at=CREATED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = npx.export_neuronpedia(analyzer, out, kwargs.pop("source", source), **kwargs)
    return analyzer, result, caught


def read_gz_lines(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).split(b"\n") if line]


def test_layout_records_and_the_neuronpedia_package_classes(run_dir, tmp_path):
    samples, _ = run_dir
    analyzer, result, _ = export(samples, tmp_path / "out", features_per_batch=3)
    source_dir = tmp_path / "out" / "tiny-lm" / "3-test-saes"
    assert result.source_dir == source_dir
    saved = analyzer.saved_features
    batches = -(-len(saved) // 3)
    expected = {f"tiny-lm/3-test-saes/{n}" for n in npx.RECORD_NAMES}
    expected |= {f"tiny-lm/3-test-saes/{k}/batch-{i}.jsonl.gz" for k in ("features", "activations")
                 for i in range(batches)}
    assert set(result.files) == expected
    on_disk = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert on_disk == expected | {npx.EXPORT_MANIFEST_NAME}

    # The release/model/sourceset/source records name one another as Neuronpedia's importer joins them.
    records = {n: json.loads((source_dir / n).read_text()) for n in npx.RECORD_NAMES}
    assert records["model.jsonl"]["id"] == "tiny-lm"
    assert records["sourceset.jsonl"]["name"] == "test-saes" and records["sourceset.jsonl"]["modelId"] == "tiny-lm"
    assert records["sourceset.jsonl"]["releaseName"] == records["release.jsonl"]["name"] == "test-saes"
    assert records["source.jsonl"]["id"] == "3-test-saes" and records["source.jsonl"]["setName"] == "test-saes"
    assert records["release.jsonl"]["createdAt"] == CREATED.isoformat()

    feature_rows = [r for i in range(batches) for r in read_gz_lines(source_dir / "features" / f"batch-{i}.jsonl.gz")]
    assert [int(r["index"]) for r in feature_rows] == saved  # rank order, every saved feature
    assert all(r["layer"] == "3-test-saes" and r["modelId"] == "tiny-lm" for r in feature_rows)

    # The package's own classes take every feature; its upload_batch builds a payload within the route's limits.
    package = [f for batch in npx.package_features(source_dir, batch_size=4) for f in batch]
    assert all(isinstance(f, Feature) for f in package) and [f.index for f in package] == saved
    payloads = []
    request = FeatureRequest(api_key="not-used")
    request.send_request = lambda **kwargs: payloads.append(kwargs["json"])  # the network call only
    for batch in npx.package_features(source_dir):
        request.upload_batch("tiny-lm", "3-test-saes", batch)
    uploaded = [f for p in payloads for f in p["features"]]
    assert len(uploaded) == len(saved) and all(len(p["features"]) <= 128 for p in payloads)
    for feature in uploaded:
        assert len(feature["activations"]) >= 1
        assert len(feature["topLogits"]) <= 20 and len(feature["bottomLogits"]) <= 20
        for act in feature["activations"]:
            assert len(act["tokens"]) == len(act["values"]) <= 1024
            assert act["quantileFraction"] is None or 0 <= act["quantileFraction"] <= 1


def test_values_match_the_samples_directory(run_dir, tmp_path):
    samples, _ = run_dir
    analyzer, result, _ = export(samples, tmp_path / "out")
    features = read_gz_lines(result.source_dir / "features" / "batch-0.jsonl.gz")
    activations = read_gz_lines(result.source_dir / "activations" / "batch-0.jsonl.gz")
    assert result.features == len(features) and result.activations == len(activations)
    assert len({a["id"] for a in activations}) == len(activations)
    for row in features:
        f = analyzer.feature(int(row["index"]))
        assert row["frac_nonzero"] == f.stats.frequency
        assert row["maxActApprox"] == f.stats.all_time_max
        # Logits: the recorded 25 per side, capped at Neuronpedia's 20, as the vocabulary pieces it shows.
        assert len(f.logit_effects.promoted) == LOGITS_K
        assert row["pos_str"] == [shown(t.token_id) for t in f.logit_effects.promoted[:20]]
        assert row["pos_values"] == [t.value for t in f.logit_effects.promoted[:20]]
        assert row["neg_str"] == [shown(t.token_id) for t in f.logit_effects.suppressed[:20]]
        assert row["neg_values"] == [t.value for t in f.logit_effects.suppressed[:20]]
        assert sum(row["freq_hist_data_bar_heights"]) == f.stats.histogram.total == f.stats.activation_count

        rows = [a for a in activations if a["index"] == row["index"]]
        top = [a for a in rows if a["binMin"] == -1]
        intervals = [a for a in rows if a["binMin"] != -1]
        assert len(top) == len(f.samples) >= 1
        for a, s in zip(top, f.samples):
            assert a["tokens"] == [shown(t.token_id) for t in s.context]
            assert a["values"] == [t.activation for t in s.context]
            assert a["values"][a["qualifyingTokenIndex"]] == s.activation_value
            assert a["maxValue"] == max(a["values"]) == a["values"][a["maxValueTokenIndex"]]
            assert a["minValue"] == min(a["values"])
            assert a["binMax"] == f.stats.all_time_max and a["binContains"] == -1
        groups = [g for g in f.interval_groups if g.samples][::-1]  # highest interval first, as SAEDashboard
        assert len(intervals) == sum(len(g.samples) for g in groups) > 0
        it = iter(intervals)
        for g in groups:
            for s in g.samples:
                a = next(it)
                assert a["binMin"] == g.low
                assert a["binMax"] == (f.stats.all_time_max if g.high is None else g.high)
                assert a["binContains"] == g.count / f.stats.tokens_seen
                assert g.low <= a["values"][a["qualifyingTokenIndex"]] == s.activation_value
        # Every interval the latent reached has samples here, so their shares add up to its density.
        shares = {a["binMin"]: a["binContains"] for a in intervals}
        assert sum(shares.values()) == pytest.approx(row["frac_nonzero"], rel=1e-12)
        assert list(shares) == sorted(shares, reverse=True)


def test_odd_tokens_keep_their_text_and_each_record_stays_on_one_line(run_dir, tmp_path):
    samples, _ = run_dir
    _, result, _ = export(samples, tmp_path / "out")
    raw = gzip.decompress((result.source_dir / "activations" / "batch-0.jsonl.gz").read_bytes())
    lines = raw.split(b"\n")
    assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # "\u2028", "\x85" do not split
    tokens = {t for line in lines[:-1] for t in json.loads(line)["tokens"]}
    # Raw text, not escaped (Neuronpedia escapes at display), whitespace stand-ins replaced, nothing else changed.
    assert {"\n", " the", "—", "<script>alert(1)</script>"} <= tokens
    assert not any("Ġ" in t or "Ċ" in t or "âĢ" in t or "&lt;" in t for t in tokens)
    assert tokens <= {shown(i) for i in range(len(WORDS))}
    assert npx.neuronpedia_piece("ĠĠĊ") == "  \n" and npx.neuronpedia_piece(None) == npx.OUT_OF_RANGE_TOKEN


def test_a_training_time_directory_is_warned_a_snapshot_is_not(run_dir, tmp_path):
    samples, _ = run_dir
    _, result, caught = export(samples, tmp_path / "train")
    mixed = [w for w in caught if issubclass(w.category, npx.MixedSAEStatesWarning)]
    assert result.kind == "training" and len(mixed) == 1 and "mix SAE states" in str(mixed[0].message)
    # The lead's snapshots record `source: "validate"` in their summary; such a directory is one SAE state.
    snapshot = tmp_path / "snapshot"
    shutil.copytree(samples, snapshot)
    summary = json.loads((snapshot / "collection_summary.json").read_text())
    (snapshot / "collection_summary.json").write_text(json.dumps({**summary, "source": "validate"}))
    _, result, caught = export(snapshot, tmp_path / "snap")
    assert result.kind == "snapshot" and not [w for w in caught if issubclass(w.category, npx.MixedSAEStatesWarning)]


def test_never_overwrites_what_it_did_not_write_and_removes_only_its_stale_batches(run_dir, tmp_path):
    samples, _ = run_dir
    out = tmp_path / "out"
    foreign = out / "tiny-lm" / "3-test-saes" / "release.jsonl"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine\n")
    with pytest.raises(FileExistsError, match="did not write it"):
        export(samples, out)
    assert foreign.read_text() == "mine\n" and not (out / npx.EXPORT_MANIFEST_NAME).exists()
    foreign.unlink()

    analyzer, first, _ = export(samples, out, features_per_batch=2)
    assert len([f for f in first.files if "/features/" in f]) > 1
    mine = out / "tiny-lm" / "3-test-saes" / "features" / "notes.txt"
    mine.write_text("keep")
    _, second, _ = export(samples, out, features=analyzer.saved_features[:2], features_per_batch=2)  # one batch now
    batch_files = sorted(p.name for p in (out / "tiny-lm" / "3-test-saes" / "features").iterdir())
    assert batch_files == ["batch-0.jsonl.gz", "notes.txt"] and mine.read_text() == "keep"
    manifest = json.loads((out / npx.EXPORT_MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == set(second.files)


def test_a_context_longer_than_1024_tokens_is_clipped_around_its_activating_token(tmp_path):
    collector = make_collector(max_samples_per_feature=2, context_size=1500, samples_per_interval=0,
                               recent_window_steps=None, top_features_to_save=3, samples_per_feature_to_save=2)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (1, 3200), generator=gen)
    latents = torch.zeros(1, 3200, 3)
    latents[0, 1000, 0], latents[0, 2400, 1], latents[0, 100, 2] = 5.0, 4.0, 3.0  # the last one near the start
    collector.update(tokens, latents=latents, step=0)
    collector.save(tmp_path / "samples")
    analyzer, result, caught = export(tmp_path / "samples", tmp_path / "out")
    assert any("display strings" in str(w.message) for w in caught)  # no tokenizer: the recorded strings, warned
    rows = read_gz_lines(result.source_dir / "activations" / "batch-0.jsonl.gz")
    lengths = []
    for row in rows:
        sample = analyzer.feature(int(row["index"])).samples[0]
        lengths.append((len(sample.context), len(row["tokens"])))
        assert len(row["tokens"]) == len(row["values"]) == min(len(sample.context), 1024)
        assert row["values"][row["qualifyingTokenIndex"]] == sample.activation_value
        start = sample.context_position - row["qualifyingTokenIndex"]
        assert row["tokens"] == [t.text for t in sample.context[start:start + 1024]]
        assert row["values"] == [t.activation for t in sample.context[start:start + 1024]]
    assert lengths == [(1501, 1024), (1501, 1024), (851, 851)]
    Activation(modelId="m", source="s", index=0, tokens=rows[0]["tokens"], values=rows[0]["values"])


def test_bad_ids_are_rejected_before_anything_is_written(run_dir, tmp_path):
    with pytest.raises(ValueError, match="model_id"):
        npx.NeuronpediaSource(model_id="../up")
    with pytest.raises(ValueError, match="source_set"):
        npx.NeuronpediaSource(source_set="a/b")
    with pytest.raises(ValueError, match="features_per_batch"):
        export(run_dir[0], tmp_path / "out", features_per_batch=129)
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_the_export(run_dir, tmp_path):
    samples, tok = run_dir
    out = tmp_path / "np"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_sae_samples", "export", str(samples), str(out), "--format", "neuronpedia",
         "--model-id", "tiny-lm", "--layer", "5", "--source-set", "cli-saes", "--creator-name", "Me",
         "--url", "https://example.org/paper", "--tokenizer", str(tok)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    source_dir = out / "tiny-lm" / "5-cli-saes"
    assert f"to {source_dir}" in done.stdout
    assert "warning:" in done.stderr and "training-time" in done.stderr
    release = json.loads((source_dir / "release.jsonl").read_text())
    assert release["creatorName"] == "Me" and release["urls"] == ["https://example.org/paper"]
    rows = read_gz_lines(source_dir / "activations" / "batch-0.jsonl.gz")
    assert rows and {t for r in rows for t in r["tokens"]} <= {shown(i) for i in range(len(WORDS))}

    bad = subprocess.run(
        [sys.executable, "-m", "lightning_sae_samples", "export", str(samples), str(tmp_path / "x"), "--format",
         "neuronpedia", "--model-id", "a/../b"], capture_output=True, text=True, env=env, timeout=120,
    )
    assert bad.returncode == 2 and "model_id" in bad.stderr and "Traceback" not in bad.stderr


def test_a_local_tokenizer_folder_names_no_model_so_the_model_id_is_asked_for(run_dir, tmp_path):
    samples, tok = run_dir
    with pytest.raises(ValueError, match=r"Pass --model-id .*recorded the tokenizer '.*tok', which names no model"):
        ActivationSampleAnalyzer(samples).export(tmp_path / "out", "neuronpedia")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "lightning_sae_samples", "export", str(samples), str(tmp_path / "o"),
                           "--format", "neuronpedia"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "error: Pass --model-id" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o" / "model").exists()


@pytest.mark.parametrize(("recorded", "model_id"), [("google/gemma-2-2b", "gemma-2-2b"), ("gpt2", "gpt2")])
def test_a_hub_tokenizer_name_gives_the_default_model_id(recorded, model_id):
    summary = types.SimpleNamespace(config={"tokenizer": recorded})
    assert npx.default_model_id(summary) == model_id


def test_a_model_id_of_another_model_than_the_recorded_tokenizer_warns(run_dir, tmp_path):
    samples, tok = run_dir  # recorded tokenizer: a local folder named "tok"
    analyzer = ActivationSampleAnalyzer(samples)
    with pytest.warns(npx.ModelIdMismatchWarning, match=r"'gpt2-small' does not look like the model of the run's"):
        npx.export_neuronpedia(analyzer, tmp_path / "out", npx.NeuronpediaSource(model_id="gpt2-small"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        npx.export_neuronpedia(analyzer, tmp_path / "out2", npx.NeuronpediaSource(model_id="tok-lm"))
    assert not [w for w in caught if issubclass(w.category, npx.ModelIdMismatchWarning)]


def test_a_link_in_the_output_folder_is_refused(run_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out" / "tiny-lm").mkdir(parents=True)
    (tmp_path / "out" / "tiny-lm" / "3-test-saes").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(FileExistsError, match="not a folder"):
        export(run_dir[0], tmp_path / "out")
    assert list(elsewhere.iterdir()) == []


def test_vocabulary_pieces_of_a_real_tokenizer_and_ids_it_does_not_hold(run_dir):
    from transformers import AutoTokenizer

    pieces = npx.TokenPieces(AutoTokenizer.from_pretrained(str(run_dir[1])))
    pieces.prepare([1, 3, 5, len(WORDS) + 500])
    assert [pieces.piece(i, "unused") for i in (1, 3, 5)] == [" the", "\n", "—"]
    assert pieces.piece(len(WORDS) + 500, "unused") == npx.OUT_OF_RANGE_TOKEN and not pieces.used_fallback
