"""The example SAE LightningModules on synthetic activations (fast; no language model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import trainer

L = pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from sae_models import ReLUSAE, TopKSAE  # noqa: E402

D, F, K = 16, 64, 4


def batch(b: int = 3, t: int = 10, seed: int = 0, mask: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {"tokens": torch.randint(0, 50, (b, t), generator=gen), "activations": torch.randn(b, t, D, generator=gen)}
    if mask:
        m = torch.ones(b, t, dtype=torch.bool)
        m[:, -3:] = False  # right padding
        out["mask"] = m
    return out


def no_log(module):
    module.log = lambda *args, **kwargs: None
    return module


def test_topk_outputs():
    sae = no_log(TopKSAE(d_model=D, num_latents=F, k=K))
    b = batch()
    out = sae.training_step(b, 0)
    assert out["latent_indices"].shape == (3, 10, K) and out["latent_values"].shape == (3, 10, K)
    assert out["tokens"] is b["tokens"]
    assert (out["latent_values"] >= 0).all() and not out["latent_values"].requires_grad
    assert out["latent_indices"].max() < F
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    # The returned latents are the k largest ReLU pre-activations of each token.
    x = b["activations"].reshape(-1, D) * sae.input_scale
    pre = sae.encoder(x - sae.decoder.bias).relu()
    top = torch.topk(pre, K, dim=-1).values.sort(-1).values
    got = out["latent_values"].reshape(-1, K).sort(-1).values
    torch.testing.assert_close(got, top)


def test_topk_sparse_decode_matches_dense():
    sae = TopKSAE(d_model=D, num_latents=F, k=K)
    x = torch.randn(7, D)
    _, vals, idx = sae.encode(x)
    dense = torch.zeros(7, F).scatter(1, idx, vals)
    torch.testing.assert_close(sae.decode(vals, idx), sae.decoder(dense))


@pytest.mark.parametrize("cls", [TopKSAE, ReLUSAE])
def test_padding_never_fires_and_is_left_out_of_the_loss(cls):
    kwargs = {"k": K} if cls is TopKSAE else {}
    sae = no_log(cls(d_model=D, num_latents=F, **kwargs))
    b = batch(mask=True)
    out = sae.training_step(b, 0)
    values = out["latent_values"] if cls is TopKSAE else out["latents"]
    assert (values[:, -3:] == 0).all()
    # Changing padded activations does not change the loss.
    b2 = dict(b, activations=b["activations"].clone())
    b2["activations"][:, -3:] += 100.0
    torch.testing.assert_close(sae.training_step(b2, 0)["loss"], out["loss"])


def test_relu_outputs():
    sae = no_log(ReLUSAE(d_model=D, num_latents=F))
    out = sae.training_step(batch(), 0)
    assert out["latents"].shape == (3, 10, F)
    assert (out["latents"] >= 0).all() and not out["latents"].requires_grad


def test_decoder_columns_stay_unit_norm_and_loss_drops(tmp_path):
    sae = TopKSAE(d_model=D, num_latents=F, k=K, warmup_steps=1, lr=1e-2)
    loader = torch.utils.data.DataLoader([batch(seed=i) for i in range(8)] * 5, batch_size=None)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, b, i):
            losses.append(float(outputs["loss"]))

    trainer(tmp_path, [Record()]).fit(sae, loader)
    norms = sae.decoder.weight.norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("cls", [TopKSAE, ReLUSAE])
def test_example_modules_feed_the_callback(tmp_path, cls):
    samples_mod = pytest.importorskip("lightning_sae_samples")
    kwargs = {"k": K} if cls is TopKSAE else {"l1_coef": 1e-3}
    sae = cls(d_model=D, num_latents=F, **kwargs)
    loader = torch.utils.data.DataLoader([batch(seed=i) for i in range(6)], batch_size=None)
    cb = samples_mod.ActivationSampleCallback(
        collection_freq=1, context_size=4, dirpath=str(tmp_path / "samples"), write_report=False
    )
    trainer(tmp_path, [cb]).fit(sae, loader)
    summary = json.loads((tmp_path / "samples" / "collection_summary.json").read_text())
    assert summary["num_features_tracked"] == F
    assert summary["tokens_seen"] == 6 * 3 * 10
    assert summary["features_with_samples"] > 0
