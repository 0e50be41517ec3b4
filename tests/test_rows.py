"""Shuffled activation rows with token refs: the same collection as the sequence path, against the oracle."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from helpers import read_dir
from oracle import RowsSeen, assert_dir_matches_oracle, assert_state_matches

from lightning_sae_samples import ActivationSampleCollector, LatentInputError
from lightning_sae_samples.state.tables import padded_state
from lightning_sae_samples.token_sources import ArrayTokenSource, TokenRing, load_token_source

F, S, T, K = 12, 6, 9, 4
SETTINGS = dict(context_size=4, max_samples_per_feature=3, samples_per_feature_to_save=3, activation_threshold=0.2)


def corpus(seed: int = 0, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[S, T]`` with trailing padding (``pad_id``) in some sequences, and dense latents ``[S, T, F]``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 30, (S, T), generator=g)
    tokens[1, 6:] = pad_id
    tokens[4, 3] = pad_id  # padding inside a sequence cuts windows as an edge does
    latents = torch.relu(torch.randn(S, T, F, generator=g))
    latents = torch.where(latents > 0, (latents * 4).round() / 4, 0.0)  # ties between rows
    return tokens, latents


def sparse(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, indices = latents.topk(K, dim=-1)
    return indices, values


def tables(collector: ActivationSampleCollector) -> dict:
    """The collection as padded tensors, windows read from the token source where the samples keep refs."""
    return padded_state(collector.with_windows(collector.state_dict()["collector"]))


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("exclude", [(), (3, 7)])
def test_shuffled_rows_keep_what_the_sequences_keep(mode, exclude):
    tokens, latents = corpus()
    sequences = ActivationSampleCollector(num_latents=F, exclude_token_ids=exclude, **SETTINGS)
    rows = ActivationSampleCollector(
        num_latents=F, exclude_token_ids=exclude, token_source=ArrayTokenSource(tokens, pad_token_id=0), **SETTINGS
    )
    perm = torch.randperm(S * T, generator=torch.Generator().manual_seed(1))
    flat = latents.reshape(S * T, F)
    if mode == "dense":
        sequences.update(tokens, latents=latents, attention_mask=tokens != 0, step=0)
        rows.update(token_refs=perm, latents=flat[perm], step=0)
    else:
        indices, values = sparse(latents)
        sequences.update(tokens, latent_indices=indices, latent_values=values, attention_mask=tokens != 0, step=0)
        rows.update(token_refs=perm, latent_indices=indices.reshape(-1, K)[perm],
                    latent_values=values.reshape(-1, K)[perm], step=0)
    want, got = tables(sequences), tables(rows)
    for name in ("count", "sum", "sum_sq", "max", "min", "hist", "first_step", "last_step", "tokens_seen"):
        assert torch.equal(got[name], want[name]), name
    for name in ("top_values", "top_step", "top_position", "top_context_tokens", "top_order"):
        assert torch.equal(got[name], want[name]), name
    kept = torch.isfinite(want["top_values"])
    half = SETTINGS["context_size"] // 2
    # The row's own activation is known; its neighbours', seen in other rows if at all, are unknown (NaN, not 0).
    assert torch.equal(got["top_context_acts"][..., half][kept], want["top_context_acts"][..., half][kept])
    others = torch.cat([got["top_context_acts"][..., :half], got["top_context_acts"][..., half + 1 :]], dim=-1)
    assert bool(others[kept].isnan().all())
    assert int(kept.sum()) > 10


def test_the_order_of_rows_does_not_change_ties():
    tokens, latents = corpus(2)
    flat = latents.reshape(S * T, F)
    results = []
    for seed in (0, 1, 2):
        perm = torch.randperm(S * T, generator=torch.Generator().manual_seed(seed))
        collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens),
                                              samples_per_interval=1, **SETTINGS)
        collector.update(token_refs=perm, latents=flat[perm], step=0)
        results.append(tables(collector))
    for other in results[1:]:
        for name in ("top_values", "top_order", "top_context_tokens", "interval_order", "interval_values"):
            assert torch.equal(other[name], results[0][name]), name


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_rows_mixed_across_steps_from_a_ring_match_the_oracle(mode, tmp_path):
    g = torch.Generator().manual_seed(3)
    ring = TokenRing(3 * 2 * T)
    collector = ActivationSampleCollector(num_latents=F, token_source=ring, samples_per_interval=2,
                                          recent_window_steps=2, **SETTINGS)
    seen, pending, held = [], [], []
    for step in range(5):
        tokens = torch.randint(1, 30, (2, T), generator=g)
        tokens[0, -2:] = -1
        latents = torch.relu(torch.randn(2, T, F, generator=g))
        first = ring.add(tokens)
        held.append((first, tokens))
        refs = first + torch.arange(2 * T)
        # A mixing buffer: half of this batch's rows now, shuffled with the rest of the last one's; the other
        # half with the next batch's.
        half = torch.randperm(2 * T, generator=g)
        now, later = half[:T], half[T:]
        refs_all = torch.cat([*(p[0] for p in pending), refs[now]])
        latents_all = torch.cat([*(p[1] for p in pending), latents.reshape(-1, F)[now]])
        take = torch.randperm(len(refs_all), generator=g)
        pending = [(refs[later], latents.reshape(-1, F)[later])]
        if mode == "dense":
            collector.update(token_refs=refs_all[take], latents=latents_all[take], step=step)
        else:
            indices, values = sparse(latents_all[take])
            collector.update(token_refs=refs_all[take], latent_indices=indices, latent_values=values, step=step)
            latents_all = torch.zeros_like(latents_all).scatter(1, *sparse(latents_all))
        seen.append(RowsSeen(step, 0, refs_all[take].tolist(), latents_all[take], ring=list(held)))
    assert_state_matches(collector.state_dict()["collector"], seen, F, 3, 4, 0.2)
    collector.save(tmp_path / "samples")
    files = read_dir(tmp_path / "samples")
    assert_dir_matches_oracle(files, seen, F, 3, 4, 0.2)


def test_refs_out_of_range_are_an_error_before_anything_is_folded():
    tokens, latents = corpus()
    collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens), **SETTINGS)
    collector.update(token_refs=torch.arange(10), latents=latents.reshape(-1, F)[:10], step=0)
    before = collector.state_dict()
    refs = torch.tensor([0, 5, S * T + 3])
    with pytest.raises(LatentInputError, match=rf"ref {S * T + 3}.*\[0, {S * T}\)"):
        collector.update(token_refs=refs, latents=torch.ones(3, F), step=1)
    after = collector.state_dict()
    assert after["collector"]["last_collected_step"] == 0
    for name in ("count", "sum", "tokens_seen"):
        assert torch.equal(after["collector"][name], before["collector"][name])


def test_a_ref_that_left_the_ring_names_the_size_to_raise():
    ring = TokenRing(2 * T)
    collector = ActivationSampleCollector(num_latents=F, token_source=ring, **SETTINGS)
    first = ring.add(torch.randint(1, 30, (1, T)))
    ring.add(torch.randint(1, 30, (2, T)))  # pushes the first batch out
    with pytest.raises(LatentInputError, match=rf"ref {first}\b.*\[{T}, {3 * T}\).*capacity_tokens.*{2 * T}"):
        collector.update(token_refs=torch.tensor([first]), latents=torch.ones(1, F), step=0)
    assert not collector.has_collection
    with pytest.raises(LatentInputError, match="capacity_tokens"):
        ring.add(torch.zeros(3, T, dtype=torch.long))


def test_rows_need_a_source_and_exactly_one_kind_of_tokens():
    collector = ActivationSampleCollector(num_latents=F, **SETTINGS)
    with pytest.raises(LatentInputError, match="token_source"):
        collector.update(token_refs=torch.arange(3), latents=torch.ones(3, F), step=0)
    with pytest.raises(LatentInputError, match="exactly one"):
        collector.update(torch.zeros(1, 3, dtype=torch.long), token_refs=torch.arange(3), latents=torch.ones(3, F),
                         step=0)
    source = ArrayTokenSource(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(LatentInputError, match=r"\[3, F\]"):
        ActivationSampleCollector(token_source=source).update(token_refs=torch.arange(3), latents=torch.ones(4, F),
                                                              step=0)


def test_array_sources_read_the_same_windows_from_a_tensor_a_memmap_and_a_datasets_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    tokens, _ = corpus()
    path = tmp_path / "tokens.npy"
    np.save(path, tokens.numpy().astype(np.int32))
    memmap = np.load(path, mmap_mode="r")
    column = datasets.Dataset.from_dict({"token_ids": tokens.tolist()})["token_ids"]
    refs = torch.randperm(S * T)
    want = ArrayTokenSource(tokens, pad_token_id=0).windows(refs, 3)
    fingerprint = ArrayTokenSource(tokens, pad_token_id=0).fingerprint()
    for data in (memmap, column, tokens.tolist()):
        assert ArrayTokenSource(data, pad_token_id=0).fingerprint() == fingerprint  # the same tokens, any container
        got = ArrayTokenSource(data, pad_token_id=0).windows(refs, 3)
        assert torch.equal(got.tokens, want.tokens)
        assert torch.equal(got.position, want.position)
        assert torch.equal(got.sequence, want.sequence)
    centre = want.tokens[:, 3]
    assert bool((centre[tokens.view(-1)[refs] == 0] == -1).all())  # a padding row reads as padding


def test_resuming_rows_equals_one_run():
    tokens, latents = corpus(4)
    flat = latents.reshape(S * T, F)
    perm = torch.randperm(S * T, generator=torch.Generator().manual_seed(5))
    parts = perm.chunk(4)

    def run(stop_after=None):
        collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens),
                                              samples_per_interval=1, **SETTINGS)
        for step, part in enumerate(parts):
            if step == stop_after:
                state = collector.state_dict()
                collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens),
                                                      samples_per_interval=1, **SETTINGS)
                collector.load_state_dict(state)
            collector.update(token_refs=part, latents=flat[part], step=step)
        return tables(collector)

    whole, resumed = run(), run(stop_after=2)
    for name, value in whole.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed[name]) or (value.is_floating_point() and torch.allclose(
                value, resumed[name], equal_nan=True)), name


def test_deduplicated_rows_of_one_update_equal_the_sequence_path():
    tokens, latents = corpus(6)
    tokens[:, 5] = tokens[:, 1]  # repeated contexts
    settings = dict(SETTINGS, deduplicate_contexts=True)
    sequences = ActivationSampleCollector(num_latents=F, **settings)
    sequences.update(tokens, latents=latents, step=0)
    rows = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens), **settings)
    perm = torch.randperm(S * T)
    rows.update(token_refs=perm, latents=latents.reshape(-1, F)[perm], step=0)
    want, got = tables(sequences), tables(rows)
    for name in ("top_values", "top_position", "top_context_tokens", "top_order"):
        assert torch.equal(got[name], want[name]), name


def test_a_token_source_may_be_named_by_an_import_path():
    source = load_token_source("test_rows:SOURCE")
    assert source is SOURCE
    with pytest.raises(ValueError, match="package.module:attribute"):
        load_token_source("no_colon")
    with pytest.raises(ValueError, match="token_source"):
        load_token_source("math:pi")


def test_the_feature_files_say_unknown_as_null_and_readers_show_only_the_activating_token(tmp_path):
    from rich.console import Console

    from lightning_sae_samples import ActivationSampleAnalyzer

    tokens, latents = corpus()
    collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens), **SETTINGS)
    collector.update(token_refs=torch.arange(S * T), latents=latents.reshape(-1, F), step=0)
    collector.save(tmp_path / "s")
    files = read_dir(tmp_path / "s")
    record = next(v for k, v in files.items() if k.startswith("feature_"))["top_samples"][0]
    acts = record["context_activations"]
    assert acts[record["context_position"]] == record["activation_value"]
    assert all(a is None for i, a in enumerate(acts) if i != record["context_position"])
    analyzer = ActivationSampleAnalyzer(tmp_path / "s")
    sample = analyzer.feature(analyzer.saved_features[0]).samples[0]
    assert not sample.neighbours_known
    assert sample.activating_token.activation == sample.activation_value
    assert all(t.activation is None for i, t in enumerate(sample.context) if i != sample.context_position)
    assert math.isfinite(sample.activation_value)
    analyzer.generate_html_report(tmp_path / "report.html")
    console = Console(record=True, width=200)
    analyzer.print_feature_report(analyzer.saved_features[0], console=console)
    shown = [(tmp_path / "s" / "interpretability_report.md").read_text(), (tmp_path / "report.html").read_text(),
             console.export_text()]
    for text in shown:
        assert "each row knows only its own token" in text
    assert "activation unknown: trained on shuffled rows" in shown[1]  # the neighbours' hover titles
    paths = analyzer.export(tmp_path / "export", "jsonl")
    row = json.loads(paths["samples"].read_text().splitlines()[0])
    assert row["context_activations"][row["context_position"]] == row["activation_value"]
    assert row["context_activations"].count(None) == len(row["context_activations"]) - 1
    from lightning_sae_samples.analysis.neuronpedia import NeuronpediaSource, export_neuronpedia, read_batches

    with pytest.warns(UserWarning, match="only the activating token"):
        exported = export_neuronpedia(analyzer, tmp_path / "np", NeuronpediaSource(model_id="test-model"))
    activation = read_batches(exported.source_dir)[1][0]
    assert activation["values"][activation["maxValueTokenIndex"]] == activation["maxValue"] > 0
    assert sorted(activation["values"])[:-1] == [0.0] * (len(activation["values"]) - 1)


SOURCE = ArrayTokenSource(torch.zeros(2, 4, dtype=torch.long))


def same_tensors(a, b, where: str = "state") -> None:
    """Nested dicts of tensors hold the same entries (NaN equal to NaN, dtypes included)."""
    assert a.keys() == b.keys(), where
    for key, value in a.items():
        if isinstance(value, dict):
            same_tensors(value, b[key], f"{where}.{key}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(value) == len(b[key]), f"{where}.{key}"
            for i, (x, y) in enumerate(zip(value, b[key])):
                same_tensors(x, y, f"{where}.{key}[{i}]")
        elif torch.is_tensor(value):
            assert value.dtype == b[key].dtype, f"{where}.{key}"
            assert torch.equal(value.nan_to_num(-7.0) if value.is_floating_point() else value,
                               b[key].nan_to_num(-7.0) if b[key].is_floating_point() else b[key]), f"{where}.{key}"
        else:
            assert value == b[key], f"{where}.{key}"


def checkpoint_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def collect_both_ways(tmp_path, mode: str, **settings) -> dict:
    """The same shuffled rows over three steps, kept as windows and as refs; each collector saved to its folder."""
    tokens, latents = corpus(7)
    flat = latents.reshape(S * T, F)
    perm = torch.randperm(S * T, generator=torch.Generator().manual_seed(8))
    out = {}
    for row_windows in ("tokens", "refs"):
        collector = ActivationSampleCollector(
            num_latents=F, token_source=ArrayTokenSource(tokens, pad_token_id=0), row_windows=row_windows,
            samples_per_interval=1, recent_window_steps=2, **{**SETTINGS, **settings},
        )
        for step, part in enumerate(perm.chunk(3)):
            if mode == "dense":
                collector.update(token_refs=part, latents=flat[part], step=step)
            else:
                indices, values = sparse(flat[part])
                collector.update(token_refs=part, latent_indices=indices, latent_values=values, step=step)
        state = collector.state_dict()
        collector.save(tmp_path / row_windows)
        out[row_windows] = (collector, state)
    return out


@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("dedup", [False, True])
def test_refs_keep_no_windows_and_write_the_windows_tokens_keep(tmp_path, mode, dedup):
    runs = collect_both_ways(tmp_path, mode, deduplicate_contexts=dedup)
    (_, with_tokens), (refs_collector, with_refs) = runs["tokens"], runs["refs"]
    kept = with_refs["collector"]
    for name in ("top", "interval", "recent", "recent_prev", "window"):
        assert "token_ref" in kept[name], name
        assert not {"context_tokens", "context_acts"} & kept[name].keys(), name
        assert "context_tokens" in with_tokens["collector"][name], name
    fingerprint = refs_collector.token_source.fingerprint()
    assert kept["token_source"] == {"kind": "ArrayTokenSource", "num_sequences": S, "seq_len": T, "pad_token_id": 0,
                                    "fingerprint": fingerprint}
    assert len(fingerprint) == 16
    # Per kept sample 8 bytes of ref instead of a window of token ids and activations: the checkpoint is smaller.
    assert int(kept["top"]["count"].sum()) > 20
    assert checkpoint_bytes(with_refs) < checkpoint_bytes(with_tokens)
    engine = refs_collector.collector
    assert all("context_tokens" not in t.pool and "context_acts" not in t.pool for t in engine.tables.values())
    # Read back from the source, the windows are the ones a collection keeping them holds, in every table.
    same_tensors(refs_collector.with_windows(kept), with_tokens["collector"])
    # And every file written holds them: feature files, the full state, the history.
    a, b = read_dir(tmp_path / "tokens"), read_dir(tmp_path / "refs")
    features = sorted(name for name in a if name.startswith("feature_"))
    assert features and features == sorted(name for name in b if name.startswith("feature_"))
    for name in features:
        assert a[name] == b[name], name
    same_tensors(a["full_state.pt"], b["full_state.pt"])
    history = [torch.load(tmp_path / way / "training_history.pt", weights_only=True) for way in ("tokens", "refs")]
    same_tensors(*history)


def test_refs_resume_from_disk_equals_tokens_and_needs_the_same_source(tmp_path):
    tokens, latents = corpus(9)
    flat = latents.reshape(S * T, F)
    parts = torch.randperm(S * T, generator=torch.Generator().manual_seed(10)).chunk(3)

    def run(row_windows, source_tokens=tokens, stop_after=None):
        def new():
            return ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(source_tokens),
                                             row_windows=row_windows, samples_per_interval=1, **SETTINGS)

        collector = new()
        for step, part in enumerate(parts):
            if step == stop_after:
                torch.save(collector.state_dict(), tmp_path / "ckpt.pt")
                collector = new()
                collector.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
            collector.update(token_refs=part, latents=flat[part], step=step)
        return collector

    want = tables(run("tokens"))
    resumed = run("refs", stop_after=2)
    got = tables(resumed)
    assert "top_token_ref" not in got and got.keys() == want.keys()
    for name, value in got.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.nan_to_num(-7.0), want[name].nan_to_num(-7.0)), name
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    # Another source (another shape), or none, cannot read these refs: resuming is refused, naming both.
    settings = dict(SETTINGS, samples_per_interval=1)
    other = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens[:, :-1]), **settings)
    with pytest.raises(ValueError, match=rf"Cannot resume.*{S} sequences of {T} tokens.*{S} sequences of {T - 1}"):
        other.load_state_dict(state)
    # The same shape with other tokens (another tokenizer or order): refused too, by the source's fingerprint.
    reordered = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens.flip(0)), **settings)
    with pytest.raises(ValueError, match="has that shape but other tokens"):
        reordered.load_state_dict(state)
    with pytest.raises(ValueError, match="row_windows='tokens'.*Pass row_windows='refs'"):
        ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens), row_windows="tokens",
                                  **settings).load_state_dict(state)
    sourceless = ActivationSampleCollector(num_latents=F, **settings)
    sourceless.load_state_dict(state)
    with pytest.raises(ValueError, match="no token source was given"):
        sourceless.save(tmp_path / "out")


def test_refs_with_a_ring_are_refused_and_auto_keeps_tokens_there():
    with pytest.raises(ValueError, match=r"row_windows='refs'.*TokenRing.*leave.*Set row_windows='tokens'"):
        ActivationSampleCollector(num_latents=F, token_source=TokenRing(4 * T), row_windows="refs", **SETTINGS)
    with pytest.raises(ValueError, match="row_windows"):
        ActivationSampleCollector(num_latents=F, row_windows="ref", **SETTINGS)
    ring = TokenRing(4 * T)
    collector = ActivationSampleCollector(num_latents=F, token_source=ring, **SETTINGS)
    first = ring.add(torch.randint(1, 30, (2, T)))
    collector.update(token_refs=first + torch.arange(2 * T), latents=torch.rand(2 * T, F), step=0)
    assert "context_tokens" in collector.state_dict()["collector"]["top"]


def test_a_refs_collection_refuses_sequences_and_a_tampered_checkpoint():
    from lightning_sae_samples.state.validate import check_state

    tokens, latents = corpus()
    collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens), **SETTINGS)
    collector.update(token_refs=torch.arange(S * T), latents=latents.reshape(-1, F), step=0)
    with pytest.raises(LatentInputError, match="keeps their token refs.*row_windows='tokens'"):
        collector.update(tokens, latents=latents, step=1)
    state = collector.state_dict()["collector"]
    check_state(state)
    bad = {**state, "top": {**state["top"], "token_ref": state["top"]["token_ref"].clone()}}
    bad["top"]["token_ref"][0] = S * T
    with pytest.raises(ValueError, match=rf"top.token_ref.*\[0, {S * T}\)"):
        check_state(bad)
    with pytest.raises(ValueError, match="token_source"):
        check_state({key: value for key, value in state.items() if key != "token_source"})


def test_refs_read_back_from_a_datasets_column_and_with_nothing_kept(tmp_path):
    datasets = pytest.importorskip("datasets")
    tokens, latents = corpus()
    column = datasets.Dataset.from_dict({"token_ids": tokens.tolist()})["token_ids"]
    flat = latents.reshape(S * T, F)
    states = []
    for data in (tokens, column):
        collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(data, pad_token_id=0),
                                              **SETTINGS)
        collector.update(token_refs=torch.arange(S * T), latents=flat, step=0)
        states.append(collector.with_windows(collector.state_dict()["collector"]))
    same_tensors(*states)
    # Nothing above the threshold: no ref to read, and the save still writes (empty) windows.
    empty = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(column), **SETTINGS)
    empty.update(token_refs=torch.arange(S * T), latents=torch.zeros(S * T, F), step=0)
    empty.save(tmp_path / "empty")
    assert read_dir(tmp_path / "empty")["full_state.pt"]["top"]["context_tokens"].shape == (0, 5)


def test_the_memory_estimate_counts_a_ref_per_kept_sample():
    from lightning_sae_samples.engine.memory import estimate_state_bytes

    runs = {}
    tokens, latents = corpus()
    for row_windows in ("tokens", "refs"):
        collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens),
                                              row_windows=row_windows, **SETTINGS)
        collector.update(token_refs=torch.arange(S * T), latents=latents.reshape(-1, F), step=0)
        engine = collector.collector
        stored = int(engine.tables["top"].export()["count"].sum())
        pool = sum(t.numel() * t.element_size() for t in engine.tables["top"].pool.values())
        per_sample = pool / len(engine.tables["top"].pool["position"])  # bytes per pool row
        runs[row_windows] = (engine.config, stored, per_sample)
    (tokens_config, stored, tokens_per_sample), (refs_config, _, refs_per_sample) = runs["tokens"], runs["refs"]
    assert refs_config.row_windows == "refs" and tokens_config.row_windows == "tokens"
    assert refs_per_sample == 4 + 8  # position and ref
    estimate = {name: estimate_state_bytes(config, stored_samples=stored, vocab_size=30)
                for name, (config, _, _) in runs.items()}
    # The stored samples and the pool's scratch row.
    assert estimate["tokens"]["top"] - estimate["refs"]["top"] == (stored + 1) * (tokens_per_sample - refs_per_sample)
