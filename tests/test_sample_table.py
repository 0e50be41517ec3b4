"""SampleTable against a plain-Python model: every row keeps its exact top-k, whatever stages, merges or moves.

The model keeps every sample offered to a row and sorts them (priority descending, then earliest step and
order); the table must hold the first ``capacity`` of them, with each sample's own window.
"""

import pytest
import torch
from oracle import deduplicate

from lightning_sae_samples.engine.sample_table import EMPTY, BatchContext, MergePolicy, SampleTable

ROWS, CAP, HALF, SEQ, NSEQ = 5, 3, 1, 6, 2
W = 2 * HALF + 1


def window_of(tokens, b, t):
    return tuple(tokens[b][p] if 0 <= p < SEQ else EMPTY for p in range(t - HALF, t + HALF + 1))


def offer(table, model, tokens, rows, priority, step, random=False):
    """Offer the batch's samples (one per token, ``rows[i]`` its row) to the table and to the model."""
    token_idx = torch.arange(NSEQ * SEQ)
    # an activation table's priority is the fp32 activation; a random table's is a float64 hash beside it
    priority = priority if random else priority.float()
    value = priority if not random else torch.arange(NSEQ * SEQ, dtype=torch.float32)

    def window_acts(candidate):  # a sample's "activations": its value at every window place, to track it
        return value[candidate].unsqueeze(1).expand(-1, W).clone()

    batch = BatchContext(tokens, token_idx, step, 0, HALF, window_acts)
    may = table.can_enter(rows, priority)
    candidate = may.nonzero(as_tuple=True)[0]
    batch.compute_windows(candidate)
    table.insert(rows[candidate], candidate, priority[candidate], value[candidate], batch)
    listed = tokens.tolist()
    for i in range(NSEQ * SEQ):
        b, t = divmod(i, SEQ)
        model.setdefault(int(rows[i]), []).append(
            (float(priority[i]), step, 0, b, t, window_of(listed, b, t), float(value[i]))
        )


def expected(model, capacity, radius=None):
    out = {}
    for row, samples in model.items():
        kept = samples
        if radius is not None:  # contexts compare as their tokens inside the sequence
            proxies = [(*s[:5], tuple(t for t in s[5] if t >= 0), s) for s in samples]
            kept = [proxy[6] for proxy in deduplicate(proxies, radius)]
        out[row] = sorted(kept, key=lambda s: (-s[0], s[1], s[3] * SEQ + s[4]))[:capacity]
    return out


def assert_table_equals_model(table, model, capacity=CAP, radius=None):
    exported = table.export()
    want = expected(model, capacity, radius)
    start = 0
    for row in range(table.rows):
        count = int(exported["count"][row])
        rows_want = want.get(row, [])
        assert count == len(rows_want), f"row {row}: {count} kept, model keeps {len(rows_want)}"
        for j, s in enumerate(rows_want):
            i = start + j
            key = "priority" if table.random_priority else "values"
            assert float(exported[key][i]) == pytest.approx(s[0]), (row, j)
            assert int(exported["step"][i]) == s[1] and int(exported["order"][i]) == s[3] * SEQ + s[4], (row, j)
            assert int(exported["position"][i]) == s[4], (row, j)
            assert tuple(exported["context_tokens"][i].tolist()) == s[5], f"row {row} sample {j}: window moved"
            assert exported["context_acts"][i].tolist() == [pytest.approx(s[6])] * W, f"row {row} sample {j}"
        start += count
    assert start == len(exported["values"])


def random_batch(gen, vocab=9):
    tokens = torch.randint(0, vocab, (NSEQ, SEQ), generator=gen)
    rows = torch.randint(0, ROWS, (NSEQ * SEQ,), generator=gen)
    priority = torch.randint(1, 8, (NSEQ * SEQ,), generator=gen).double() / 2  # many ties
    return tokens, rows, priority


@pytest.mark.parametrize("stage_limit", [1, 4, 10**6], ids=["merge-every-insert", "merge-every-4", "merge-at-read"])
def test_staged_merges_keep_the_exact_top_k_with_their_windows(stage_limit):
    table, model = SampleTable(ROWS, CAP, W, torch.device("cpu"), policy=MergePolicy(stage_limit=stage_limit)), {}
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        offer(table, model, *random_batch(gen), step=step)
        if step in (0, 5):
            assert_table_equals_model(table, model)  # reading merges what is staged
    assert_table_equals_model(table, model)


def test_random_priority_rows_keep_the_largest_priorities():
    policy = MergePolicy(stage_limit=3)
    table, model = SampleTable(ROWS, 2, W, torch.device("cpu"), random_priority=True, policy=policy), {}
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        tokens, rows, _ = random_batch(gen)
        priority = torch.randint(0, 2**31, (NSEQ * SEQ,), generator=gen).double()
        offer(table, model, tokens, rows, priority, step, random=True)
    assert_table_equals_model(table, model, capacity=2)


