"""Variable-k latents (BatchTopK, sparse JumpReLU): sparse indices padded with -1 (value 0), and nested tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import SyntheticSAE
from oracle import RowsSeen, Seen, assert_state_matches

from lightning_sae_samples import ActivationSampleCollector, LatentInputError
from lightning_sae_samples.state.tables import padded_state
from lightning_sae_samples.token_sources import ArrayTokenSource

F, KMAX, CTX, N_KEPT, THR = 9, 4, 4, 3, 0.25
SETTINGS = dict(context_size=CTX, max_samples_per_feature=N_KEPT, samples_per_feature_to_save=N_KEPT,
                activation_threshold=THR)


def variable_k(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``[B, T]``, latents padded to ``[B, T, KMAX]`` (a random 0..KMAX active per token, -1 / 0 after them,
    -1 also between them), and the dense view ``[B, T, F]``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 25, (batch, seq), generator=g)
    scores = torch.rand(batch, seq, F, generator=g)
    order = scores.argsort(dim=-1, descending=True)[..., :KMAX]
    values = (torch.rand(batch, seq, KMAX, generator=g) * 4).round() / 4 + 0.25  # ties on a grid, all > 0
    active = torch.arange(KMAX) < torch.randint(0, KMAX + 1, (batch, seq, 1), generator=g)
    # Padding anywhere in the row, not only at its end (BatchTopK keeps a batch's top entries wherever they are).
    shuffle = torch.rand(batch, seq, KMAX, generator=g).argsort(dim=-1)
    active = active.gather(-1, shuffle)
    indices = torch.where(active, order, -1)
    values = torch.where(active, values, 0.0)
    dense = torch.zeros(batch, seq, F + 1).scatter(-1, torch.where(active, order, F), values)[..., :F]
    return tokens, indices, values, dense


def test_minus_one_padding_of_sequences_equals_the_oracle():
    collector = ActivationSampleCollector(num_latents=F, **SETTINGS)
    seen = []
    for step in range(3):
        tokens, indices, values, dense = variable_k(3, 7, step)
        assert bool((indices == -1).any()) and bool((indices >= 0).any())
        collector.update(tokens, latent_indices=indices, latent_values=values, step=step)
        seen.append(Seen(step, 0, 0, tokens, dense))
    assert_state_matches(collector.state_dict()["collector"], seen, F, N_KEPT, CTX, THR)


def test_minus_one_padding_of_shuffled_rows_equals_the_oracle():
    tokens, indices, values, dense = variable_k(5, 8, 7)
    collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens), **SETTINGS)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    collector.update(token_refs=perm, latent_indices=indices.reshape(40, KMAX)[perm],
                     latent_values=values.reshape(40, KMAX)[perm], step=0)
    seen = [RowsSeen(0, 0, perm.tolist(), dense.reshape(40, F)[perm], source=tokens)]
    state = collector.with_windows(collector.state_dict()["collector"])
    assert_state_matches(state, seen, F, N_KEPT, CTX, THR)


def test_padding_never_counts_even_under_a_negative_threshold():
    """With a threshold below 0, a padded entry's 0 would pass it: the -1 index keeps it out."""
    tokens, indices, values, _ = variable_k(3, 7, 4)
    settings = {**SETTINGS, "activation_threshold": -0.5}
    padded = ActivationSampleCollector(num_latents=F, **settings)
    padded.update(tokens, latent_indices=indices, latent_values=values, step=0)
    # The same active entries as a rectangle without padding: each token lists all F latents, the absent ones at
    # a value below the threshold.
    spare = torch.where(indices >= 0, indices, F)  # padding goes to a spare column, dropped after
    dense = torch.full((3, 7, F + 1), -1.0).scatter(-1, spare, values)[..., :F]
    full = ActivationSampleCollector(num_latents=F, **settings)
    full.update(tokens, latent_indices=torch.arange(F).expand(3, 7, F), latent_values=dense, step=0)
    a, b = padded_state(padded.state_dict()["collector"]), padded_state(full.state_dict()["collector"])
    for name in ("count", "sum", "max", "min", "hist", "top_values", "top_position", "top_context_tokens"):
        assert torch.equal(a[name], b[name]), name


def test_nested_tensors_are_padded_and_equal_the_padded_rectangle():
    tokens, indices, values, _ = variable_k(3, 7, 5)
    flat_idx, flat_val = indices.reshape(21, KMAX), values.reshape(21, KMAX)
    per_token = [(i[i >= 0], v[i >= 0]) for i, v in zip(flat_idx, flat_val)]
    results = []
    for layout in (torch.strided, torch.jagged):
        nested_idx = torch.nested.nested_tensor([i for i, _ in per_token], layout=layout)
        nested_val = torch.nested.nested_tensor([v for _, v in per_token], layout=layout)
        collector = ActivationSampleCollector(num_latents=F, **SETTINGS)
        collector.update(tokens, latent_indices=nested_idx, latent_values=nested_val, step=0)
        results.append(padded_state(collector.state_dict()["collector"]))
    rectangle = ActivationSampleCollector(num_latents=F, **SETTINGS)
    rectangle.update(tokens, latent_indices=indices, latent_values=values, step=0)
    want = padded_state(rectangle.state_dict()["collector"])
    for got in results:
        for name in ("count", "sum", "top_values", "top_position", "top_context_tokens", "top_context_acts"):
            assert torch.equal(got[name], want[name]), name


