import json
import math
import os

import pandas as pd
import pytest
import torch
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir, write_run_dir

from lightning_sae_samples.analysis import export
from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.export import FEATURE_COLUMNS, SAMPLE_COLUMNS
from lightning_sae_samples.cli import main

ALL_GROUPS = ("top", "interval", "recent")
# The columns of export version 1: still the first ones, with the same values for the top samples.
V1_SAMPLE_COLUMNS = [
    "feature_idx", "sample_rank", "activation_value", "step", "position", "token_id", "token", "context_position",
    "context_text", "context_token_ids", "context_tokens", "context_activations",
]
V1_FEATURE_COLUMNS = [
    "feature_idx", "rank", "saved", "num_samples", "max_activation", "mean_activation", "std_activation",
    "min_activation", "activation_count", "all_time_max", "tokens_seen", "frequency", "first_step", "last_step",
    "histogram_bin_edges", "histogram_counts", "promoted_token_ids", "promoted_tokens", "promoted_values",
    "suppressed_token_ids", "suppressed_tokens", "suppressed_values",
]


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


def sample_record(idx, n, s, group="top", interval=None):
    index, low, high = interval if interval is not None else (None, None, None)
    return {
        "feature_idx": idx, "sample_rank": n, "activation_value": s.activation_value, "step": s.step,
        "position": s.position, "token_id": s.activating_token.token_id, "token": s.activating_token.text,
        "context_position": s.context_position, "context_text": s.context_text,
        "context_token_ids": [t.token_id for t in s.context], "context_tokens": [t.text for t in s.context],
        "context_activations": [t.activation for t in s.context],
        "group": group, "interval_index": index, "interval_low": low, "interval_high": high,
    }


def expected_samples(analyzer, groups=ALL_GROUPS, features=None):
    rows = []
    for idx in analyzer.saved_features if features is None else features:
        f = analyzer.feature(idx)
        if "top" in groups:
            rows += [sample_record(idx, n, s) for n, s in enumerate(f.samples)]
        if "interval" in groups:
            for i, g in enumerate(f.interval_groups):
                rows += [sample_record(idx, n, s, "interval", (i, g.low, g.high)) for n, s in enumerate(g.samples)]
        if "recent" in groups:
            rows += [sample_record(idx, n, s, "recent") for n, s in enumerate(f.recent_samples)]
    return rows


def expected_features(analyzer):
    rows = []
    for rank, idx in enumerate(analyzer.saved_features, start=1):
        f = analyzer.feature(idx)
        s, e = f.stats, f.logit_effects
        row = {
            "feature_idx": idx, "rank": rank, "saved": True, "num_samples": s.num_samples,
            "max_activation": s.max_activation, "mean_activation": s.mean_activation,
            "std_activation": s.std_activation, "min_activation": s.min_activation,
            "activation_count": s.activation_count, "all_time_max": s.all_time_max, "tokens_seen": s.tokens_seen,
            "frequency": s.frequency, "first_step": s.first_step, "last_step": s.last_step,
            "histogram_bin_edges": list(s.histogram.bin_edges), "histogram_counts": list(s.histogram.counts),
        }
        for side in ("promoted", "suppressed"):
            items = None if e is None else getattr(e, side)
            row[f"{side}_token_ids"] = None if items is None else [t.token_id for t in items]
            row[f"{side}_tokens"] = None if items is None else [t.token for t in items]
            row[f"{side}_values"] = None if items is None else [t.value for t in items]
        row.update({
            "recent_overlap": f.recent_overlap,
            "recent_drift": None if f.recent_overlap is None else f.recent_drift,
            "interval_edges": [g.low for g in f.interval_groups] or None,
            "interval_counts": [g.count for g in f.interval_groups] or None,
        })
        m = analyzer.meaning(idx)
        row.update({"explanation": m and m.explanation, "detection_score": m and m.score,
                    "detection_random_score": m and m.random_score, "embedding_auroc": m and m.embedding_score,
                    "embedding_random_auroc": m and m.embedding_random_score})
        rows.append(row)
    return rows


def plain(value):
    """A DataFrame cell as plain Python (numpy arrays and scalars to lists and numbers)."""
    if value is pd.NA:
        return None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def frame_records(frame):
    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def test_to_dataframe_has_one_row_per_feature_and_per_sample(analyzer):
    features = analyzer.to_dataframe("feature")
    samples = analyzer.to_dataframe(level="sample")
    assert list(features.columns) == list(FEATURE_COLUMNS) and list(samples.columns) == list(SAMPLE_COLUMNS)
    assert list(SAMPLE_COLUMNS)[: len(V1_SAMPLE_COLUMNS)] == V1_SAMPLE_COLUMNS
    assert list(FEATURE_COLUMNS)[: len(V1_FEATURE_COLUMNS)] == V1_FEATURE_COLUMNS
    assert frame_records(features) == expected_features(analyzer)
    assert frame_records(samples) == expected_samples(analyzer)
    # This directory has no sample groups: only top samples, the group columns empty.
    assert len(samples) == sum(len(analyzer.feature(i).samples) for i in analyzer.saved_features)
    assert set(samples.group) == {"top"} and samples.interval_index.isna().all()
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


