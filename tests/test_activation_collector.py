"""ActivationSampleCollector in a plain training loop (no Trainer), against the brute-force oracle."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same, read_dir
from oracle import Seen, assert_dir_matches_oracle

from lightning_sae_samples import ActivationSampleCollector, LatentInputError
from lightning_sae_samples.state.tables import padded_state

F, K, CTX, THR = 9, 4, 6, 0.5
PAD = -100


def padded_batches(n, batch=3, seq=8, seed=0, vocab=12):
    """Token batches with right padding (``PAD`` and mask 0) of random length, and latents on a 0.5 grid."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
        mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
        mask[0, 2] = False  # a hole inside a sequence: windows stop at it from both sides
        tokens = torch.where(mask, tokens, PAD)
        latents = torch.round(torch.randn(batch, seq, F, generator=gen) * 2) / 2
        latents[..., 0] = 0.0
        latents[~mask] = 3.0  # padding positions hold large activations that must never be collected
        out.append((tokens, mask, latents))
    return out


def to_sparse(latents, k=3):
    values, indices = torch.topk(latents, k, dim=-1)
    return indices, values, torch.zeros_like(latents).scatter(-1, indices, values)


def make(**kwargs):
    args = dict(max_samples_per_feature=K, context_size=CTX, activation_threshold=THR, top_features_to_save=F,
                samples_per_feature_to_save=K, samples_per_interval=2, recent_window_steps=3, write_report=False)
    args.update(kwargs)
    return ActivationSampleCollector(**args)


def check_saved(dirpath, seen, exclude=()):
    files = assert_dir_matches_oracle(read_dir(dirpath), seen, F, K, CTX, THR, exclude=exclude)
    return files["collection_summary.json"]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_plain_loop_with_padding_equals_oracle(tmp_path, mode):
    collector = make(num_latents=F if mode == "sparse" else None)
    seen = []
    for i, (tokens, mask, latents) in enumerate(padded_batches(8)):
        step, rows = i // 2, (i % 2) * tokens.shape[0]  # two micro-batches per step
        if mode == "sparse":
            indices, values, latents = to_sparse(latents)
            collector.update(tokens, latent_indices=indices, latent_values=values, step=step, attention_mask=mask)
        else:
            collector.update(tokens, latents=latents, step=step, attention_mask=mask)
        seen.append(Seen(step, 0, rows, tokens, latents, mask))
    saved = collector.save(tmp_path / "samples")
    assert saved
    summary = check_saved(tmp_path / "samples", seen)
    assert summary["tokens_seen"] < sum(s.tokens.numel() for s in seen)  # padding is not seen
    state = padded_state(torch.load(tmp_path / "samples" / "full_state.pt", weights_only=True))
    context = state["top_context_tokens"][torch.isfinite(state["top_values"])]
    assert int(context.min()) == -1 and PAD not in context  # padding shows as -1, never as a token


def test_negative_token_ids_without_a_mask_are_padding(tmp_path):
    collector = make()
    seen = []
    for step, (tokens, mask, latents) in enumerate(padded_batches(4, seed=2)):
        tokens = torch.where(mask, tokens, -1)
        collector.update(tokens, latents=latents, step=step)
        seen.append(Seen(step, 0, 0, tokens, latents))
    collector.save(tmp_path / "samples")
    check_saved(tmp_path / "samples", seen)


