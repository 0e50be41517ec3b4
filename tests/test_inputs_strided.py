"""Inputs exactly as real loops hand them over: views, other dtypes, masks of any kind; and what is refused."""

import pytest
import torch
from helpers import padded_batches, to_sparse
from oracle import Seen, assert_state_matches

from lightning_sae_samples import ActivationSampleCollector, LatentInputError

F = 10

SETTINGS = dict(max_samples_per_feature=4, context_size=4, samples_per_feature_to_save=2, samples_per_interval=1)


def collector(**kwargs):
    return ActivationSampleCollector(num_latents=F, **{**SETTINGS, **kwargs})


def state_of(c):
    return c.state_dict()["collector"]


def assert_same_state(a, b):
    from helpers import assert_same

    assert_same(a, b)


VIEWS = {
    "transposed": lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
    "sliced": lambda x: torch.stack([x, torch.zeros_like(x)], dim=1).flatten(0, 1)[::2],  # every other row
    "narrowed": lambda x: torch.cat([x, x], dim=1).narrow(1, 0, x.shape[1]),
    "channels_last": lambda x: x.unsqueeze(-1).contiguous(memory_format=torch.channels_last).squeeze(-1)
    if x.dim() == 3 else x,
}


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_views_and_dtypes_collect_what_the_contiguous_int64_copy_does(view, token_dtype, mask_dtype, mode):
    reference, strided = collector(), collector()
    for step, (tokens, mask, latents) in enumerate(padded_batches(3, seed=4, num_latents=F)):
        tokens = torch.where(mask, tokens, 0)  # uint8 cannot hold -100: the mask marks padding
        indices, values, _ = to_sparse(latents)
        plain = dict(latent_indices=indices, latent_values=values) if mode == "sparse" else dict(latents=latents)
        reference.update(tokens, step=step, attention_mask=mask, **plain)
        given = {k: VIEWS[view](v) for k, v in plain.items()}
        if mode == "sparse":
            given["latent_indices"] = given["latent_indices"].to(torch.int32)
        given_tokens, given_mask = VIEWS[view](tokens.to(token_dtype)), VIEWS[view](mask.to(mask_dtype))
        before = [t.clone() for t in (given_tokens, given_mask, *given.values())]
        strided.update(given_tokens, step=step, attention_mask=given_mask, **given)
        assert all(torch.equal(a, b) for a, b in zip(before, (given_tokens, given_mask, *given.values())))
    assert_same_state(state_of(reference), state_of(strided))


def test_expanded_latents_with_stride_zero_and_half_precision_requiring_grad():
    tokens = torch.randint(0, 9, (3, 5))
    row = (torch.randint(-2, 6, (1, 5, F)) / 2).to(torch.bfloat16).requires_grad_()
    c = collector()
    c.update(tokens, latents=row.expand(3, 5, F), step=0)
    assert_state_matches(state_of(c), [Seen(0, 0, 0, tokens, row.detach().float().expand(3, 5, F))], F, 4, 4, 0.1)


def test_topk_of_a_permuted_tensor_and_zero_size_batches():
    latents = (torch.randint(-2, 6, (F, 2, 5)) / 2).permute(1, 2, 0)  # [2, 5, F], non-contiguous
    top = latents.topk(3, dim=-1)
    tokens = torch.randint(0, 9, (2, 5))
    c = collector()
    c.update(torch.zeros(0, 5, dtype=torch.long), latents=torch.zeros(0, 5, F), step=0)  # nothing: skipped
    c.update(tokens, latent_indices=top.indices, latent_values=top.values, step=1)
    dense = torch.zeros(2, 5, F).scatter(-1, top.indices, top.values)
    assert_state_matches(state_of(c), [Seen(1, 0, 0, tokens, dense)], F, 4, 4, 0.1)


def test_a_batch_with_one_active_entry():
    """Found by the long property-test profile: one active entry in a batch crashed the sparse window walk."""
    c = ActivationSampleCollector(num_latents=1, max_samples_per_feature=1, samples_per_feature_to_save=1,
                                  context_size=0, activation_threshold=0.0)
    c.update(torch.tensor([[3]]), latent_indices=torch.tensor([[[0]]]), latent_values=torch.tensor([[[0.5]]]), step=0)
    assert_state_matches(state_of(c), [Seen(0, 0, 0, torch.tensor([[3]]), torch.tensor([[[0.5]]]))], 1, 1, 0, 0.0)


TOK = torch.randint(0, 9, (2, 5))
LAT = torch.rand(2, 5, F)
IDX = torch.randint(0, F, (2, 5, 1))
VAL = torch.rand(2, 5, 1)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(tokens=TOK.float(), latents=LAT), r"`tokens` must hold integer token ids, got dtype torch.float32"),
        (dict(tokens=TOK, latent_indices=IDX + F, latent_values=VAL),
         rf"`latent_indices` holds indices in \[\d+, \d+\] but the SAE has {F} latents"),
        (dict(tokens=TOK, latent_indices=IDX - F, latent_values=VAL), r"`latent_indices` holds indices in \[-"),
        (dict(tokens=TOK, latents=LAT, attention_mask=torch.ones(2, 4)), r"`attention_mask` has shape \(2, 4\)"),
        (dict(tokens=TOK, latents=LAT, attention_mask=torch.full((2, 5), -1e9)), r"0/1 .*additive"),
        (dict(tokens=TOK, latents=LAT, step=0), r"`step` went back from 1 to 0"),
        (dict(tokens=TOK, latents=LAT[..., :3]), r"latent count changed from 10 to 3"),
    ],
)
def test_a_rejected_update_names_the_argument_and_leaves_the_state_as_it_was(bad, match):
    c = collector()
    c.update(TOK, latents=LAT, step=1)
    before = state_of(c)
    bad = {"step": 1, **bad}
    with pytest.raises(LatentInputError, match=match):
        c.update(bad.pop("tokens"), **bad)
    assert_same_state(before, state_of(c))
    c.update(TOK, latents=LAT, step=2)  # and the collection goes on


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_the_callback_reads_views_and_other_dtypes_from_training_step(entry, mode):
    def hand_over(out):
        if mode == "sparse":
            indices = VIEWS["transposed"](out["latent_indices"]).to(torch.int32)
            return {**out, "latent_indices": indices, "latent_values": VIEWS["sliced"](out["latent_values"])}
        return {**out, "latents": VIEWS["transposed"](out["latents"]).to(torch.bfloat16).float()}

    dirpath, seen = entry.collect(padded_batches(4, seed=6), mode, hand_over=hand_over)
    entry.check(dirpath, seen)
