import json
import math
import os

import pandas as pd
import pytest
import torch
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir

from lightning_sae_samples.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.cli import main
from lightning_sae_samples.export import FEATURE_COLUMNS, SAMPLE_COLUMNS


def export_vocab():
    # The render tests' hostile tokens plus line separators that naive line splitters break on.
    vocab = hostile_vocab()
    vocab[20:24] = ["\u2028", "x\x85y", "\u2029", "🎉\r\n"]
    return vocab


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    tok = FakeTokenizer(export_vocab())
    analyzer = ActivationSampleAnalyzer(write_fixture_dir(tmp_path_factory.mktemp("export") / "s", tokenizer=tok))
    gen = torch.Generator().manual_seed(0)
    analyzer.logit_effects(torch.randn(16, 4, generator=gen), torch.randn(4, 30, generator=gen), k=3, tokenizer=tok)
    return analyzer


def expected_samples(analyzer):
    rows = []
    for idx in analyzer.saved_features:
        for n, s in enumerate(analyzer.feature(idx).samples):
            rows.append({
                "feature_idx": idx, "sample_rank": n, "activation_value": s.activation_value, "step": s.step,
                "position": s.position, "token_id": s.activating_token.token_id, "token": s.activating_token.text,
                "context_position": s.context_position, "context_text": s.context_text,
                "context_token_ids": [t.token_id for t in s.context], "context_tokens": [t.text for t in s.context],
                "context_activations": [t.activation for t in s.context],
            })
    return rows


def expected_features(analyzer):
    rows = []
    for rank, idx in enumerate(analyzer.saved_features, start=1):
        f = analyzer.feature(idx)
        s, e = f.stats, f.logit_effects
        rows.append({
            "feature_idx": idx, "rank": rank, "saved": True, "num_samples": s.num_samples,
            "max_activation": s.max_activation, "mean_activation": s.mean_activation,
            "std_activation": s.std_activation, "min_activation": s.min_activation,
            "activation_count": s.activation_count, "all_time_max": s.all_time_max, "tokens_seen": s.tokens_seen,
            "frequency": s.frequency, "first_step": s.first_step, "last_step": s.last_step,
            "histogram_bin_edges": list(s.histogram.bin_edges), "histogram_counts": list(s.histogram.counts),
            "promoted_token_ids": [t.token_id for t in e.promoted], "promoted_tokens": [t.token for t in e.promoted],
            "promoted_values": [t.value for t in e.promoted],
            "suppressed_token_ids": [t.token_id for t in e.suppressed],
            "suppressed_tokens": [t.token for t in e.suppressed], "suppressed_values": [t.value for t in e.suppressed],
        })
    return rows


def plain(value):
    """A DataFrame cell as plain Python (numpy arrays and scalars to lists and numbers)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def frame_records(frame):
    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def test_to_dataframe_has_one_row_per_feature_and_per_sample(analyzer):
    features = analyzer.to_dataframe("feature")
    samples = analyzer.to_dataframe(level="sample")
    assert list(features.columns) == list(FEATURE_COLUMNS) and list(samples.columns) == list(SAMPLE_COLUMNS)
    assert frame_records(features) == expected_features(analyzer)
    assert frame_records(samples) == expected_samples(analyzer)
    assert len(samples) == sum(len(analyzer.feature(i).samples) for i in analyzer.saved_features)
    with pytest.raises(ValueError, match="`level` must be one of"):
        analyzer.to_dataframe("token")


def test_to_dataframe_without_pandas_says_how_to_install(analyzer, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError("No module named 'pandas'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    with pytest.raises(ImportError, match=r"pip install pandas"):
        analyzer.to_dataframe("sample")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_cli_export_round_trips_with_hostile_tokens(analyzer, tmp_path, fmt, capsys):
    # The CLI reads the feature files (no logit effects in them), so compare with a fresh analyzer.
    fresh = ActivationSampleAnalyzer(analyzer.directory.path)
    out = tmp_path / "out"
    assert main(["export", str(fresh.directory.path), "--format", fmt, str(out)]) == 0
    assert f"samples.{fmt}" in capsys.readouterr().out
    if fmt == "jsonl":
        lines = (out / "samples.jsonl").read_bytes().split(b"\n")
        assert lines[-1] == b"" and len(lines) - 1 == len(expected_samples(fresh))
        # Every line is one JSON object even under Python's splitlines (\u2028, \x85 are escaped).
        assert len((out / "samples.jsonl").read_text(encoding="utf-8").splitlines()) == len(lines) - 1
        assert [json.loads(line) for line in lines[:-1]] == expected_samples(fresh)
        samples = pd.read_json(out / "samples.jsonl", lines=True, dtype=False, precise_float=True)
        features = pd.read_json(out / "features.jsonl", lines=True, dtype=False, precise_float=True)
    else:
        samples = pd.read_parquet(out / "samples.parquet")
        features = pd.read_parquet(out / "features.parquet")
    assert frame_records(samples) == expected_samples(fresh)
    got = frame_records(features)
    want = expected_features(analyzer)
    for row in want:
        for key in [k for k in row if k.startswith(("promoted", "suppressed"))]:
            row[key] = None  # not computed in the fresh analyzer's files
    assert got == want
    tokens = {t for row in expected_samples(fresh) for t in row["context_tokens"]}
    assert {"<script>alert(1)</script>", "\u2028", "x\x85y", "|", "\n"} <= tokens
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["features"] == len(fresh.saved_features) and summary["run"]["num_features_tracked"] == 16


def test_export_reads_more_samples_from_full_state_and_top_k(analyzer, tmp_path):
    out = tmp_path / "o"
    assert main(["export", str(analyzer.directory.path), str(out), "--top-k", "2", "--examples-per-feature", "8"]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    top = analyzer.saved_features[:2]
    assert {r["feature_idx"] for r in rows} == set(top)
    assert len(rows) == sum(len(analyzer.feature(i, 8).samples) for i in top) > 2 * 4


def test_summary_cli_still_works_and_a_dir_named_export_is_reachable(analyzer, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    import shutil

    shutil.copytree(analyzer.directory.path, tmp_path / "export")
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--top-k", "2"]) == 0  # the directory named "export", not the subcommand
    assert "Top 2 features" in capsys.readouterr().out
    os.rename(tmp_path / "export", tmp_path / "other")
    with pytest.raises(SystemExit):
        main(["export", "other", "--format", "csv", "x"])
    assert "invalid choice: 'csv'" in capsys.readouterr().err
