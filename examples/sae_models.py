"""Sparse autoencoders as LightningModules, with the outputs ``ActivationSampleCallback`` reads.

* :class:`TopKSAE` keeps the ``k`` largest ReLU pre-activations per token and returns them sparsely:
  ``{"loss", "latent_indices": [B, T, k], "latent_values": [B, T, k], "tokens": [B, T]}``.
* :class:`ReLUSAE` is the classic ReLU + L1 SAE and returns dense latents:
  ``{"loss", "latents": [B, T, F], "tokens": [B, T]}``.

Both take batches ``{"tokens": [B, T], "activations": [B, T, d_model]}`` and an optional
``"mask": [B, T]`` (``True`` = real token); masked positions are left out of the loss and get latent
value 0, so they are never collected as samples.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SAEModule(L.LightningModule):
    """Shared parts of the example SAEs: input normalization, unit-norm decoder, Adam, logging.

    Args:
        d_model: Width of the input activations (linked from the datamodule by the example CLI).
        num_latents: Number of SAE latents ``F``.
        lr: Adam learning rate.
        normalize_input: Scale inputs by one constant so their mean squared norm is ``d_model``
            (estimated on the first batch), which makes ``lr`` and coefficients transferable across
            models and layers.
        warmup_steps: Linear learning-rate warmup.
    """

    def __init__(
        self,
        d_model: int = 384,
        num_latents: int = 4096,
        lr: float = 1e-3,
        normalize_input: bool = True,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.num_latents = num_latents
        self.lr = lr
        self.normalize_input = normalize_input
        self.warmup_steps = warmup_steps
        self.encoder = nn.Linear(d_model, num_latents)
        self.decoder = nn.Linear(num_latents, d_model)
        with torch.no_grad():
            w = torch.randn(d_model, num_latents)
            w /= w.norm(dim=0, keepdim=True)
            self.decoder.weight.copy_(w)
            self.encoder.weight.copy_(w.t())
            self.encoder.bias.zero_()
            self.decoder.bias.zero_()
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # -- helpers -------------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_from_batch(self, x: Tensor) -> None:
        """Estimate the input scale and set the decoder bias to the batch mean (first batch only)."""
        if self.normalize_input:
            self.input_scale.fill_(math.sqrt(self.d_model) / x.norm(dim=-1).mean().clamp_min(1e-6))
        self.decoder.bias.copy_((x * self.input_scale).mean(dim=0))
        self.initialized.fill_(True)

    def _inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """Flattened normalized inputs ``[N, d_model]`` and the optional flat mask ``[N]``."""
        x = batch["activations"].float()
        x = x.reshape(-1, x.shape[-1])
        mask = batch.get("mask")
        mask = None if mask is None else mask.reshape(-1).bool()
        if not bool(self.initialized):
            self._init_from_batch(x if mask is None else x[mask])
        return x * self.input_scale, mask

    @staticmethod
    def _mse(recon: Tensor, x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Mean squared error per token and the fraction of variance unexplained (FVU)."""
        err = (recon - x).pow(2).sum(-1)
        var = (x - x.mean(0)).pow(2).sum(-1)
        if mask is not None:
            m = mask.float()
            return (err * m).sum() / m.sum().clamp_min(1) / x.shape[-1], (err * m).sum() / (var * m).sum()
        return err.mean() / x.shape[-1], err.sum() / var.sum().clamp_min(1e-12)

    @torch.no_grad()
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Keep decoder columns at unit norm, so latent values measure feature strength."""
        w = self.decoder.weight
        w /= w.norm(dim=0, keepdim=True).clamp_min(1e-8)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.9, 0.999))
        warm = max(1, self.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TopKSAE(SAEModule):
    """TopK sparse autoencoder (Gao et al., 2024) returning sparse latents.

    ``z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))``, ``x_hat = W_dec z + b_dec``, loss = MSE
    (+ the optional AuxK loss that revives dead latents by reconstructing the residual with them).

    Args:
        d_model: Width of the input activations.
        num_latents: Number of latents ``F``.
        k: Active latents per token.
        lr: Adam learning rate.
        normalize_input: See :class:`SAEModule`.
        warmup_steps: Linear learning-rate warmup.
        aux_k: Dead latents used by the AuxK loss (0 turns it off).
        aux_coef: Weight of the AuxK loss.
        dead_after_tokens: A latent that has not fired for this many tokens counts as dead.
    """

    def __init__(
        self,
        d_model: int = 384,
        num_latents: int = 4096,
        k: int = 32,
        lr: float = 1e-3,
        normalize_input: bool = True,
        warmup_steps: int = 100,
        aux_k: int = 256,
        aux_coef: float = 1 / 32,
        dead_after_tokens: int = 200_000,
    ) -> None:
        super().__init__(d_model, num_latents, lr, normalize_input, warmup_steps)
        self.save_hyperparameters()
        self.k = k
        self.aux_k = aux_k
        self.aux_coef = aux_coef
        self.dead_after_tokens = dead_after_tokens
        self.register_buffer("tokens_since_fired", torch.zeros(num_latents, dtype=torch.long))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-activations ``[N, F]`` and the top-k ``(values, indices)`` ``[N, k]`` of ``ReLU(pre)``."""
        pre = self.encoder(x - self.decoder.bias)
        vals, idx = torch.topk(pre, self.k, dim=-1, sorted=False)
        return pre, vals.relu(), idx

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Reconstruction ``[N, d_model]`` from sparse latents (gather of decoder columns)."""
        # embedding_bag sums the chosen decoder columns weighted by their values: O(N k d), not O(N F d).
        # (The transposed copy is contiguous: embedding_bag on a strided table is ~6x slower on CPU.)
        table = self.decoder.weight.t().contiguous()
        return F.embedding_bag(indices, table, per_sample_weights=values, mode="sum") + self.decoder.bias

    def forward(self, activations: Tensor) -> Tensor:
        """Reconstruct ``activations`` ``[..., d_model]`` (in normalized units)."""
        x = activations.reshape(-1, activations.shape[-1]) * self.input_scale
        _, vals, idx = self.encode(x)
        return self.decode(vals, idx).view(activations.shape)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        rows = "token_refs" in batch  # shuffled single rows: no sequences, the refs locate each token
        tokens = None if rows else batch["tokens"]
        x, mask = self._inputs(batch)
        pre, vals, idx = self.encode(x)
        if mask is not None:
            vals = vals * mask.unsqueeze(-1)
        recon = self.decode(vals, idx)
        mse, fvu = self._mse(recon, x, mask)
        loss = mse

        with torch.no_grad():
            fired = torch.zeros(self.num_latents, dtype=torch.bool, device=x.device)
            fired[idx[vals > 0]] = True
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[fired] = 0
            dead = self.tokens_since_fired >= self.dead_after_tokens

        if self.aux_k > 0 and bool(dead.any()):
            # AuxK: reconstruct the residual with the top dead latents (gradients reach only them).
            n_aux = min(self.aux_k, int(dead.sum()))
            aux_pre = pre.masked_fill(~dead, -math.inf)
            aux_vals, aux_idx = torch.topk(aux_pre, n_aux, dim=-1, sorted=False)
            aux_recon = F.embedding_bag(
                aux_idx, self.decoder.weight.t().contiguous(), per_sample_weights=aux_vals.relu(), mode="sum"
            )
            residual = (x - recon).detach()
            aux_mse = (aux_recon - residual).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp_min(1e-8)
            loss = loss + self.aux_coef * aux_mse.nan_to_num(0.0)
            self.log("train/aux_mse", aux_mse, on_step=True)

        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.log("train/fvu", fvu, prog_bar=True, on_step=True)
        self.log("train/dead_frac", dead.float().mean(), prog_bar=True, on_step=True)
        self.log("train/l0", (vals > 0).float().sum(-1).mean(), on_step=True)
        if rows:  # rows [N, k]; the callback reads `token_refs` from the batch
            return {"loss": loss, "latent_indices": idx.detach(), "latent_values": vals.detach()}
        b, t = tokens.shape
        return {
            "loss": loss,
            "latent_indices": idx.detach().view(b, t, self.k),
            "latent_values": vals.detach().view(b, t, self.k),
            "tokens": tokens,
        }

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Held-out FVU; returns the latents, which a samples callback with ``collect_in`` validate reads."""
        tokens = batch["tokens"]
        b, t = tokens.shape
        x, mask = self._inputs(batch)
        _, vals, idx = self.encode(x)
        self.log("val/fvu", self._mse(self.decode(vals, idx), x, mask)[1])
        return {"latent_indices": idx.view(b, t, self.k), "latent_values": vals.view(b, t, self.k), "tokens": tokens}


