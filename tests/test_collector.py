import math

import pytest
import torch
from helpers import engine_config, to_sparse
from oracle import Seen, assert_state_matches, oracle

from lightning_sae_samples.engine.sample_collector import RANK_SHIFT, SampleCollector
from lightning_sae_samples.engine.sample_table import MergePolicy
from lightning_sae_samples.engine.windows import above_threshold
from lightning_sae_samples.state.merge import merge_states
from lightning_sae_samples.state.tables import padded_state

F, K, CTX, THR = 7, 5, 4, 0.5


@pytest.fixture(
    params=[None, 1, 7, "rows-one-by-one"],
    ids=["merge-when-read", "merge-every-insert", "merge-every-7-samples", "merge-when-read-by-chunks-of-rows"],
)
def stage_limit(request):
    """How many staged samples trigger a merge; the kept samples must not depend on it.

    ``"rows-one-by-one"``: merges when read, a chunk of one touched row at a time (as wide states do), into a
    window pool that starts with 2 slots (so merges grow it).
    """
    if request.param == "rows-one-by-one":
        return MergePolicy(merge_cells=1, min_pool_slots=2)
    return MergePolicy(stage_limit=request.param)


def random_batches(n, batch=3, seq=6, seed=0, vocab=20):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        latents = torch.round(torch.randn(batch, seq, F, generator=gen) * 2) / 2  # ties on a 0.5 grid
        latents[..., 0] = 0.0  # never fires
        out.append((tokens, latents))
    return out


def assert_state_matches_oracle(state, seen, k=K, exclude=()):
    assert_state_matches(state, seen, F, k, CTX, THR, exclude=exclude)


def test_dense_updates_equal_brute_force_topk(stage_limit):
    c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    seen = []
    for step, (tokens, latents) in enumerate(random_batches(8)):
        c.update_dense(tokens, latents, step)
        seen.append(Seen(step, 0, 0, tokens, latents))
    assert_state_matches_oracle(c.state_dict(), seen)


def test_sparse_updates_equal_brute_force_topk(stage_limit):
    c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    seen = []
    for step, (tokens, latents) in enumerate(random_batches(8, seed=3)):
        indices, values, dense = to_sparse(latents)
        c.update_sparse(tokens, indices, values, step)
        seen.append(Seen(step, 0, 0, tokens, dense))
    assert_state_matches_oracle(c.state_dict(), seen)


def test_sparse_and_dense_paths_agree(stage_limit):
    dense_c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    sparse_c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    for step, (tokens, latents) in enumerate(random_batches(5, seed=4)):
        indices, values, dense = to_sparse(latents)
        dense_c.update_dense(tokens, dense, step)
        sparse_c.update_sparse(tokens, indices, values, step)
    a, b = padded_state(dense_c.state_dict()), padded_state(sparse_c.state_dict())
    for key, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[key]), key


def test_merge_of_two_ranks_equals_oracle_over_the_union(stage_limit):
    ranks = [SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit) for _ in range(2)]
    seen = []
    batches = random_batches(10, seed=7)
    for i, (tokens, latents) in enumerate(batches):
        step, rank = i // 2, i % 2
        ranks[rank].update_dense(tokens, latents, step, order_base=rank << RANK_SHIFT)
        seen.append(Seen(step, rank, 0, tokens, latents))
    merged = merge_states(ranks[1].state_dict(), ranks[0].state_dict())
    assert_state_matches_oracle(merged, seen)
    assert int(merged["tokens_seen"]) == sum(t.numel() for t, _ in batches)
    # merging is commutative
    other = padded_state(merge_states(ranks[0].state_dict(), ranks[1].state_dict()))
    merged = padded_state(merged)
    for key, value in merged.items():
        if torch.is_tensor(value):
            assert torch.equal(value, other[key]), key


def test_state_dict_round_trip_continues_exactly(stage_limit):
    batches = random_batches(6, seed=9)
    straight = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    for step, (tokens, latents) in enumerate(batches):
        straight.update_dense(tokens, latents, step)
    first = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    for step, (tokens, latents) in enumerate(batches[:3]):
        first.update_dense(tokens, latents, step)
    resumed = SampleCollector.from_state_dict(first.state_dict())
    for step, (tokens, latents) in enumerate(batches[3:], start=3):
        resumed.update_dense(tokens, latents, step)
    a, b = padded_state(straight.state_dict()), padded_state(resumed.state_dict())
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_threshold_is_strict_in_exact_arithmetic_for_every_dtype(dtype):
    threshold = 0.1
    grid = torch.tensor([0.0999, 0.1, 0.1001, 0.1002, 0.11], dtype=dtype)
    want = torch.tensor([float(v) > threshold for v in grid.double()])
    assert torch.equal(above_threshold(grid, threshold), want)