# ---------------------------------------------------------------- sample groups, from real Trainer runs
@pytest.fixture(scope="module")
def groups_dir(tmp_path_factory):
    return write_run_dir(tmp_path_factory.mktemp("groups"), FakeTokenizer(export_vocab()),
                         recent_window_steps=2, samples_per_interval=2)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return write_run_dir(tmp_path_factory.mktemp("plain"), FakeTokenizer(export_vocab()))


def read_table(out, name, fmt):
    if fmt == "jsonl":
        text = (out / f"{name}.jsonl").read_text(encoding="utf-8")
        assert text.endswith("\n") and len(text.splitlines()) == text.count("\n")
        return [json.loads(line) for line in text.splitlines()]
    import pyarrow.parquet as pq

    rows = pq.read_table(out / f"{name}.parquet").to_pylist()  # exact types (pandas makes nullable ints float)
    assert frame_records(pd.read_parquet(out / f"{name}.parquet")) == rows
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_export_round_trips_interval_and_recent_groups(groups_dir, tmp_path, fmt):
    analyzer = ActivationSampleAnalyzer(groups_dir)
    out = tmp_path / "out"
    assert main(["export", str(groups_dir), "--format", fmt, str(out)]) == 0
    samples, features = read_table(out, "samples", fmt), read_table(out, "features", fmt)
    assert samples == expected_samples(analyzer) and features == expected_features(analyzer)
    # Every group is there, and each row of a group is where the feature files put it.
    by_group = {g: [r for r in samples if r["group"] == g] for g in ALL_GROUPS}
    assert all(by_group.values())
    for idx in analyzer.saved_features:
        feature = analyzer.feature(idx)
        rows = [r for r in samples if r["feature_idx"] == idx]
        assert [r["group"] for r in rows] == sorted((r["group"] for r in rows), key=ALL_GROUPS.index)
        assert len([r for r in rows if r["group"] == "recent"]) == len(feature.recent_samples)
        assert [r["activation_value"] for r in rows if r["group"] == "top"] == [s.activation_value
                                                                               for s in feature.samples]
        for r in (r for r in rows if r["group"] == "interval"):
            group = feature.interval_groups[r["interval_index"]]
            assert (r["interval_low"], r["interval_high"]) == (group.low, group.high)
            assert r["interval_low"] <= r["activation_value"]
            assert r["interval_high"] is None or r["activation_value"] < r["interval_high"]
    for r in by_group["top"] + by_group["recent"]:
        assert (r["interval_index"], r["interval_low"], r["interval_high"]) == (None, None, None)
    for row in features:
        assert sum(row["interval_counts"]) == row["activation_count"]
        assert len(row["interval_edges"]) == len(row["interval_counts"]) > 1
        assert row["interval_edges"] == sorted(row["interval_edges"])
        assert row["recent_drift"] == (row["recent_overlap"] < 0.25)
    drift = {row["recent_drift"] for row in features}
    assert drift == {True, False}, "the fixture needs flagged and unflagged features"
    tokens = {t for r in by_group["interval"] + by_group["recent"] for t in r["context_tokens"]}
    assert tokens & {"<script>alert(1)</script>", "\u2028", "x\x85y", "|", "\n"}
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["export_version"] == 2 and summary["samples"] == len(samples)
    assert summary["samples_by_group"] == {g: len(rows) for g, rows in by_group.items()}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(out / "samples.parquet")
        assert [str(schema.field(c).type) for c in ("group", "interval_index", "interval_low", "interval_high")] == [
            "string", "int64", "double", "double"]
        schema = pq.read_schema(out / "features.parquet")
        import pyarrow as pa

        assert [schema.field(c).type for c in ("recent_overlap", "recent_drift", "interval_counts")] == [
            pa.float64(), pa.bool_(), pa.list_(pa.int64())]


