"""Cached activation rows for Trainer tests: a dataset of shuffled rows with token refs, and a small SAE on them."""

from __future__ import annotations

import lightning as L
import torch
from oracle import RowsSeen
from torch.utils.data import DataLoader, Dataset

from lightning_sae_samples.token_sources import ArrayTokenSource

NUM_SEQ, SEQ_LEN, VOCAB, D, F = 12, 8, 20, 6, 10
PAD = 0
K, CTX, THR = 4, 4, 0.5
#: The callback settings of the Trainer tests on rows (and of their DDP script).
SETTINGS = dict(collection_freq=2, max_samples_per_feature=K, samples_per_feature_to_save=K, context_size=CTX,
                activation_threshold=THR, top_features_to_save=F, samples_per_interval=2, recent_window_steps=3)


def corpus_tokens(seed: int = 0) -> torch.Tensor:
    """Token ids ``[S, T]``, the pretokenized data; some sequences end in padding (id 0)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (NUM_SEQ, SEQ_LEN), generator=gen)
    tokens[::3, -2:] = PAD
    return tokens


def token_source() -> ArrayTokenSource:
    """The source the rows point into (module-level for the import-path form, ``"rows_helpers:token_source"``)."""
    return ArrayTokenSource(corpus_tokens(), pad_token_id=PAD)


class CachedRows(Dataset):
    """One row per real token: its cached activation ``[D]`` (a function of the token and position) and its ref."""

    def __init__(self, tokens: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(5)
        embed = torch.randn(VOCAB, D, generator=gen)
        position = torch.randn(tokens.shape[1], D, generator=gen) * 0.3
        acts = embed[tokens] + position
        refs = torch.arange(tokens.numel())
        real = tokens.reshape(-1) != PAD  # as SAELens drops special tokens before mixing
        self.acts, self.refs = acts.reshape(-1, D)[real], refs[real]

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict:
        return {"acts": self.acts[i], "token_refs": self.refs[i]}


class RowSAE(L.LightningModule):
    """A fixed ReLU encoder on activation rows (latents on a 0.5 grid: ties); records every batch it returned."""

    def __init__(self, mode: str = "dense", k: int = 3) -> None:
        super().__init__()
        self.mode, self.k, self.num_latents = mode, k, F
        gen = torch.Generator().manual_seed(9)
        self.register_buffer("weight", torch.randn(D, F, generator=gen), persistent=False)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[RowsSeen] = []

    def training_step(self, batch, batch_idx):
        latents = torch.round(torch.relu(batch["acts"] @ self.weight) * 2) / 2 * self.scale
        out = {"loss": (self.scale - 1.0) ** 2 + 0.0 * latents.sum()}
        if self.mode == "sparse":
            values, indices = latents.topk(self.k, dim=-1)
            out.update(latent_indices=indices, latent_values=values)
            dense = torch.zeros_like(latents).scatter(-1, indices, values)
        else:
            out["latents"] = latents
            dense = latents
        self.seen.append(RowsSeen(self.trainer.global_step, self.global_rank, batch["token_refs"].tolist(),
                                  dense.detach().cpu(), source=corpus_tokens(), pad_id=PAD))
        return out

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def shuffled_rows(seed: int = 0, batch_size: int = 7) -> DataLoader:
    """The cached rows in a shuffled ``DataLoader`` (its own seeded order)."""
    return DataLoader(CachedRows(corpus_tokens()), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