def test_non_finite_values_are_skipped_and_counted(stage_limit):
    c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    tokens, latents = random_batches(1, seed=11)[0]
    clean = latents.clone()
    latents[0, 1, 2] = math.nan
    latents[1, 2, 3] = math.inf
    latents[2, 0, 4] = -math.inf
    c.update_dense(tokens, latents, 0)
    state = padded_state(c.state_dict())
    assert int(state["nonfinite_skipped"]) == 3
    assert torch.isfinite(state["top_context_acts"]).all()
    clean[0, 1, 2] = clean[1, 2, 3] = clean[2, 0, 4] = 0.0
    ref = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    ref.update_dense(tokens, clean, 0)
    assert torch.equal(ref.state_dict()["count"], state["count"])
    assert torch.equal(padded_state(ref.state_dict())["top_values"], state["top_values"])
    # an all-NaN batch changes nothing but the skip counter
    c.update_dense(tokens, torch.full_like(latents, math.nan), 1)
    after = c.state_dict()
    assert torch.equal(after["count"], state["count"]) and int(after["nonfinite_skipped"]) == 3 + latents.numel()


def test_non_finite_sparse_values_are_skipped_and_counted_where_collected(stage_limit):
    """Sparse latents count their collected non-finite entries (read back with the collection's sizes), and a
    non-finite neighbour shows as 0 in the windows, as a 0 would."""
    tokens, latents = random_batches(1, seed=12)[0]
    indices, values, _ = to_sparse(latents.abs() + 0.5)  # every entry above the threshold: all are neighbours
    excluded = torch.zeros(tokens.shape, dtype=torch.bool)
    excluded[2, 3] = True
    clean = values.clone()
    for (b, t, j), bad in zip([(0, 1, 0), (1, 2, 1), (2, 0, 2), (2, 3, 0)], [math.nan, math.inf, -math.inf, math.nan]):
        values[b, t, j] = bad
        clean[b, t, j] = 0.0
    state = {}
    for name, vals in (("bad", values), ("clean", clean)):
        c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
        c.update_sparse(tokens, indices, vals, 0, excluded=excluded)
        state[name] = padded_state(c.state_dict())
    assert int(state["bad"]["nonfinite_skipped"]) == 3  # the one at an excluded token is not collected
    assert int(state["clean"]["nonfinite_skipped"]) == 0
    for key in ("count", "sum", "top_values", "top_context_acts", "top_context_tokens"):
        assert torch.equal(state["bad"][key], state["clean"][key]), key