def test_nested_rows_with_a_ref_source_are_padded_too():
    tokens, indices, values, dense = variable_k(2, 6, 6)
    flat_idx, flat_val = indices.reshape(12, KMAX), values.reshape(12, KMAX)
    nested_idx = torch.nested.nested_tensor([i[i >= 0] for i in flat_idx], layout=torch.jagged)
    nested_val = torch.nested.nested_tensor([v[i >= 0] for i, v in zip(flat_idx, flat_val)], layout=torch.jagged)
    collector = ActivationSampleCollector(num_latents=F, token_source=ArrayTokenSource(tokens), **SETTINGS)
    collector.update(token_refs=torch.arange(12), latent_indices=nested_idx, latent_values=nested_val, step=0)
    seen = [RowsSeen(0, 0, list(range(12)), dense.reshape(12, F), source=tokens)]
    assert_state_matches(collector.with_windows(collector.state_dict()["collector"]), seen, F, N_KEPT, CTX, THR)


def test_padding_and_nesting_mistakes_are_messages_that_name_the_fix():
    tokens, indices, values, _ = variable_k(2, 5, 8)
    collector = ActivationSampleCollector(num_latents=F, **SETTINGS)
    bad = values.clone()
    bad[indices == -1] = 0.5
    with pytest.raises(LatentInputError, match="pads with index -1 an entry whose value is 0.5: padding must have"):
        collector.update(tokens, latent_indices=indices, latent_values=bad, step=0)
    other = torch.where(indices == -1, -2, indices)
    with pytest.raises(LatentInputError, match=r"holds indices in \[-2, -2\]"):
        collector.update(tokens, latent_indices=other, latent_values=values, step=0)
    nested = torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])], layout=torch.jagged)
    nested_values = torch.nested.nested_tensor([torch.tensor([1.0]), torch.tensor([2.0])], layout=torch.jagged)
    two = torch.randint(1, 9, (1, 2))
    with pytest.raises(LatentInputError, match="differ in a token's number of entries"):
        collector.update(two, latent_indices=nested, latent_values=nested_values, step=0)
    with pytest.raises(LatentInputError, match="Only `latent_indices` is a nested tensor.*padded yourself"):
        collector.update(two, latent_indices=nested, latent_values=torch.ones(2, 2), step=0)
    per_sequence = torch.nested.nested_tensor([torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 2).long()])
    with pytest.raises(LatentInputError, match="each must be 1-D"):
        collector.update(two, latent_indices=per_sequence, latent_values=per_sequence.float(), step=0)
    with pytest.raises(LatentInputError, match="dense latents are .*Pass variable-k latents"):
        collector.update(two, latents=nested_values, step=0)
    assert collector.collector is None  # nothing was folded


class BatchTopKSAE(SyntheticSAE):
    """A batch-level TopK: the batch's ``k * tokens`` largest latents, so each token has its own number of them,
    returned padded with -1 / 0 (``"padded"``) or as nested tensors (``"nested"``)."""

    def __init__(self, layout: str, **kwargs):
        super().__init__(mode="sparse", **kwargs)
        self.layout = layout

    def _outputs(self, tokens):
        lat = self.latents_for(tokens) * self.scale
        flat = lat.reshape(-1, lat.shape[-1])
        keep = torch.zeros_like(flat, dtype=torch.bool).view(-1)
        keep[flat.view(-1).topk(self.k * len(flat)).indices] = True
        keep = keep.view_as(flat) & (flat > 0)
        dense = torch.where(keep, flat, 0.0)
        width = int(keep.sum(1).max())
        values, indices = dense.topk(width, dim=-1)
        indices = torch.where(values > 0, indices, -1)
        values = torch.where(values > 0, values, 0.0)
        if self.layout == "nested":
            indices = torch.nested.nested_tensor([i[i >= 0] for i in indices], layout=torch.jagged)
            values = torch.nested.nested_tensor([v[v > 0] for v in values.detach()], layout=torch.jagged)
        out = {"loss": (self.scale - 1.0) ** 2, "latent_indices": indices, "latent_values": values}
        return out, dense.detach().view_as(lat).float().cpu()


@pytest.mark.parametrize("layout", ["padded", "nested"])
def test_the_callback_collects_batch_topk_latents_exactly(tmp_path, layout):
    from helpers import CTX as H_CTX
    from helpers import THR as H_THR
    from helpers import F as H_F
    from helpers import K as H_K
    from helpers import TokenDataset, callback_factory, check_against_oracle, loader, trainer

    make_callback = callback_factory(
        collection_freq=1, max_samples_per_feature=H_K, context_size=H_CTX, activation_threshold=H_THR,
        top_features_to_save=H_F, samples_per_feature_to_save=H_K, write_report=False,
    )
    module = BatchTopKSAE(layout, num_latents=H_F, k=2)
    trainer(tmp_path, [make_callback(tmp_path)], max_epochs=1).fit(module, loader(TokenDataset()))
    counts = {int(c) for s in module.seen for c in (s.latents > 0).sum(-1).view(-1)}
    assert len(counts) > 2  # tokens really have different numbers of active latents
    check_against_oracle(tmp_path / "samples", module.seen)