def test_excluded_tokens_are_seen_but_not_collected(tmp_path):
    collector = make(exclude_token_ids=[1, 2])
    seen = []
    for step, (tokens, mask, latents) in enumerate(padded_batches(6, seed=3, vocab=4)):
        collector.update(tokens, latents=latents, step=step, attention_mask=mask)
        seen.append(Seen(step, 0, 0, tokens, latents, mask))
    collector.save(tmp_path / "samples")
    check_saved(tmp_path / "samples", seen, exclude=(1, 2))
    state = padded_state(torch.load(tmp_path / "samples" / "full_state.pt", weights_only=True))
    kept = torch.isfinite(state["top_values"])
    centre = state["top_context_tokens"][..., CTX // 2][kept]
    assert not torch.isin(centre, torch.tensor([1, 2])).any()
    assert torch.isin(state["top_context_tokens"][kept], torch.tensor([1, 2])).any()  # still shown in contexts


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_state_dict_round_trip_continues_exactly(mode):
    batches = padded_batches(6, seed=5)

    def feed(collector, part, start):
        for step, (tokens, mask, latents) in enumerate(part, start=start):
            if mode == "sparse":
                indices, values, _ = to_sparse(latents)
                collector.update(tokens, latent_indices=indices, latent_values=values, step=step, attention_mask=mask)
            else:
                collector.update(tokens, latents=latents, step=step, attention_mask=mask)

    straight = make(num_latents=F)
    feed(straight, batches, 0)
    first = make(num_latents=F)
    feed(first, batches[:3], 0)
    saved = first.state_dict()
    resumed = make(num_latents=F)
    resumed.load_state_dict(saved)
    feed(resumed, batches[3:], 3)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["config"] == b["config"]
    assert_same(a["collector"], b["collector"])


def test_resume_with_other_sizes_names_the_setting():
    collector = make()
    tokens, mask, latents = padded_batches(1)[0]
    collector.update(tokens, latents=latents, step=0, attention_mask=mask)
    with pytest.raises(ValueError, match=r"context_size=6.*context_size=8"):
        make(context_size=8).load_state_dict(collector.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_latents=0), "num_latents"),
        (dict(max_samples_per_feature=0), "max_samples_per_feature"),
        (dict(context_size=-2), "context_size"),
        (dict(activation_threshold=float("inf")), "activation_threshold"),
        (dict(rank_features_by="size"), "rank_features_by"),
        (dict(samples_per_feature_to_save=20), "cannot exceed"),
        (dict(recent_window_steps=0), "recent_window_steps"),
        (dict(seed=1.5), "seed"),
        (dict(exclude_token_ids=[1, -3]), "exclude_token_ids"),
        (dict(exclude_token_ids="bos"), "exclude_token_ids"),
        (dict(exclude_token_ids=[2**40]), "exclude_token_ids"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_bad_updates_are_explained():
    tokens = torch.zeros(2, 5, dtype=torch.long)
    collector = make()
    with pytest.raises(LatentInputError, match="num_latents=F"):
        collector.update(tokens, latent_indices=torch.zeros(2, 5, 2, dtype=torch.long),
                         latent_values=torch.ones(2, 5, 2), step=0)
    with pytest.raises(LatentInputError, match=r"`attention_mask` has shape \(2, 4\)"):
        collector.update(tokens, latents=torch.ones(2, 5, 3), step=0, attention_mask=torch.ones(2, 4))
    with pytest.raises(LatentInputError, match="`latents` has 3 latents but `num_latents` is 4"):
        make(num_latents=4).update(tokens, latents=torch.ones(2, 5, 3), step=0)
    collector.update(tokens, latents=torch.ones(2, 5, 3), step=4)
    with pytest.raises(LatentInputError, match="went back from 4 to 3"):
        collector.update(tokens, latents=torch.ones(2, 5, 3), step=3)
    with pytest.raises(ValueError, match="`step`"):
        collector.update(tokens, latents=torch.ones(2, 5, 3), step=-1)


def test_save_without_updates_writes_nothing(tmp_path):
    assert make().save(tmp_path / "samples") == []
    assert not (tmp_path / "samples").exists()


def test_two_processes_merge_exactly_under_torch_distributed(tmp_path, mode="sparse"):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parent / "collector_ddp_script.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--mode", mode, "--port", str(port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [Seen(*item) for rank in (0, 1) for item in torch.load(tmp_path / f"seen_{rank}.pt", weights_only=True)]
    assert {s.rank for s in seen} == {0, 1}
    check_saved(tmp_path / "samples", seen)