def test_memory_is_bounded_by_k_per_latent():
    c = SampleCollector(engine_config(F, K, CTX, THR), policy=MergePolicy(min_pool_slots=2))
    sizes = set()
    places = sum(table.rows * table.capacity for table in c.tables.values())
    for step, (tokens, latents) in enumerate(random_batches(6, seed=12)):
        c.update_dense(tokens, latents, step)
        staged = sum(table._staged_count for table in c.tables.values())
        assert c.window_pool.slots <= 2 * (places + staged)  # the windows kept and staged, shared by the tables
        state = c.state_dict()
        assert int(state["top"]["count"].max()) <= K
        sizes.add(tuple(padded_state(state)["top_context_tokens"].shape))
    assert sizes == {(F, K, 2 * (CTX // 2) + 1)}


def _samples(seen, threshold=THR, seq=6):
    """Every activation above the threshold: (latent, value, step, order, position)."""
    out = []
    for s in seen:
        for b in range(s.tokens.shape[0]):
            for p in range(seq):
                for f in range(F):
                    v = float(s.latents[b, p, f])
                    if v > threshold:
                        out.append((f, v, s.step, (s.rank << RANK_SHIFT) + (s.row_offset + b) * seq + p, p))
    return out


def test_interval_samples_are_the_reproducible_uniform_sample_of_each_interval(stage_limit):
    from lightning_sae_samples.engine.bins import interval_edges
    from lightning_sae_samples.engine.priority import sample_priority

    cfg = engine_config(F, K, CTX, THR, samples_per_interval=2, num_intervals=4, seed=3)
    c = SampleCollector(cfg, policy=stage_limit)
    seen = []
    for step, (tokens, latents) in enumerate(random_batches(12, seed=21)):
        latents = latents.abs() * 3
        c.update_dense(tokens, latents, step)
        seen.append(Seen(step, 0, 0, tokens, latents))
    state = padded_state(c.state_dict())
    edges = interval_edges(THR, 4)[1:-1].float().tolist()
    groups = {}
    for f, v, step, order, p in _samples(seen):
        interval = sum(1 for e in edges if v >= e)
        prio = float(sample_priority(step, torch.tensor([order]), 3)[0])
        groups.setdefault((f, interval), []).append((-prio, step, order, v, p))
    assert int(state["interval_count"].sum()) == sum(len(g) for g in groups.values())
    for (f, interval), group in groups.items():
        assert int(state["interval_count"][f, interval]) == len(group)
        want = sorted(group)[:2]
        got_values = state["interval_values"][f, interval]
        assert [float(v) for v in got_values[: len(want)]] == [w[3] for w in want]
        assert state["interval_step"][f, interval, : len(want)].tolist() == [w[1] for w in want]
        assert state["interval_position"][f, interval, : len(want)].tolist() == [w[4] for w in want]
    # a sample's interval holds it: values lie inside the interval's edges
    full_edges = interval_edges(THR, 4).tolist()
    kept = state["interval_values"]
    for interval in range(4):
        vals = kept[:, interval][torch.isfinite(kept[:, interval])]
        assert (vals.double() > full_edges[interval] * (1 - 1e-6) if interval else vals > THR).all()
        if interval < 3:
            assert (vals.double() < full_edges[interval + 1] * (1 + 1e-6)).all()


def test_interval_sampling_is_close_to_uniform():
    from lightning_sae_samples.engine.priority import sample_priority

    # the hash priority picks each of 8 candidates equally often over many independent sequences
    orders = torch.arange(8)
    wins = torch.zeros(8)
    for step in range(4000):
        wins[int(torch.argmax(sample_priority(step, orders)))] += 1
    assert wins.min() > 4000 / 8 * 0.8 and wins.max() < 4000 / 8 * 1.2


def test_recent_window_keeps_the_top_of_the_current_and_previous_block(stage_limit):
    cfg = engine_config(F, K, CTX, THR, recent_window_steps=3, recent_samples=2)
    c = SampleCollector(cfg, policy=stage_limit)
    seen = []
    for step, (tokens, latents) in enumerate(random_batches(11, seed=5)):
        c.update_dense(tokens, latents, step)
        seen.append(Seen(step, 0, 0, tokens, latents))
    state = padded_state(c.state_dict())
    assert state["recent_block"] == 10 // 3
    window = [s for s in seen if s.step // 3 >= 10 // 3 - 1]
    by_latent = {}
    for f, v, step, order, p in _samples(window):
        by_latent.setdefault(f, []).append((-v, step, order, p))
    from lightning_sae_samples.engine.sample_table import TABLE_FIELDS, merge_exported

    prev = {name: state[f"recent_prev_{name}"] for name in TABLE_FIELDS}
    cur = {name: state[f"recent_{name}"] for name in TABLE_FIELDS}
    merged = merge_exported(cur, prev, 2)
    for f in range(F):
        want = sorted(by_latent.get(f, []))[:2]
        got = merged["values"][f]
        assert [float(v) for v in got[torch.isfinite(got)]] == [-w[0] for w in want]
        assert merged["step"][f, : len(want)].tolist() == [w[1] for w in want]


def test_merge_with_interval_and_recent_tables_equals_single_process(stage_limit):
    cfg = engine_config(
        F, K, CTX, THR, samples_per_interval=2, num_intervals=3, recent_window_steps=2
    )
    single = SampleCollector(cfg, policy=stage_limit)
    ranks = [SampleCollector(cfg, policy=stage_limit) for _ in range(2)]
    for i, (tokens, latents) in enumerate(random_batches(10, seed=8)):
        step, rank = i // 2, i % 2
        order = rank << RANK_SHIFT
        ranks[rank].update_dense(tokens, latents, step, order)
        single.update_dense(tokens, latents, step, order)
    merged = padded_state(merge_states(ranks[0].state_dict(), ranks[1].state_dict()))
    want = padded_state(single.state_dict())
    for key in ("interval_values", "interval_priority", "interval_step", "interval_order", "interval_context_tokens",
                "interval_count", "recent_values", "recent_order", "recent_prev_values", "top_values", "top_order"):
        assert torch.equal(merged[key], want[key]), key


def repetitive_batches(n, seed=0, batch=3, seq=8):
    """Few distinct tokens (identical contexts across sequences) and latents firing on runs of tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 3, (batch, seq), generator=gen)
        latents = torch.round(torch.rand(batch, seq, F, generator=gen) * 4) / 2
        out.append((tokens, latents))
    return out


def assert_top_equals(state, feats):
    for f, feat in feats.items():
        got = state["top_values"][f]
        kept = int(torch.isfinite(got).sum())
        want = [(float(torch.tensor(s[0], dtype=torch.float32)), s[1], s[4], s[5]) for s in feat.samples]
        half = CTX // 2
        rows = [
            (float(got[j]), int(state["top_step"][f, j]), int(state["top_position"][f, j]),
             [t for t in state["top_context_tokens"][f, j].tolist() if t >= 0])
            for j in range(kept)
        ]
        assert rows == want, f
        for j in range(kept):
            assert int(state["top_context_tokens"][f, j, half]) >= 0


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_deduplicated_top_equals_oracle_with_the_same_rule(mode, stage_limit):
    cfg = engine_config(F, K, CTX, THR, deduplicate_contexts=True)
    c = SampleCollector(cfg, policy=stage_limit)
    seen = []
    for step, (tokens, latents) in enumerate(repetitive_batches(10, seed=1)):
        if mode == "sparse":
            indices, values, latents = to_sparse(latents)
            c.update_sparse(tokens, indices, values, step)
        else:
            c.update_dense(tokens, latents, step)
        seen.append(Seen(step, 0, 0, tokens, latents))
    state = padded_state(c.state_dict())
    feats = oracle(seen, F, K, CTX, THR, dedup=True)
    assert_top_equals(state, feats)
    # the rule holds: no two kept samples with identical contexts or overlapping windows in one sequence
    for f in range(F):
        kept = int(torch.isfinite(state["top_values"][f]).sum())
        contexts = [tuple(t for t in state["top_context_tokens"][f, j].tolist() if t >= 0) for j in range(kept)]
        assert len(set(contexts)) == kept
    plain = oracle(seen, F, K, CTX, THR)
    assert any(len(plain[f].samples) and plain[f].samples != feats[f].samples for f in range(F))


def test_deduplicated_merge_of_two_ranks_equals_oracle(stage_limit):
    cfg = engine_config(F, K, CTX, THR, deduplicate_contexts=True)
    ranks = [SampleCollector(cfg, policy=stage_limit) for _ in range(2)]
    seen = []
    for i, (tokens, latents) in enumerate(repetitive_batches(12, seed=2)):
        step, rank = i // 2, i % 2
        ranks[rank].update_dense(tokens, latents, step, order_base=rank << RANK_SHIFT)
        seen.append(Seen(step, rank, 0, tokens, latents))
    merged = merge_states(ranks[0].state_dict(), ranks[1].state_dict())
    assert_top_equals(padded_state(merged), oracle(seen, F, K, CTX, THR, dedup=True))
    resumed = SampleCollector.from_state_dict(merged)
    assert torch.equal(padded_state(resumed.state_dict())["top_hash"], padded_state(merged)["top_hash"])


def test_sparse_windows_do_not_leak_between_neighbouring_latents_of_one_sequence(stage_limit):
    # In (latent, token) order, latent 1 at the last token sits right before latent 2 at the first one.
    tokens = torch.arange(6).unsqueeze(0)
    latents = torch.zeros(1, 6, F)
    latents[0, 5, 1] = 1.5
    latents[0, 0, 2] = 2.0
    latents[0, 1, 2] = 1.0
    indices, values, dense = to_sparse(latents, k=2)
    sparse_c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    dense_c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    sparse_c.update_sparse(tokens, indices, values, 0)
    dense_c.update_dense(tokens, dense, 0)
    state = padded_state(sparse_c.state_dict())
    assert state["top_context_acts"][2, 0].tolist() == [0.0, 0.0, 2.0, 1.0, 0.0]
    assert state["top_context_acts"][1, 0].tolist() == [0.0, 0.0, 1.5, 0.0, 0.0]
    for key, value in padded_state(dense_c.state_dict()).items():
        if torch.is_tensor(value):
            assert torch.equal(value, state[key]), key


def test_padding_and_excluded_positions_equal_the_oracle_that_skips_them(stage_limit):
    c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    seen = []
    for step, (tokens, latents) in enumerate(random_batches(8, seed=13)):
        mask = torch.rand(tokens.shape, generator=torch.Generator().manual_seed(step)) > 0.3
        tokens = torch.where(mask, tokens, -100)
        tokens[0, 0] = -1  # a negative id is padding even where the mask says otherwise
        excluded = tokens == 3
        if step % 2:
            indices, values, latents = to_sparse(latents)
            c.update_sparse(tokens, indices, values, step, attention_mask=mask, excluded=excluded)
        else:
            c.update_dense(tokens, latents, step, attention_mask=mask, excluded=excluded)
        seen.append(Seen(step, 0, 0, tokens, latents, mask))
    assert_state_matches_oracle(c.state_dict(), seen, exclude=(3,))


# ---------------------------------------------------------------------- compact window dtypes
@pytest.mark.parametrize("mode", ["dense", "sparse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_latents_keep_the_oracle_samples_with_context_acts_in_their_own_dtype(mode, dtype, stage_limit):
    c = SampleCollector(engine_config(F, K, CTX, THR, samples_per_interval=1), policy=stage_limit)
    seen = []
    for step, (tokens, latents) in enumerate(random_batches(6, seed=21)):
        half = latents.to(dtype)  # the 0.5 grid is exact in both dtypes
        indices, values, dense = to_sparse(half)
        if mode == "dense":
            c.update_dense(tokens, half, step)
        else:
            c.update_sparse(tokens, indices, values, step)
        seen.append(Seen(step, 0, 0, tokens, (half if mode == "dense" else dense).float()))
    state = c.state_dict()
    for name in ("top", "interval"):
        assert state[name]["context_acts"].dtype == dtype
        assert state[name]["values"].dtype == torch.float32
    assert_state_matches_oracle(state, seen)


def test_a_token_id_that_needs_widening_mid_run_keeps_earlier_samples_exact(stage_limit):
    c = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    seen = []
    batches = random_batches(6, seed=23)
    for step, (tokens, latents) in enumerate(batches):
        if step == 3:
            assert c.state_dict()["top"]["context_tokens"].dtype == torch.int16
            tokens = tokens.clone()
            tokens[0, 2] = 40_000  # beyond int16
        c.update_dense(tokens, latents, step)
        seen.append(Seen(step, 0, 0, tokens, latents))
    state = c.state_dict()
    assert state["top"]["context_tokens"].dtype == torch.int32
    assert int(state["top"]["context_tokens"].max()) == 40_000
    assert_state_matches_oracle(state, seen)


def test_compact_window_dtypes_round_trip_through_torch_load_and_merges_widen(tmp_path, stage_limit):
    batches = random_batches(6, seed=25)
    straight = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    for step, (tokens, latents) in enumerate(batches):
        straight.update_dense(tokens, latents.bfloat16(), step)
    first = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    for step, (tokens, latents) in enumerate(batches[:3]):
        first.update_dense(tokens, latents.bfloat16(), step)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (loaded["top"]["context_tokens"].dtype, loaded["top"]["context_acts"].dtype) == (torch.int16, torch.bfloat16)
    resumed = SampleCollector.from_state_dict(loaded)
    for step, (tokens, latents) in enumerate(batches[3:], start=3):
        resumed.update_dense(tokens, latents.bfloat16(), step)
    a, b = straight.state_dict(), resumed.state_dict()
    assert b["top"]["context_acts"].dtype == torch.bfloat16
    a, b = padded_state(a), padded_state(b)
    for key, value in a.items():
        assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key

    # A rank that saw a wide token id and float32 latents merges with a narrow bfloat16 one: the merge widens.
    wide = SampleCollector(engine_config(F, K, CTX, THR), policy=stage_limit)
    seen = [Seen(step, 0, 0, tokens, latents.bfloat16().float()) for step, (tokens, latents) in enumerate(batches)]
    tokens, latents = random_batches(1, seed=26)[0]
    tokens[1, 1] = 50_000
    wide.update_dense(tokens, latents, 6, order_base=1 << RANK_SHIFT)
    seen.append(Seen(6, 1, 0, tokens, latents))
    merged = merge_states(straight.state_dict(), wide.state_dict())
    assert (merged["top"]["context_tokens"].dtype, merged["top"]["context_acts"].dtype) == (torch.int32, torch.float32)
    assert_state_matches_oracle(merged, seen)


# ---------------------------------------------------------------------- state_device
def test_state_device_keeps_the_collection_where_asked_with_identical_files(tmp_path):
    """``state_device="cpu"``: the state lives in host memory and the samples directory is the same.

    Only CPU runs here: this checks the argument's plumbing and results, not a copy from an accelerator.
    """
    from helpers import SyntheticSAE, assert_same, loader, read_dir, trainer

    from lightning_sae_samples import ActivationSampleCallback

    dirs = {}
    for name, device in (("default", None), ("cpu", "cpu")):
        callback = ActivationSampleCallback(
            collection_freq=1, dirpath=tmp_path / name, context_size=4, max_samples_per_feature=5,
            samples_per_feature_to_save=5, write_report=False, state_device=device,
        )
        trainer(tmp_path / f"run-{name}", [callback], max_steps=6).fit(
            SyntheticSAE(mode="sparse", num_latents=10), loader()
        )
        assert callback.engine.collector.device == torch.device("cpu")
        assert callback.settings.device == (None if device is None else torch.device("cpu"))
        dirs[name] = read_dir(tmp_path / name)
    state = dirs["default"].pop("full_state.pt")
    assert_same(state, dirs["cpu"].pop("full_state.pt"))
    assert dirs["default"].keys() == dirs["cpu"].keys()
    for file, record in dirs["default"].items():
        assert record == dirs["cpu"][file], file


def test_a_bad_state_device_is_a_clear_error():
    from lightning_sae_samples import ActivationSampleCollector

    with pytest.raises(ValueError, match="state_device"):
        ActivationSampleCollector(state_device="no-such-device")


def test_latents_that_require_grad_leave_no_graph_in_the_state():
    """The update methods run without autograd: nothing kept holds the SAE's graph."""
    c = SampleCollector(engine_config(F, K, CTX, THR))
    tokens, latents = random_batches(1, seed=13)[0]
    latents = (latents * torch.ones((), requires_grad=True)).abs()
    indices, values, _ = to_sparse(latents)
    c.update_sparse(tokens, indices, values, 0)
    c.update_dense(tokens, latents, 1)
    kept = [value for value in c.state_dict()["top"].values() if torch.is_tensor(value)]
    assert values.requires_grad and not any(t.requires_grad for t in kept + [c.sum, c.max, c.min])


@pytest.mark.parametrize("options", [{}, {"recent_window_steps": 2, "deduplicate_contexts": True}],
                         ids=["defaults", "recent-and-dedup"])
def test_the_tables_share_one_window_pool_and_every_slot_is_held_or_free(options):
    """Each window is written once whichever tables keep it, and no slot is lost: every slot is held by exactly
    the tables that keep or stage its sample, or is free (given back), through merges, evictions and window resets."""
    config = engine_config(F, K, CTX, THR, samples_per_interval=1, num_intervals=2, **options)
    c = SampleCollector(config, policy=MergePolicy(stage_limit=7, min_pool_slots=2))
    assert len({id(table.window_pool) for table in c.tables.values()}) == 1
    pool = c.window_pool
    for step, (tokens, latents) in enumerate(random_batches(8, seed=21)):
        indices, values, _ = to_sparse(latents, 3)
        c.update_sparse(tokens, indices, values, step)
        if step == 4:
            c.reset_window(step)
        held = torch.zeros(pool.slots + 1, dtype=torch.int64)
        for table in c.tables.values():
            kept = table.slot[table.slot != -1].long()
            staged = [part["slot"] for part in table._staged]
            for slots in (kept, *staged):
                held.index_add_(0, slots, torch.ones_like(slots))
        used = held[: pool.next_unused]
        assert torch.equal(pool.refs[: pool.next_unused].long(), used), f"step {step}: a count is off"
        waiting = torch.cat([pool.released, *[s[s != -1].long() for s in pool._letting_go]])
        assert len(waiting.unique()) == len(waiting) and not bool(used[waiting].any()), "a held slot is free"
        assert int((used > 0).sum()) + len(waiting) == pool.next_unused, f"step {step}: slots leaked"
    sampled = sum(int((table.slot != -1).sum()) for table in c.tables.values())
    assert int((pool.refs[: pool.next_unused] > 0).sum()) < sampled, "no window is shared by two tables"
