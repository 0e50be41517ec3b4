import pytest
import torch

from lightning_sae_samples.engine.dedup import OverlapRounds, best_of_each_class, context_hash, suppress_overlaps


def greedy(group, position, value, radius):
    keep = [False] * len(group)
    accepted = []
    for i in sorted(range(len(group)), key=lambda i: (-float(value[i]), int(position[i]))):
        if all(group[i] != group[j] or abs(int(position[i]) - int(position[j])) > radius for j in accepted):
            accepted.append(i)
            keep[i] = True
    return keep


def test_parallel_suppression_equals_sequential_greedy():
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n_groups, seq = 4, 30
        pairs = torch.randperm(n_groups * seq, generator=gen)[: 60]
        group, position = pairs // seq, pairs % seq
        value = torch.round(torch.rand(60, generator=gen) * 6) / 2
        radius = trial % 5
        assert suppress_overlaps(group, position, value, radius).tolist() == greedy(group, position, value, radius)


def test_a_monotone_ramp_resolves_to_every_other_peak():
    position = torch.arange(12)
    keep = suppress_overlaps(torch.zeros(12, dtype=torch.long), position, position.float(), 1)
    assert keep.tolist() == greedy([0] * 12, position, position.float(), 1)
    assert keep[11] and not keep[10] and keep[9]


@pytest.mark.parametrize("radius", [1, 2, 5])
def test_the_bounded_rounds_settle_long_chains_and_full_sequences(radius):
    """The rounds run a number fixed by the read-back sizes, with no check: chains as long as the sequence settle."""
    seq = 60
    position = torch.arange(seq).repeat(3)
    group = torch.arange(3).repeat_interleave(seq)
    ramps = torch.cat([torch.arange(seq).float(), -torch.arange(seq).float(),
                       torch.rand(seq, generator=torch.Generator().manual_seed(radius))])
    assert suppress_overlaps(group, position, ramps, radius).tolist() == greedy(group, position, ramps, radius)


def test_one_pass_over_a_batch_keeps_only_valid_entries_and_splits_groups_by_sequence():
    gen = torch.Generator().manual_seed(3)
    cell = torch.randperm(3 * 4 * 40, generator=gen)[:300]  # distinct (latent, sequence, position), shuffled
    latent, sequence, position = cell // 160, cell // 40 % 4, cell % 40
    value = torch.round(torch.rand(300, generator=gen) * 8) / 2
    valid = torch.rand(300, generator=gen) < 0.8
    rounds = OverlapRounds(latent, sequence, position, value, valid, 2)
    keep = rounds.keep(rounds.sizes.tolist())
    at = valid.nonzero(as_tuple=True)[0]
    want = greedy((latent * 4 + sequence)[at].tolist(), position[at], value[at], 2)
    assert keep[at].tolist() == want and bool(keep[~valid].all())


def test_context_hash_ignores_padding_side_and_tells_contexts_apart():
    a = torch.tensor([[-1, 5, 6, 7], [5, 6, 7, -1], [5, 6, 8, -1], [-1, -1, 5, 6]])
    h = context_hash(a)
    assert h[0] == h[1] and h[1] != h[2] and h[0] != h[3]


def test_best_of_each_class_keeps_the_first_in_preference_order():
    row = torch.tensor([0, 0, 0, 1, 1])
    key = torch.tensor([7, 7, 8, 7, 7])
    pref = torch.tensor([2, 0, 1, 4, 3])
    assert best_of_each_class(row, key, pref).tolist() == [False, True, True, False, True]
