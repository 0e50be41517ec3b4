"""Property test: whatever strided, typed, padded input a loop hands over, the state equals the brute-force oracle.

Hypothesis draws shapes, strides, dtypes, padding masks, excluded ids, k, F, T, thresholds, context sizes and step
sequences. Profiles (tests/conftest.py): ``default`` is small and seeded, ``HYPOTHESIS_PROFILE=long`` searches more.
"""

from __future__ import annotations

import pytest
import torch
from oracle import Seen, assert_state_matches

from lightning_sae_samples import ActivationSampleCollector

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
LATENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASK_KINDS = ("none", "bool", "int", "float")


def strided(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``tensor`` ``[B, T, ...]``, as a view with other strides."""
    if layout == "transposed":  # stored [T, B, ...] and transposed back: non-contiguous
        return tensor.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":  # every other row of a twice-as-long buffer
        buffer = torch.zeros((2 * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
        buffer[::2] = tensor
        return buffer[::2]
    if layout == "expanded" and tensor.shape[0] > 0:  # stride 0 over the batch: every row is row 0
        return tensor[:1].expand(tensor.shape)
    return tensor


@st.composite
def collections(draw):
    num_latents = draw(st.integers(1, 10))
    seq = draw(st.integers(1, 7))
    steps = draw(st.lists(st.integers(1, 2), min_size=1, max_size=4))  # micro-batches per step
    layout = draw(st.sampled_from(LAYOUTS))
    batches = []
    for micro in steps:
        batch = []
        for _ in range(micro):
            rows = draw(st.integers(0, 3))
            if layout == "expanded":
                values = draw(st.lists(st.integers(-4, 8), min_size=seq * num_latents, max_size=seq * num_latents))
                latents = (torch.tensor(values, dtype=torch.float32) / 2).view(1, seq, num_latents).repeat(rows, 1, 1)
                ids = torch.tensor(draw(st.lists(st.integers(0, 11), min_size=seq, max_size=seq))).repeat(rows, 1)
                real = torch.tensor(draw(st.lists(st.booleans(), min_size=seq, max_size=seq))).repeat(rows, 1)
            else:
                n = rows * seq
                values = draw(st.lists(st.integers(-4, 8), min_size=n * num_latents, max_size=n * num_latents))
                latents = (torch.tensor(values, dtype=torch.float32) / 2).view(rows, seq, num_latents)
                ids = torch.tensor(draw(st.lists(st.integers(0, 11), min_size=n, max_size=n)),
                                   dtype=torch.int64).view(rows, seq)
                real = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)),
                                    dtype=torch.bool).view(rows, seq)
            batch.append((ids.view(rows, seq), real.view(rows, seq), latents))
        batches.append(batch)
    return dict(
        num_latents=num_latents,
        batches=batches,
        layout=layout,
        mode=draw(st.sampled_from(("dense", "sparse", "sparse-padded"))),
        k=draw(st.integers(1, num_latents)),
        token_dtype=draw(st.sampled_from(TOKEN_DTYPES)),
        latent_dtype=draw(st.sampled_from(LATENT_DTYPES)),
        mask_kind=draw(st.sampled_from(MASK_KINDS)),
        requires_grad=draw(st.booleans()),
        threshold=draw(st.sampled_from((0.0, 0.25, 0.5, 1.0))),
        context_size=draw(st.integers(0, 6)),
        max_samples=draw(st.integers(1, 5)),
        exclude=tuple(draw(st.sets(st.integers(0, 11), max_size=3))),
        first_step=draw(st.integers(0, 5)),
        step_gaps=draw(st.lists(st.integers(0, 3), min_size=len(steps), max_size=len(steps))),
    )


def _inputs(case, ids, real, latents):
    """What the loop hands over (strided, typed) and the plain int64 / float view the oracle reads."""
    mask_kind, dtype = case["mask_kind"], case["latent_dtype"]
    padding_id = -1 if case["token_dtype"] != torch.uint8 else None
    tokens = ids.clone()
    if mask_kind == "none" and padding_id is not None:
        tokens = torch.where(real, tokens, padding_id)
    latents = latents.to(dtype)
    if mask_kind == "none" and padding_id is None:
        real = torch.ones_like(real)  # uint8 ids cannot be negative: without a mask nothing is padding
    mask = {"none": None, "bool": real, "int": real.to(torch.int32), "float": real.float()}[mask_kind]
    oracle_view = Seen(0, 0, 0, tokens.long(), latents.float(), None if mask is None else real)
    given = dict(tokens=strided(tokens.to(case["token_dtype"]), case["layout"]))
    if mask is not None:
        given["attention_mask"] = strided(mask, case["layout"])
    if case["mode"].startswith("sparse"):
        order = torch.sort(strided(latents, case["layout"]), dim=-1, descending=True)
        indices = order.indices[..., : case["k"]]  # views of a sort: the reproduction of issue 18
        values = order.values[..., : case["k"]]
        if case["mode"] == "sparse-padded":  # a variable number per token (JumpReLU at 0.5): the rest padded
            dropped = values < 0.5
            indices, values = torch.where(dropped, -1, indices), torch.where(dropped, 0.0, values)
        if case["requires_grad"] and dtype == torch.float32:
            values = values.detach().requires_grad_()
        given.update(latent_indices=indices.to(case["token_dtype"] if case["token_dtype"] != torch.uint8 else
                                                torch.int64), latent_values=values)
        spare = torch.where(indices >= 0, indices.long(), latents.shape[-1])  # padding to a column then dropped
        dense = torch.zeros(*latents.shape[:-1], latents.shape[-1] + 1).scatter(-1, spare, values.float())[..., :-1]
        oracle_view.latents = dense
    else:
        dense = strided(latents, case["layout"])
        if case["requires_grad"] and dtype == torch.float32:
            dense = dense.detach().requires_grad_()
        given["latents"] = dense
    return given, oracle_view


def run_case(case):
    collector = ActivationSampleCollector(
        num_latents=case["num_latents"], max_samples_per_feature=case["max_samples"],
        samples_per_feature_to_save=1, context_size=case["context_size"], activation_threshold=case["threshold"],
        exclude_token_ids=case["exclude"], samples_per_interval=0,
    )
    seen, step, rows = [], case["first_step"], 0
    for gap, batch in zip(case["step_gaps"], case["batches"]):
        step, rows = step + gap, rows if gap == 0 else 0  # a gap of 0: more micro-batches of the same step
        for ids, real, latents in batch:
            given, view = _inputs(case, ids, real, latents)
            before = {k: v.clone() for k, v in given.items()}
            collector.update(step=step, **given)
            for key, value in given.items():  # the caller's tensors are left as they were
                assert torch.equal(value, before[key]), key
            view.step, view.row_offset = step, rows
            seen.append(view)
            rows += ids.shape[0]
    state = collector.state_dict()["collector"]
    if state is None:
        assert all(view.tokens.numel() == 0 for view in seen)
        return
    assert_state_matches(state, seen, case["num_latents"], case["max_samples"], case["context_size"],
                         case["threshold"], exclude=case["exclude"])


@hypothesis.given(collections())
def test_any_strided_typed_padded_input_collects_what_the_oracle_keeps(case):
    run_case(case)


def test_topk_views_from_a_sort_are_accepted():
    """The reproduction of issue 18: sparsify-style TopK taken from a sort crashed in update_sparse."""
    torch.manual_seed(0)
    latents = torch.rand(2, 5, 8)
    order = torch.sort(latents, dim=-1, descending=True)
    collector = ActivationSampleCollector(num_latents=8, context_size=2, samples_per_feature_to_save=1,
                                          max_samples_per_feature=3)
    tokens = torch.randint(0, 9, (2, 5))
    collector.update(tokens, latent_indices=order.indices[..., :3], latent_values=order.values[..., :3], step=0)
    dense = torch.zeros_like(latents).scatter(-1, order.indices[..., :3], order.values[..., :3])
    assert_state_matches(collector.state_dict()["collector"], [Seen(0, 0, 0, tokens, dense)], 8, 3, 2, 0.1)


@hypothesis.settings(max_examples=4)
@hypothesis.given(
    seed=st.integers(0, 1000), mode=st.sampled_from(("dense", "sparse")), layout=st.sampled_from(LAYOUTS[:3]),
    latent_dtype=st.sampled_from(LATENT_DTYPES), index_dtype=st.sampled_from((torch.int64, torch.int32, torch.int16)),
)
def test_a_trainer_reads_strided_typed_outputs_as_the_oracle_says(tmp_path_factory, seed, mode, layout, latent_dtype,
                                                                   index_dtype):
    from conftest import EntryPoint
    from helpers import padded_batches

    def hand_over(out):
        if mode == "sparse":
            return {**out, "latent_indices": strided(out["latent_indices"], layout).to(index_dtype),
                    "latent_values": strided(out["latent_values"], layout)}
        return {**out, "latents": strided(out["latents"], layout)}

    root = tmp_path_factory.mktemp("trainer")
    (root / "ckpt").mkdir()
    batches = [(tokens, mask, latents.to(latent_dtype)) for tokens, mask, latents in padded_batches(3, seed=seed)]
    entry = EntryPoint("callback", root)
    dirpath, seen = entry.collect(batches, mode, hand_over=hand_over)
    for view in seen:
        view.latents = view.latents.float()
    entry.check(dirpath, seen)
