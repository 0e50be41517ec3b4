"""The histogram's and the intervals' bins of a value: a table lookup that gives exactly ``torch.bucketize``'s bins."""

import math

import pytest
import torch

from lightning_sae_samples.engine.bins import BinLookup, histogram_edges, interval_edges


def values_around(edges: torch.Tensor) -> torch.Tensor:
    """float32 values at, just above and just below every edge, special values, and every kind of bit pattern."""
    gen = torch.Generator().manual_seed(0)
    nearest = edges.float()
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1e-3, 0.1, 1e4])
    return torch.cat([
        special, nearest, torch.nextafter(nearest, torch.tensor(math.inf)),
        torch.nextafter(nearest, torch.tensor(-math.inf)),
        torch.randn(20_000, generator=gen) * 10, (torch.rand(20_000, generator=gen) * 80 - 40).exp2(),
        torch.randint(-(2**31), 2**31 - 1, (50_000,), dtype=torch.int32, generator=gen).view(torch.float32),
    ])


@pytest.mark.parametrize("edges", [
    histogram_edges(0.1)[1:-1], histogram_edges(0.0)[1:-1], histogram_edges(2000.0)[1:-1],
    interval_edges(0.1, 8)[1:-1], interval_edges(0.5, 2)[1:-1],
    torch.tensor([-2.0, -0.7, 0.0, 0.3, 0.3000001, 3.0], dtype=torch.float64),  # signs, zero, an edge 1 ulp off
    torch.tensor([0.51, 0.52, 0.5200001], dtype=torch.float64),  # closer than the finest cell: bucketize
], ids=["hist-0.1", "hist-0", "hist-2000", "intervals-8", "intervals-2", "signed", "close"])
def test_a_float32_value_gets_the_bin_of_the_float64_edges(edges):
    values = values_around(edges)
    want = torch.bucketize(values.double(), edges, right=True)
    (got,) = BinLookup([edges])(values)
    assert got.dtype == torch.int64
    compared = ~values.isnan()  # NaN is never a valid entry; its bin needs only to be a bin
    assert torch.equal(got[compared], want[compared])
    assert bool(((got >= 0) & (got <= len(edges))).all())


def test_each_set_of_edges_gets_its_own_bins_from_one_lookup():
    sets = [histogram_edges(0.1)[1:-1], interval_edges(0.1, 8)[1:-1], interval_edges(0.3, 3)[1:-1]]
    lookup = BinLookup(sets)
    assert lookup.shift is not None  # the default edges are looked up, not searched
    values = values_around(torch.cat(sets))
    compared = ~values.isnan()
    for got, edges in zip(lookup(values), sets):
        assert torch.equal(got[compared], torch.bucketize(values.double(), edges, right=True)[compared])


def test_edges_closer_than_the_finest_cell_are_searched():
    assert BinLookup([torch.tensor([0.51, 0.52, 0.5200001], dtype=torch.float64)]).shift is None


def test_other_float_dtypes_are_binned_by_the_float64_edges():
    edges = histogram_edges(0.1)[1:-1]
    values = torch.tensor([0.1, 0.13335214321633237, 0.1333521432163324, 7.0, 1e5], dtype=torch.float64)
    assert torch.equal(BinLookup([edges])(values)[0], torch.bucketize(values, edges, right=True))