class ReLUSAE(SAEModule):
    """ReLU sparse autoencoder with an L1 penalty, returning dense latents ``[B, T, F]``.

    ``z = ReLU(W_enc (x - b_dec) + b_enc)``, ``x_hat = W_dec z + b_dec``,
    loss = MSE + ``l1_coef`` * mean over tokens of ``sum_j z_j`` (decoder columns have unit norm).

    Args:
        d_model: Width of the input activations.
        num_latents: Number of latents ``F``.
        l1_coef: Weight of the L1 sparsity penalty (per token, in normalized units).
        lr: Adam learning rate.
        normalize_input: See :class:`SAEModule`.
        warmup_steps: Linear learning-rate warmup (the L1 weight warms up along with it).
    """

    def __init__(
        self,
        d_model: int = 384,
        num_latents: int = 4096,
        l1_coef: float = 5e-3,
        lr: float = 1e-3,
        normalize_input: bool = True,
        warmup_steps: int = 100,
    ) -> None:
        super().__init__(d_model, num_latents, lr, normalize_input, warmup_steps)
        self.save_hyperparameters()
        self.l1_coef = l1_coef

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``[N, F]``."""
        return F.relu(self.encoder(x - self.decoder.bias))

    def forward(self, activations: Tensor) -> Tensor:
        """Reconstruct ``activations`` ``[..., d_model]`` (in normalized units)."""
        x = activations.reshape(-1, activations.shape[-1]) * self.input_scale
        return self.decoder(self.encode(x)).view(activations.shape)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        tokens = batch["tokens"]
        b, t = tokens.shape
        x, mask = self._inputs(batch)
        z = self.encode(x)
        if mask is not None:
            z = z * mask.unsqueeze(-1)
        recon = self.decoder(z)
        mse, fvu = self._mse(recon, x, mask)
        l1 = z.sum(-1).mean() if mask is None else z.sum(-1).sum() / mask.sum().clamp_min(1)
        ramp = min(1.0, (self.global_step + 1) / max(1, self.warmup_steps))
        loss = mse + self.l1_coef * ramp * l1
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.log("train/fvu", fvu, prog_bar=True, on_step=True)
        self.log("train/l0", (z > 0).float().sum(-1).mean(), prog_bar=True, on_step=True)
        return {"loss": loss, "latents": z.detach().view(b, t, self.num_latents), "tokens": tokens}

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Held-out FVU; returns the latents, which a samples callback with ``collect_in`` validate reads."""
        tokens = batch["tokens"]
        b, t = tokens.shape
        x, mask = self._inputs(batch)
        z = self.encode(x)
        self.log("val/fvu", self._mse(self.decoder(z), x, mask)[1])
        return {"latents": z.view(b, t, self.num_latents), "tokens": tokens}