def test_pushed_out_samples_give_their_slots_to_the_samples_that_enter():
    table, model = SampleTable(ROWS, CAP, W, torch.device("cpu"), policy=MergePolicy(stage_limit=1)), {}
    gen = torch.Generator().manual_seed(2)
    for step in range(30):
        tokens, rows, _ = random_batch(gen)
        priority = torch.full((NSEQ * SEQ,), float(step + 1), dtype=torch.float64)  # every batch beats the last
        priority += torch.rand(NSEQ * SEQ, generator=gen, dtype=torch.float64)
        offer(table, model, tokens, rows, priority, step)
        # Slots are reused: the pool holds the table's places, the staged batch, and the slots the last merge
        # gave back (free from the next merge's read-back on).
        batch = NSEQ * SEQ
        assert table.window_pool.next_unused <= ROWS * CAP + 2 * batch, table.window_pool.next_unused
        assert table.pool_slots <= ROWS * CAP + 2 * batch
    assert_table_equals_model(table, model)
    kept = table.slot[table.slot != EMPTY]
    assert len(kept.unique()) == len(kept), "two kept samples share a pool slot"


def test_the_pool_grows_with_the_samples_stored():
    rows, cap = 40, 4
    policy = MergePolicy(stage_limit=1, min_pool_slots=2)
    table, model = SampleTable(rows, cap, W, torch.device("cpu"), policy=policy), {}
    assert table.pool_slots == 0
    gen = torch.Generator().manual_seed(3)
    sizes = []
    for step in range(10):
        tokens = torch.randint(0, 9, (NSEQ, SEQ), generator=gen)
        row = torch.full((NSEQ * SEQ,), step, dtype=torch.int64)  # a new row per batch: every sample enters
        priority = torch.rand(NSEQ * SEQ, generator=gen, dtype=torch.float64) + 1
        offer(table, model, tokens, row, priority, step)
        stored = int((table.slot != EMPTY).sum())
        # It holds the samples stored and, until a later read-back frees them, the batches staged last.
        held = stored + 2 * NSEQ * SEQ
        assert stored <= table.pool_slots < 2 * held + 1, (stored, table.pool_slots)
        sizes.append(table.pool_slots)
    assert sizes == sorted(sizes) and sizes[-1] < rows * cap
    assert_table_equals_model(table, model, capacity=cap)  # windows survive every growth


def test_deduplicated_rows_evict_a_kept_sample_when_a_better_one_of_its_context_arrives():
    radius = 2 * HALF
    policy = MergePolicy(stage_limit=2)
    table, model = SampleTable(ROWS, CAP, W, torch.device("cpu"), dedup_radius=radius, policy=policy), {}
    evicted, evict = [], table._evict
    table._evict = lambda rows, columns, gone: (evicted.append(int(gone.sum())), evict(rows, columns, gone))
    gen = torch.Generator().manual_seed(4)
    for step in range(15):
        offer(table, model, *random_batch(gen, vocab=2), step=step)  # two tokens: contexts repeat often
        assert_table_equals_model(table, model, radius=radius)
    assert sum(evicted) > 0, "the batches never replaced a kept sample of the same context"
    kept = table.slot[table.slot != EMPTY]
    assert len(kept.unique()) == len(kept) and not set(kept.tolist()) & set(table.released.tolist())


def test_load_of_an_export_continues_exactly():
    gen = torch.Generator().manual_seed(5)
    batches = [random_batch(gen) for _ in range(10)]
    straight, model = SampleTable(ROWS, CAP, W, torch.device("cpu"), policy=MergePolicy(stage_limit=3)), {}
    first = SampleTable(ROWS, CAP, W, torch.device("cpu"), policy=MergePolicy(stage_limit=3))
    for step, batch in enumerate(batches):
        offer(straight, model, *batch, step=step)
        if step < 5:
            offer(first, {}, *batch, step=step)
    resumed = SampleTable(ROWS, CAP, W, torch.device("cpu"), policy=MergePolicy(stage_limit=3))
    resumed.load(first.export())
    assert resumed.pool_slots >= int(first.export()["count"].sum())
    for step, batch in enumerate(batches[5:], start=5):
        offer(resumed, {}, *batch, step=step)
    assert_table_equals_model(resumed, model)
    with pytest.raises(ValueError, match="cannot load into 6 rows of capacity 3"):
        SampleTable(ROWS + 1, CAP, W, torch.device("cpu")).load(straight.export())
    with pytest.raises(ValueError, match="cannot load into 5 rows of capacity 2"):
        SampleTable(ROWS, CAP - 1, W, torch.device("cpu")).load(straight.export())
