"""Shared fixtures: the two entry points driven alike, and the merge policies the oracle tests run under.

The classes and data they build on (tiny synthetic SAEs, token data, the callback and collector factories, the
oracle checks) live in ``helpers.py`` and ``oracle.py``, which subprocess scripts import too.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import COLLECTOR_SETTINGS, make_collector, read_dir, to_sparse, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from oracle import Seen, assert_dir_matches_oracle

from lightning_sae_samples import ActivationSampleCallback

#: The collection both entry points run in the parametrized tests (``COLLECTOR_SETTINGS``: 9 latents).
F, K, CTX, THR = 9, COLLECTOR_SETTINGS["max_samples_per_feature"], COLLECTOR_SETTINGS["context_size"], 0.5


class ReplaySAE(L.LightningModule):
    """Returns, at optimizer step ``i``, the ``i``-th given latents (dense, or their TopK) for the batch's tokens."""

    def __init__(self, batches: list, mode: str, num_latents: int, hand_over=None) -> None:
        super().__init__()
        self.batches, self.mode, self.num_latents = batches, mode, num_latents
        self.hand_over = hand_over  # outputs dict -> what training_step returns instead (views, other dtypes)
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        latents = self.batches[int(batch["index"])][2]
        loss = self.weight**2
        if self.mode == "sparse":
            indices, values, _ = to_sparse(latents)
            out = {"loss": loss, "latent_indices": indices, "latent_values": values}
        else:
            out = {"loss": loss, "latents": latents}
        return out if self.hand_over is None else self.hand_over(out)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class EntryPoint:
    """Collect the same batches through the callback (a real ``Trainer``) or the collector (a plain loop).

    Every batch is one optimizer step. ``batches`` are ``(tokens, mask or None, dense latents)``.
    """

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root

    def collect(self, batches: list, mode: str = "dense", dirpath: Path | None = None, ckpt: Path | None = None,
                resume: Path | None = None, hand_over=None, **settings) -> tuple[Path, list]:
        """Collect and save; returns the samples directory and what the oracle must see."""
        dirpath = dirpath or self.root / "samples"
        settings = {**COLLECTOR_SETTINGS, **settings}
        seen = [Seen(step, 0, 0, tokens, to_sparse(latents)[2] if mode == "sparse" else latents, mask)
                for step, (tokens, mask, latents) in enumerate(batches)]
        if self.kind == "collector":
            collector = make_collector(**settings, num_latents=batches[0][2].shape[-1] if mode == "sparse" else None)
            if resume is not None:
                collector.load_state_dict(torch.load(resume, weights_only=True))
            for step, (tokens, mask, latents) in enumerate(batches):
                if mode == "sparse":
                    indices, values, _ = to_sparse(latents)
                    collector.update(tokens, latent_indices=indices, latent_values=values, step=step,
                                     attention_mask=mask)
                else:
                    collector.update(tokens, latents=latents, step=step, attention_mask=mask)
            if ckpt is not None:
                torch.save(collector.state_dict(), ckpt)
            collector.save(dirpath)
            return dirpath, seen
        items = [{"index": i, "tokens": t, **({} if m is None else {"attention_mask": m.long()})}
                 for i, (t, m, _) in enumerate(batches)]
        callbacks = [ActivationSampleCallback(collection_freq=1, dirpath=dirpath, **settings)]
        if ckpt is not None:
            callbacks.append(ModelCheckpoint(dirpath=ckpt.parent, filename=ckpt.stem, save_last=False))
        module = ReplaySAE(batches, mode, batches[0][2].shape[-1], hand_over)
        run = trainer(self.root, callbacks, max_steps=len(batches), enable_checkpointing=ckpt is not None)
        run.fit(module, torch.utils.data.DataLoader(items, batch_size=None),
                ckpt_path=None if resume is None else resume)
        return dirpath, seen

    def checkpoint_path(self, name: str) -> Path:
        """Where :meth:`collect` (``ckpt=``) leaves a checkpoint to resume from."""
        return self.root / "ckpt" / (f"{name}.pt" if self.kind == "collector" else f"{name}.ckpt")

    @staticmethod
    def check(dirpath: Path, seen: list, exclude=()) -> dict:
        """The directory equals the brute-force oracle over ``seen``; returns its files."""
        return assert_dir_matches_oracle(read_dir(dirpath), seen, F, K, CTX, THR, exclude=exclude)


@pytest.fixture(params=["callback", "collector"])
def entry(request, tmp_path) -> EntryPoint:
    """Each entry point in turn: ``ActivationSampleCallback`` in a Trainer, ``ActivationSampleCollector`` in a loop."""
    (tmp_path / "ckpt").mkdir()
    return EntryPoint(request.param, tmp_path)


def _hypothesis_profiles() -> None:
    """``default``: few examples, derandomized (a fixed seed), fast enough for every run; ``long``: by hand."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the property tests skip themselves
        return
    import os

    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("default", max_examples=60, derandomize=True, **common)
    settings.register_profile("long", max_examples=3000, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


_hypothesis_profiles()
