"""Alignment of collected samples with the tokens that produced them, through a real Trainer.

A synthetic "SAE" makes latent ``j`` fire exactly on token id ``j``, with a value that encodes which
sequence and position the token came from (``value = seq_id * T + position + 1``, exact in float32).
Every kept sample of latent ``j`` must therefore have token ``j`` as its activating token, and its
context must be the original sequence around the decoded position. The kept samples must also be
exactly the ``K`` largest occurrences of token ``j``. Meta-tests feed deliberately misaligned tokens
(shifted by one position, rows permuted) and check that the checker catches them.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

L = pytest.importorskip("lightning")
sae_samples = pytest.importorskip("lightning_sae_samples")
from lightning_sae_samples import ActivationSampleCallback  # noqa: E402
from lightning_sae_samples.state import padded_state  # noqa: E402

VOCAB = 24  # = number of latents F
SEQ_LEN = 16
NUM_SEQS = 48
BATCH = 4
CONTEXT = 6  # half window 3: windows are clipped at both sequence edges
K = 5
DISTRACTOR = 0.05  # below the threshold: must never be collected, but shows in context activations
THRESHOLD = 0.1


def make_sequences(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (NUM_SEQS, SEQ_LEN), generator=gen)


class SeqDataset(torch.utils.data.Dataset):
    def __init__(self, seqs: torch.Tensor) -> None:
        self.seqs = seqs

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int):
        return {"tokens": self.seqs[i], "seq_id": torch.tensor(i)}


class OneHotSAE(L.LightningModule):
    """Latent j = value on token j. ``mode``: "dense" | "sparse"; ``corrupt``: None | "shift" | "rows"."""

    def __init__(self, mode: str = "dense", corrupt: str | None = None) -> None:
        super().__init__()
        self.mode = mode
        self.corrupt = corrupt
        self.num_latents = VOCAB
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        tokens = batch["tokens"]
        b, t = tokens.shape
        positions = torch.arange(t).expand(b, t)
        value = (batch["seq_id"].view(b, 1) * t + positions + 1).float()
        loss = (self.w - 1).pow(2).sum()
        reported = tokens
        if self.corrupt == "shift":
            reported = torch.roll(tokens, 1, dims=1)
        elif self.corrupt == "rows":
            reported = torch.roll(tokens, 1, dims=0)
        if self.mode == "dense":
            latents = torch.nn.functional.one_hot(tokens, VOCAB).float() * value.unsqueeze(-1)
            # Distractor: latent (token + 1) % F gets a sub-threshold value.
            latents = latents + torch.nn.functional.one_hot((tokens + 1) % VOCAB, VOCAB).float() * DISTRACTOR
            return {"loss": loss, "latents": latents, "tokens": reported}
        indices = torch.stack([(tokens + 1) % VOCAB, tokens], dim=-1)  # the real latent in slot 1
        values = torch.stack([torch.full_like(value, DISTRACTOR), value], dim=-1)
        out = {"loss": loss, "latent_indices": indices, "latent_values": values}
        if self.corrupt is not None:
            out["tokens"] = reported
        # Otherwise tokens come from batch["tokens"] (the callback's fallback).
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def run(tmp_path, mode: str, corrupt: str | None = None):
    seqs = make_sequences()
    loader = torch.utils.data.DataLoader(
        SeqDataset(seqs), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    dirpath = tmp_path / f"samples_{mode}_{corrupt}"
    callback = ActivationSampleCallback(
        collection_freq=1,
        max_samples_per_feature=K,
        context_size=CONTEXT,
        activation_threshold=THRESHOLD,
        top_features_to_save=VOCAB,
        samples_per_feature_to_save=K,
        dirpath=str(dirpath),
        write_report=False,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,  # every sequence seen exactly once
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(OneHotSAE(mode, corrupt), loader)
    return seqs, dirpath


def expected_top(seqs: torch.Tensor) -> dict[int, list[float]]:
    """The K largest values of every latent (values are unique by construction)."""
    values: dict[int, list[float]] = {j: [] for j in range(VOCAB)}
    for s in range(NUM_SEQS):
        for p in range(SEQ_LEN):
            values[int(seqs[s, p])].append(float(s * SEQ_LEN + p + 1))
    return {j: sorted(v, reverse=True)[:K] for j, v in values.items()}


def expected_act(token: int, latent: int, value: float, sparse_or_dense_distractor: bool = True) -> float:
    if token == latent:
        return value
    if sparse_or_dense_distractor and (token + 1) % VOCAB == latent:
        return DISTRACTOR
    return 0.0


def check_sample(seqs: torch.Tensor, latent: int, sample: dict) -> None:
    """Assert one feature-file sample is aligned with the original sequence."""
    value = sample["activation_value"]
    assert value == int(value), f"latent {latent}: value {value} is not one of the encoded values"
    code = int(value) - 1
    seq_id, pos = divmod(code, SEQ_LEN)
    seq = seqs[seq_id].tolist()
    h = CONTEXT // 2
    lo, hi = max(0, pos - h), min(SEQ_LEN, pos + h + 1)
    assert sample["feature_idx"] == latent
    assert sample["position"] == pos, f"latent {latent}: position {sample['position']} != {pos}"
    assert sample["tokens"][-1] == latent, f"latent {latent}: activating token {sample['tokens']}"
    assert sample["tokens"] == seq[max(0, pos - 1) : pos + 1], f"latent {latent}: tokens {sample['tokens']}"
    ctx = sample["context_tokens"]
    assert ctx == seq[lo:hi], f"latent {latent}: context {ctx} != {seq[lo:hi]} (seq {seq_id} pos {pos})"
    assert sample["context_position"] == pos - lo
    assert ctx[sample["context_position"]] == latent
    assert len(sample["context_activations"]) == len(ctx)
    for tok, act, p in zip(ctx, sample["context_activations"], range(lo, hi)):
        want = expected_act(tok, latent, float(seq_id * SEQ_LEN + p + 1))
        assert math.isclose(act, want, rel_tol=1e-6, abs_tol=1e-6), f"latent {latent}: context act {act} != {want}"


def check_samples_dir(seqs: torch.Tensor, dirpath) -> None:
    """Check every saved feature file and the full state against the sequences."""
    from lightning_sae_samples import read_samples_dir

    directory = read_samples_dir(dirpath)
    summary = directory.summary
    top = expected_top(seqs)
    assert summary["tokens_seen"] == NUM_SEQS * SEQ_LEN
    assert summary["num_features_tracked"] == VOCAB
    saved = sorted(directory.feature_files)
    fired = sorted(j for j in range(VOCAB) if top[j])
    assert saved == fired, "every latent that fired should be saved (top_features_to_save = F)"
    counts = torch.bincount(seqs.flatten(), minlength=VOCAB)
    for j in saved:
        data = json.loads(directory.feature_files[j].read_text(encoding="utf-8"))
        assert data["statistics"]["activation_count"] == int(counts[j]), f"latent {j}: count"
        samples = data["top_samples"]
        assert [s["activation_value"] for s in samples] == top[j], f"latent {j}: not the exact top {K}"
        for sample in samples:
            check_sample(seqs, j, sample)

    # The full state holds every latent's kept samples as token windows with the activating token at h.
    assert directory.full_state_path is not None
    state = padded_state(torch.load(directory.full_state_path, weights_only=True))
    h = int(state["half_window"])
    for j in range(VOCAB):
        kept = state["top_values"][j] > -math.inf
        windows = state["top_context_tokens"][j][kept]
        assert (windows[:, h] == j).all(), f"latent {j}: full-state activating token"
        for w, v, p in zip(windows, state["top_values"][j][kept], state["top_position"][j][kept]):
            seq_id, pos = divmod(int(v) - 1, SEQ_LEN)
            assert int(p) == pos
            seq = seqs[seq_id]
            for i in range(-h, h + 1):
                want = int(seq[pos + i]) if 0 <= pos + i < SEQ_LEN else -1
                assert int(w[h + i]) == want, f"latent {j}: full-state window {w.tolist()}"


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_samples_align_with_tokens(tmp_path, mode):
    seqs, dirpath = run(tmp_path, mode)
    check_samples_dir(seqs, dirpath)


@pytest.mark.parametrize("corrupt", ["shift", "rows"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_checker_catches_misalignment(tmp_path, mode, corrupt):
    """Tokens off by one position, or rows in the wrong order, must fail the alignment check."""
    seqs, dirpath = run(tmp_path, mode, corrupt)
    with pytest.raises(AssertionError):
        check_samples_dir(seqs, dirpath)