def test_to_dataframe_has_every_group_by_default_and_restricts_on_request(groups_dir, tmp_path):
    analyzer = ActivationSampleAnalyzer(groups_dir)
    every = analyzer.to_dataframe("sample")
    assert list(every.columns) == list(SAMPLE_COLUMNS)
    assert frame_records(every) == expected_samples(analyzer)
    assert str(every.interval_index.dtype) == "Int64" and str(every.interval_high.dtype) == "float64"
    for groups in (["top"], ("interval", "recent"), "recent", ("recent", "top")):
        chosen = [groups] if isinstance(groups, str) else groups
        frame = export.to_dataframe(analyzer, "sample", groups=groups)
        assert frame_records(frame) == expected_samples(analyzer, groups=chosen)
    # The top rows alone are the rows of export version 1, in the same columns.
    top = export.to_dataframe(analyzer, "sample", groups=["top"])
    assert frame_records(top[V1_SAMPLE_COLUMNS]) == [
        {k: r[k] for k in V1_SAMPLE_COLUMNS} for r in expected_samples(analyzer, groups=["top"])]
    features = analyzer.to_dataframe("feature")
    assert frame_records(features) == expected_features(analyzer)
    assert str(features.recent_drift.dtype) == "boolean"
    assert len(export.to_dataframe(analyzer, "feature", groups=["top"])) == len(features)
    with pytest.raises(ValueError, match="`groups` must be among"):
        export.to_dataframe(analyzer, "sample", groups=["random"])
    paths = export.export_samples(analyzer, tmp_path / "only_recent", groups=["recent"])
    rows = [json.loads(line) for line in paths["samples"].read_text(encoding="utf-8").splitlines()]
    assert rows == expected_samples(analyzer, groups=["recent"])
    # A latent only full_state.pt holds gets its groups too, built as the writer would.
    unsaved = [s.feature_idx for s in analyzer.features() if s.feature_idx not in analyzer.saved_features][:2]
    assert unsaved
    frame = analyzer.to_dataframe("sample", features=unsaved)
    assert frame_records(frame) == expected_samples(analyzer, features=unsaved)
    assert set(frame.group) == set(ALL_GROUPS)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_run_without_the_groups_exports_as_before(plain_dir, tmp_path, fmt):
    analyzer = ActivationSampleAnalyzer(plain_dir)
    assert analyzer.summary.recent_window_steps is None
    out = tmp_path / "out"
    assert main(["export", str(plain_dir), "--format", fmt, str(out)]) == 0
    samples, features = read_table(out, "samples", fmt), read_table(out, "features", fmt)
    assert samples == expected_samples(analyzer, groups=["top"]) == expected_samples(analyzer)
    assert len(samples) == sum(len(analyzer.feature(i).samples) for i in analyzer.saved_features) > 0
    for row in samples:
        assert (row["group"], row["interval_index"], row["interval_low"], row["interval_high"]) == (
            "top", None, None, None)
    assert features == expected_features(analyzer)
    for row in features:
        assert [row[c] for c in ("recent_overlap", "recent_drift", "interval_edges", "interval_counts")] == [None] * 4
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["samples_by_group"] == {"top": len(samples), "interval": 0, "recent": 0}
    frame = analyzer.to_dataframe("sample")
    assert frame_records(frame) == frame_records(export.to_dataframe(analyzer, "sample", groups=["top"]))
    assert analyzer.to_dataframe("feature").recent_overlap.isna().all()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_feature_table_names_each_explanation_score(plain_dir, tmp_path, fmt):
    import shutil

    from lightning_sae_samples.analysis.explanations import ExplanationRecord, append_explanations

    run = tmp_path / "run"
    shutil.copytree(plain_dir, run)
    first, second = ActivationSampleAnalyzer(run).saved_features[:2]
    append_explanations(run, [
        ExplanationRecord(latent=first, text="commas", score=0.8, score_contexts=10, random_score=0.5,
                          embedding_score=0.9, embedding_contexts=40, embedding_random_score=0.45),
        ExplanationRecord(latent=second, text='"," (before "and")', model="top-tokens", embedding_score=0.7),
    ])
    out = tmp_path / "out"
    assert main(["export", str(run), "--format", fmt, str(out)]) == 0
    rows = {r["feature_idx"]: r for r in read_table(out, "features", fmt)}
    names = ("explanation", "detection_score", "detection_random_score", "embedding_auroc", "embedding_random_auroc")
    assert [rows[first][c] for c in names] == ["commas", 0.8, 0.5, 0.9, 0.45]
    assert [rows[second][c] for c in names] == ['"," (before "and")', None, None, 0.7, None]
    assert all(rows[i]["explanation"] is None for i in rows if i not in (first, second))
    assert rows == {r["feature_idx"]: r for r in expected_features(ActivationSampleAnalyzer(run))}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_history_table_is_listed_and_a_foreign_one_is_never_overwritten(plain_dir, tmp_path, fmt):
    """Issue 33 (item 8): `history.<ext>` was missing from the manifest, and a stranger's was overwritten."""
    analyzer = ActivationSampleAnalyzer(plain_dir)
    assert analyzer.history is not None
    out = tmp_path / "out"
    paths = export.export_samples(analyzer, out, format=fmt)
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["files"] == sorted([f"features.{fmt}", f"history.{fmt}", f"samples.{fmt}", "summary.json"])
    assert paths["history"] == out / f"history.{fmt}"
    export.export_samples(analyzer, out, format=fmt)  # the export's own history table: replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / f"history.{fmt}").write_text("someone else's\n")
    with pytest.raises(FileExistsError, match=f"history.{fmt} exists and this export did not write it"):
        export.export_samples(analyzer, foreign, format=fmt)
    assert (foreign / f"history.{fmt}").read_text() == "someone else's\n"
    assert sorted(p.name for p in foreign.iterdir()) == [f"history.{fmt}"]
