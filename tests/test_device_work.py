"""What one collection asks of the device: host synchronisations and operators dispatched, counted exactly.

On a GPU each operator is a kernel launch and each synchronisation stalls the stream, so these counts, not
the CPU time, are what a user training on a GPU feels. They are deterministic: a ``TorchDispatchMode`` counts
them on the CPU (see :mod:`lightning_sae_samples.engine.syncs`).
"""

import pytest
import torch

from lightning_sae_samples.config import CollectionConfig
from lightning_sae_samples.engine import SampleCollector
from lightning_sae_samples.engine.rows import TokenWindows
from lightning_sae_samples.engine.syncs import DeviceWork

#: Targets of a collection with the defaults (history window and interval samples on).
MAX_SYNCS = 4
MAX_OPERATORS = 150

F, TOPK, BATCH, SEQ = 4096, 16, 8, 128


def topk_batches(count: int, seed: int = 0):
    """TopK codes in which a token shares some latents with the token before it (so context windows have
    neighbours to read), as real SAEs' latents do."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        tokens = torch.randint(0, 30_000, (BATCH, SEQ), generator=gen)
        indices = torch.randint(0, F, (BATCH, SEQ, TOPK), generator=gen)
        indices[:, 1:, : TOPK // 4] = indices[:, :-1, : TOPK // 4]
        indices = indices + torch.arange(TOPK) * (F // TOPK)  # distinct within a token
        values = torch.rand(BATCH, SEQ, TOPK, generator=gen) * 5
        yield tokens, indices % F, values


def counted_collections(config: CollectionConfig, collections: int = 6, dense: bool = False,
                        rows: bool = False) -> list[DeviceWork]:
    collector = SampleCollector(config)
    counts = []
    for step, (tokens, indices, values) in enumerate(topk_batches(collections)):
        if dense:
            latents = torch.zeros(BATCH, SEQ, F).scatter_(2, indices, values)
        if rows:
            half = config.half_window
            padded = torch.nn.functional.pad(tokens, (half, half), value=-1)
            windows = TokenWindows(
                padded.unfold(1, 2 * half + 1, 1).reshape(-1, 2 * half + 1),
                torch.arange(SEQ).repeat(BATCH), torch.arange(BATCH).repeat_interleave(SEQ),
            )
            order = torch.randperm(BATCH * SEQ, generator=torch.Generator().manual_seed(step))
            refs = order.clone()
        with DeviceWork() as work:
            if rows:
                collector.update_rows_sparse(windows, indices.view(-1, TOPK), values.view(-1, TOPK), step, order,
                                             refs=refs)
            elif dense:
                collector.update_dense(tokens, latents, step)
            else:
                collector.update_sparse(tokens, indices, values, step)
        counts.append(work)
    return counts


def settings(**changes) -> CollectionConfig:
    return CollectionConfig(num_latents=F, activation_threshold=0.1, **changes)


def describe(counts: list[DeviceWork]) -> str:
    return "; ".join(f"{w.operators} ops, {w.num_syncs} syncs {dict(w.syncs)}" for w in counts)


def test_a_collection_with_the_defaults_syncs_at_most_four_times_merges_included():
    counts = counted_collections(settings())
    assert all(w.num_syncs <= MAX_SYNCS for w in counts), describe(counts)


#: Operators of a collection without a merge, and of one in which tables merge, reached so far: ceilings that
#: catch a regression while the target above is not met (defaults: 186-189 and 305-439; recent window: 212-213
#: and 326-579; the code before these ceilings took 227-229 and 384-546, 251-252 and 401-720).
REACHED = {"defaults": (189, 439), "recent": (213, 579)}


@pytest.mark.xfail(strict=True, reason="186-189 operators without a merge, 305-439 with one: the target is not met")
def test_a_collection_with_the_defaults_dispatches_at_most_150_operators():
    counts = counted_collections(settings())
    assert all(w.operators <= MAX_OPERATORS for w in counts), describe(counts)


@pytest.mark.parametrize("option", [{}, {"recent_window_steps": 2}], ids=["defaults", "recent"])
def test_a_collection_dispatches_no_more_operators_than_reached(option, request):
    without_merge, with_merges = REACHED[request.node.callspec.id]
    counts = counted_collections(settings(**option))
    merging = [w for w in counts if w.num_syncs > 1]  # a merge reads its sizes back in a sync of its own
    alone = [w for w in counts if w.num_syncs == 1]
    assert merging and alone, describe(counts)
    assert all(w.operators <= without_merge for w in alone), describe(counts)
    assert all(w.operators <= with_merges for w in merging), describe(counts)


@pytest.mark.parametrize("option", [
    {"recent_window_steps": 2}, {"deduplicate_contexts": True},
    {"history_samples_per_feature": 0}, {"samples_per_interval": 0}, "dense", "rows",
], ids=["recent", "dedup", "no-history", "no-intervals", "dense", "rows"])
def test_no_option_adds_host_synchronisations(option):
    if option in ("dense", "rows"):
        counts = counted_collections(settings(), dense=option == "dense", rows=option == "rows")
    else:
        counts = counted_collections(settings(**option))
    assert all(w.num_syncs <= MAX_SYNCS for w in counts), describe(counts)


def test_dense_latents_read_in_many_blocks_sync_no_more(monkeypatch):
    from lightning_sae_samples.engine import windows

    monkeypatch.setattr(windows, "DENSE_SCAN_ELEMENTS", 64 * F)  # 16 blocks of 64 rows
    counts = counted_collections(settings(), collections=4, dense=True)
    assert all(w.num_syncs <= MAX_SYNCS for w in counts), describe(counts)


def test_the_counter_sees_each_kind_of_synchronisation():
    x = torch.arange(6)
    with DeviceWork() as work:
        (x > 2).nonzero()
        int(x.max())
        x.tolist()
        x[x > 3]
        torch.unique(x)
        x.cpu()
        torch.nonzero_static(x > 2, size=3)  # a size given up front: no wait
    assert dict(work.syncs) == {"nonzero": 1, "_local_scalar_dense": 1, ".tolist()": 1, "index[bool]": 1,
                                "_unique2": 1, ".cpu()": 1}


def test_the_tokens_seen_of_a_collection_come_back_with_its_one_sync():
    """The callback's health check reads them after every collection: a tensor would stall the stream again."""
    collector = SampleCollector(settings())
    tokens, indices, values = next(topk_batches(1))
    tokens[0, :5] = -1  # padding
    with DeviceWork() as work:
        collector.update_sparse(tokens, indices, values, 0)
        seen = int(collector.last_seen)
    assert work.num_syncs == 1 and isinstance(collector.last_seen, int) and seen == BATCH * SEQ - 5


@pytest.mark.parametrize("static", [True, False], ids=["nonzero_static", "without it"])
def test_one_search_finds_every_masks_entries(static, monkeypatch):
    from lightning_sae_samples.engine.indices import indices_of_rows

    if not static:  # a device without nonzero_static takes the cumulative-sum path
        def missing(*args, **kwargs):
            raise NotImplementedError("nonzero_static")

        monkeypatch.setattr(torch, "nonzero_static", missing)
    masks = torch.rand(4, 50, generator=torch.Generator().manual_seed(3)) > 0.6
    masks[2] = False
    counts = masks.sum(1).tolist()
    found = indices_of_rows(masks, counts)
    assert [f.tolist() for f in found] == [row.nonzero().view(-1).tolist() for row in masks]
    assert all(f.is_contiguous() for f in found)
