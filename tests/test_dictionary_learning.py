"""dictionary_learning's ``trainSAE`` transforms each batch (whole-batch normalization, a bfloat16 cast): refs kept
beside the activations (``RowsWithRefs``) never see them, and refs packed as columns are refused, not bent.

``dictionary-learning`` 0.1.0 does not install beside this project's torch (docs/integrations.md), so the suite
runs ``trainSAE``'s loop as written in its ``training.py`` (``train_sae_like_dictionary_learning`` below: the
norm factor of ``get_norm_factor(data, steps=100)``, then per step ``act = act.to(dtype=autocast_dtype)``,
``act /= norm_factor``, ``trainer.update(step, act)``; autocast is a ``nullcontext`` on CPU). Where
``dictionary_learning`` imports, the last test drives its own ``trainSAE`` and ``TopKTrainer``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import read_dir
from oracle import RowsSeen, assert_dir_matches_oracle, assert_state_matches
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_sae_samples import ActivationSampleCollector, LatentInputError, RowsWithRefs
from lightning_sae_samples.integrations.dictionary_learning import with_samples
from lightning_sae_samples.token_sources import ArrayTokenSource

S, T, D, F, K, BATCH = 24, 10, 6, 12, 3, 16
SETTINGS = dict(context_size=4, activation_threshold=0.0, max_samples_per_feature=4, samples_per_feature_to_save=4,
                write_report=False)


def corpus(seed=0):
    """Tokens ``[S, T]`` and activations ``[S*T, D]`` far from unit norm (the normalization divides them)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 40, (S, T), generator=g), torch.randn(S * T, D, generator=g) * 7 + 3


def shuffled_rows(acts, seed=0):
    """Batches of (activations, refs) from a shuffling DataLoader over cached activations, epoch after epoch."""
    loader = DataLoader(TensorDataset(acts, torch.arange(len(acts))), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), drop_last=True)
    return itertools.chain.from_iterable(itertools.repeat(loader))


def train_sae_like_dictionary_learning(data, trainers, steps, normalize_activations, autocast_dtype):
    """The batch transforms of dictionary_learning 0.1.0's ``trainSAE`` on CPU, in its order; the norm factor."""
    norm_factor = None
    if normalize_activations:  # get_norm_factor(data, steps=100): draws 102 batches from `data`, averages 101
        total, count = 0.0, 0
        for step, act in enumerate(data):
            if step > 100:
                break
            count += 1
            total += torch.mean(torch.sum(act**2, dim=1))
        norm_factor = torch.sqrt(total / count).item()
    for step, act in enumerate(data):
        act = act.to(dtype=autocast_dtype)
        if normalize_activations:
            act /= norm_factor
        if step >= steps:
            break
        for trainer in trainers:
            trainer.update(step, act)
    return norm_factor


class TinyTopK(torch.nn.Module):
    """A TopK autoencoder with dictionary_learning's ``encode`` (dense ``[N, F]``, the top k kept)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(D, F)
        self.decoder = torch.nn.Linear(F, D)

    def encode(self, x):
        acts = torch.relu(self.encoder(x))
        top = acts.topk(K, dim=-1)
        return torch.zeros_like(acts).scatter(-1, top.indices, top.values)


class TopKLikeTrainer:
    """What ``trainSAE`` asks of a trainer: ``ae``, ``update(step, x)`` (one optimizer step), ``config``."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.ae = TinyTopK()
        self.optimizer = torch.optim.Adam(self.ae.parameters(), lr=1e-2)
        self.seen = []

    def update(self, step, x):
        x_in, x = x.clone(), x.float()
        with torch.no_grad():
            self.seen.append((step, (x_in, self.ae.encode(x))))
        loss = (self.ae.decoder(self.ae.encode(x)) - x).pow(2).sum(-1).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()

    @property
    def config(self):
        return {"trainer_class": type(self).__name__}


class RecordingCollector(ActivationSampleCollector):
    """Keeps the refs and latents it is fed, for the oracle."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed = []

    def update(self, tokens=None, *, token_refs=None, latents=None, step, **kwargs):
        self.fed.append((step, token_refs.clone(), latents.detach().float().clone()))
        super().update(tokens, token_refs=token_refs, latents=latents, step=step, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalized_and_cast_batches_collect_the_contexts_their_refs_name(tmp_path, dtype):
    tokens, acts = corpus()
    source = ArrayTokenSource(tokens)
    rows = RowsWithRefs(shuffled_rows(acts), source)
    collector = RecordingCollector(num_latents=F, token_source=source, **SETTINGS)
    trainer = with_samples(TopKLikeTrainer)(collector=collector, rows=rows, collection_freq=2)
    steps = 12
    norm = train_sae_like_dictionary_learning(rows, [trainer], steps, True, dtype)
    assert norm > 5 and rows.batches_yielded == 102 + steps + 1  # norm estimate, steps, the one that ends the loop
    assert [s for s, _, _ in collector.fed] == list(range(0, steps, 2))
    trained = dict(trainer.seen)
    for step, refs, latents in collector.fed:
        # The batch the trainer trained on is the normalized, cast activations of exactly the rows the refs name,
        # and the collector got the trainer's own latents of it.
        want = acts[refs].to(dtype)
        want /= norm
        trained_on, trained_latents = trained[step]
        assert torch.equal(trained_on, want) and torch.equal(latents, trained_latents)
    seen = [RowsSeen(step, 0, refs.tolist(), latents, source=tokens, call=i)
            for i, (step, refs, latents) in enumerate(collector.fed)]
    assert_state_matches(collector.with_windows(collector.state_dict()["collector"]), seen, F, 4, 4, 0.0)
    collector.save(tmp_path / "samples")
    assert_dir_matches_oracle(read_dir(tmp_path / "samples"), seen, F, 4, 4, 0.0)


def test_refs_packed_as_columns_are_refused_when_the_trainer_normalizes_or_casts():
    """The route this replaces: refs as extra columns of the activations, split off in the trainer's update."""
    from lightning_sae_samples.integrations.sae_lens import pack_refs, unpack_refs

    tokens, acts = corpus()
    packed = (pack_refs(a, r) for a, r in shuffled_rows(acts))

    class UnpackingTrainer(TopKLikeTrainer):
        def update(self, step, x):
            rows, refs = unpack_refs(x, D)
            return super().update(step, rows)

    with pytest.raises(ValueError, match="changed after pack_refs.*RowsWithRefs"):  # r / 11.9 would be in range
        train_sae_like_dictionary_learning(packed, [UnpackingTrainer()], 4, True, torch.float32)
    with pytest.raises(ValueError, match="cast after packing.*RowsWithRefs"):
        train_sae_like_dictionary_learning(packed, [UnpackingTrainer()], 4, False, torch.bfloat16)


