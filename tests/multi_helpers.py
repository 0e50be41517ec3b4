"""A LightningModule training several small SAEs on one batch, for the tests of many SAEs in one run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from helpers import CTX, THR, K, latent_table, read_dir
from oracle import Seen, assert_dir_matches_oracle
from torch import nn

#: name -> (latent count, how its module returns latents). Dense and sparse mixed, different F.
THREE_SAES = {"l3": (10, "dense"), "l5": (7, "forward_output"), "blocks.7.hook_resid_pre": (12, "pair")}
SPARSE_K = 3


@dataclass
class ForwardOutput:
    """The shape of sparsify's ``ForwardOutput``: TopK ``latent_acts`` and ``latent_indices`` ``[N, k]``."""

    latent_acts: torch.Tensor
    latent_indices: torch.Tensor


class TableSAE(nn.Module):
    """Latents a fixed function of the tokens; returns them as a dense tensor, a ForwardOutput or a pair."""

    def __init__(self, num_latents: int, form: str, seed: int, vocab: int = 30) -> None:
        super().__init__()
        self.num_latents, self.form = num_latents, form
        self.register_buffer("table", latent_table(vocab, num_latents, seed=seed), persistent=False)
        self.scale = nn.Parameter(torch.ones(()))

    def dense(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device) % 3 == 0
        return (self.table[tokens] + 0.5 * pos.view(1, -1, 1)) * self.scale

    def forward(self, tokens: torch.Tensor):
        lat = self.dense(tokens)
        if self.form == "dense":
            return lat
        values, indices = torch.topk(lat.reshape(-1, self.num_latents), SPARSE_K, dim=-1)
        if self.form == "forward_output":
            return ForwardOutput(latent_acts=values, latent_indices=indices)
        return indices, values


def dense_view(out, shape) -> torch.Tensor:
    """The dense ``[B, T, F]`` latents a module's output stands for (what the oracle sees)."""
    if isinstance(out, torch.Tensor):
        return out.detach().float().cpu()
    indices, values = (out.latent_indices, out.latent_acts) if isinstance(out, ForwardOutput) else out
    dense = torch.zeros(indices.shape[0], shape[-1]).scatter(-1, indices.cpu(), values.detach().float().cpu())
    return dense.view(shape)


class MultiSAEModule(L.LightningModule):
    """Trains ``saes`` (name -> (F, form)) on the batch's tokens; ``route="outputs"`` returns each SAE's output
    under its name, ``"hooks"`` returns the loss alone. Keeps what each SAE returned in ``seen[name]``."""

    def __init__(self, saes: dict | None = None, route: str = "outputs") -> None:
        super().__init__()
        saes = saes or THREE_SAES
        self.route = route
        self.saes = nn.ModuleDict({
            name.replace(".", "_"): TableSAE(f, form, seed=i + 1) for i, (name, (f, form)) in enumerate(saes.items())
        })
        self.sae_names = list(saes)
        self.seen: dict[str, list[Seen]] = {name: [] for name in saes}
        self._rows: dict[int, int] = {}

    def module_name(self, name: str) -> str:
        """The SAE's module name on this LightningModule."""
        return "saes." + name.replace(".", "_")

    def training_step(self, batch, batch_idx):
        tokens = batch["tokens"]
        step = self.trainer.global_step
        offset = self._rows.get(step, 0)
        self._rows[step] = offset + tokens.shape[0]
        loss = 0.0
        outputs = {}
        for name in self.sae_names:
            sae = self.saes[name.replace(".", "_")]
            out = sae(tokens)
            dense = dense_view(out, (*tokens.shape, sae.num_latents))
            self.seen[name].append(Seen(step, self.global_rank, offset, tokens.detach().cpu(), dense))
            loss = loss + (sae.scale - 1.0) ** 2
            outputs[name] = out
        if self.route == "outputs":
            return {"loss": loss, **outputs}
        return loss

    def validation_step(self, batch, batch_idx):
        """The outputs route in evaluation: each SAE's output under its name; kept in ``eval_seen``."""
        tokens = batch["tokens"]
        offset = self._eval_rows
        self._eval_rows += tokens.shape[0]
        outputs = {}
        for name in self.sae_names:
            sae = self.saes[name.replace(".", "_")]
            outputs[name] = out = sae(tokens)
            dense = dense_view(out, (*tokens.shape, sae.num_latents))
            self.eval_seen.setdefault(name, []).append(
                Seen(self.trainer.global_step, self.global_rank, offset, tokens.detach().cpu(), dense))
        return outputs

    def on_validation_epoch_start(self):
        self.eval_seen, self._eval_rows = {}, 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def collected(seen: list[Seen], freq: int) -> list[Seen]:
    """What a collection every ``freq`` steps sees."""
    return [s for s in seen if s.step % freq == 0]


def assert_run_matches_oracle(run_dir: Path, seen: dict[str, list[Seen]], saes: dict, n: int = K) -> None:
    """Each SAE's folder of the run equals the brute-force oracle over what that SAE returned."""
    for name, (num_latents, _) in saes.items():
        assert_dir_matches_oracle(read_dir(Path(run_dir) / name), seen[name], num_latents, K, CTX, THR, n=n)


#: The small collection of these tests (helpers' K, CTX, THR).
SETTINGS = dict(
    max_samples_per_feature=K, context_size=CTX, activation_threshold=THR, top_features_to_save=12,
    samples_per_feature_to_save=K, write_report=False,
)