def test_refs_for_takes_the_trainers_copy_and_refuses_another_batch():
    tokens, acts = corpus()
    rows = RowsWithRefs(shuffled_rows(acts), ArrayTokenSource(tokens))
    with pytest.raises(LatentInputError, match="no batch was yielded yet"):
        rows.refs_for(acts[:BATCH])
    first = next(rows)
    refs = rows.refs_for(first)
    assert torch.equal(first, acts[refs])
    for copy in (first * 0.01, first.bfloat16(), first.double() / 3, first.clone()):
        assert rows.refs_for(copy) is refs
    second = next(rows)
    for wrong, why in ((first, "not the batch yielded last"), (second.flip(0), "not the batch yielded last"),
                       (second[:-1], "is not the"), (-second, "not the batch yielded last")):
        with pytest.raises(LatentInputError, match=why):
            rows.refs_for(wrong)
    assert torch.equal(second, acts[rows.refs_for(second)])


def test_rows_with_refs_checks_what_the_data_source_yields():
    for bad, message in (
        ([torch.randn(4, D)], r"must be \(activations \[N, d\], refs \[N\]\)"),
        ([(torch.randn(4, D), torch.arange(3))], "4 activation rows and 3 refs"),
        ([(torch.randn(4, D), torch.arange(4.0))], "must hold integer token refs"),
        ([(torch.arange(4), torch.arange(4))], r"float \[N, d\] tensor"),
    ):
        with pytest.raises((ValueError, LatentInputError), match=message):
            next(RowsWithRefs(bad, None))


def test_with_samples_needs_a_collector_and_the_rows():
    with pytest.raises(TypeError, match="trainer class"):
        with_samples(TopKLikeTrainer())
    cls = with_samples(TopKLikeTrainer)
    assert cls.__name__ == "SamplesTopKLikeTrainer" and issubclass(cls, TopKLikeTrainer)
    with pytest.raises(TypeError, match="`rows` must be the RowsWithRefs"):
        cls(collector=ActivationSampleCollector(num_latents=F), rows=iter([]))


def test_dictionary_learnings_own_train_sae_with_normalization_and_bfloat16(tmp_path):
    """Runs where ``dictionary_learning`` imports (its own environment: see docs/integrations.md)."""
    training = pytest.importorskip("dictionary_learning.training", reason="dictionary-learning is not installed")
    from dictionary_learning.trainers.top_k import TopKTrainer

    tokens, acts = corpus()
    source = ArrayTokenSource(tokens)
    rows = RowsWithRefs(shuffled_rows(acts), source)
    collector = RecordingCollector(num_latents=F, token_source=source, **SETTINGS)
    steps = 10
    config = dict(trainer=with_samples(TopKTrainer), collector=collector, rows=rows, collection_freq=3, steps=steps,
                  activation_dim=D, dict_size=F, k=K, layer=0, lm_name="synthetic", warmup_steps=2, device="cpu",
                  seed=0)
    training.trainSAE(rows, [config], steps=steps, normalize_activations=True, autocast_dtype=torch.bfloat16,
                      device="cpu")
    assert [s for s, _, _ in collector.fed] == [0, 3, 6, 9]
    seen = [RowsSeen(step, 0, refs.tolist(), latents, source=tokens, call=i)
            for i, (step, refs, latents) in enumerate(collector.fed)]
    assert_state_matches(collector.with_windows(collector.state_dict()["collector"]), seen, F, 4, 4, 0.0)
    collector.save(tmp_path / "samples")
    assert_dir_matches_oracle(read_dir(tmp_path / "samples"), seen, F, 4, 4, 0.0)


class HostSyncs(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (``.item()``, ``bool()``, ``int()``): the host syncs on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def test_refs_for_costs_no_host_sync_for_the_batch_itself_and_one_for_a_copy():
    tokens, acts = corpus()
    rows = RowsWithRefs(shuffled_rows(acts), ArrayTokenSource(tokens))
    batch = next(rows)
    with HostSyncs() as syncs:
        rows.refs_for(batch)  # SAELens' step gets the very tensor
    assert syncs.count == 0
    with HostSyncs() as syncs:
        rows.refs_for(batch.bfloat16() / 3)  # trainSAE's copy: one check of all its rows
    assert syncs.count == 1
