"""Bad configuration and bad input get errors that say what to fix."""

import math
import os

import lightning as L
import pytest
import torch
from helpers import SyntheticSAE, loader, trainer

from lightning_sae_samples import ActivationSampleCallback, LatentInputError
from lightning_sae_samples.inputs import DEFAULT_KEYS, read_latents


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(collection_freq=0), "collection_freq"),
        (dict(collection_freq=-5), "collection_freq"),
        (dict(collection_freq={0: 10, 100: 0}), "collection_freq"),
        (dict(collection_freq={}), "collection_freq"),
        (dict(tokens_key=""), "tokens_key"),
    ],
)
def test_bad_callback_arguments_name_the_argument(kwargs, match):
    # (the collection's settings: test_entry_points, for the callback and the collector)
    with pytest.raises(ValueError, match=match):
        ActivationSampleCallback(**kwargs)


KEYS = DEFAULT_KEYS
TOK = torch.zeros(2, 5, dtype=torch.long)


@pytest.mark.parametrize(
    "outputs, batch, match",
    [
        (torch.tensor(1.0), {}, "must return a dict"),
        ({"loss": 1, "z": torch.zeros(2, 5, 3)}, {"tokens": TOK}, r"keys: \['loss', 'z'\].*latents"),
        ({"latents": torch.zeros(2, 5, 3)}, {"ids": TOK}, r"`tokens`.*\['latents'\].*\['ids'\]"),
        ({"latents": torch.zeros(2, 4, 3)}, {"tokens": TOK}, r"\(2, 4, 3\).*\(2, 5\)"),
        ({"latents": torch.zeros(9, 3)}, {"tokens": TOK}, r"\(9, 3\).*\(2, 5\)"),
        ({"latents": torch.zeros(2, 5, 3)}, {"tokens": TOK.float()}, "integer token ids"),
        ({"latent_indices": torch.zeros(2, 5, 2), "latent_values": torch.zeros(2, 5, 2)}, {"tokens": TOK},
         "integer tensor"),
        ({"latent_indices": torch.zeros(2, 5, 2, dtype=torch.long), "latent_values": torch.zeros(2, 5, 3)},
         {"tokens": TOK}, r"\(2, 5, 3\).*\(2, 5, 2\)"),
    ],
)
def test_bad_inputs_are_explained(outputs, batch, match):
    with pytest.raises(LatentInputError, match=match):
        read_latents(outputs, batch, KEYS)


class BadSAE(SyntheticSAE):
    def __init__(self, bad: str, **kw):
        super().__init__(**kw)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.bad == "range":
            out["latent_indices"] = out["latent_indices"] + self.num_latents
        elif self.bad == "latent_count" and batch_idx == 1:
            out["latents"] = out["latents"][..., :-1]
        elif self.bad == "nan":
            out["latents"] = out["latents"].clone()
            out["latents"][0, 0, 3] = math.nan
            if batch_idx == 2:
                out["latents"] = torch.full_like(out["latents"], math.nan)
        return out


def test_out_of_range_sparse_indices(tmp_path):
    cb = ActivationSampleCallback(collection_freq=1, dirpath=tmp_path / "s")
    with pytest.raises(LatentInputError, match=r"indices in \[10, .*10 latents"):
        trainer(tmp_path, [cb]).fit(BadSAE("range", mode="sparse"), loader())


def test_latent_count_changing_between_steps(tmp_path):
    cb = ActivationSampleCallback(collection_freq=1, dirpath=tmp_path / "s")
    with pytest.raises(LatentInputError, match="changed from 10 to 9"):
        trainer(tmp_path, [cb]).fit(BadSAE("latent_count"), loader())


def test_sparse_without_known_latent_count(tmp_path):
    module = SyntheticSAE(mode="sparse")
    del module.num_latents
    cb = ActivationSampleCallback(collection_freq=1, dirpath=tmp_path / "s")
    with pytest.raises(LatentInputError, match="num_latents=F"):
        trainer(tmp_path, [cb]).fit(module, loader())


def test_non_finite_latents_are_skipped_with_one_warning(tmp_path):
    cb = ActivationSampleCallback(collection_freq=1, dirpath=tmp_path / "s", activation_threshold=0.5)
    with pytest.warns(UserWarning, match=r"skipped \d+ non-finite") as record:
        trainer(tmp_path, [cb], max_steps=4).fit(BadSAE("nan"), loader())
    assert len([w for w in record if "non-finite" in str(w.message)]) == 1
    summary = (tmp_path / "s" / "collection_summary.json").read_text()
    assert '"nonfinite_skipped": ' + str(3 + 4 * 9 * 10) in summary


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; covered by the file-path case")
def test_unwritable_dirpath_fails_in_setup_readonly(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    cb = ActivationSampleCallback(dirpath=ro / "samples")
    with pytest.raises(ValueError, match="cannot write"):
        trainer(tmp_path, [cb]).fit(SyntheticSAE(), loader())


def test_invalid_dirpath_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    module = SyntheticSAE()
    cb = ActivationSampleCallback(dirpath=blocker / "samples")
    with pytest.raises(ValueError, match=f"cannot write to `dirpath` '{blocker / 'samples'}'"):
        trainer(tmp_path, [cb]).fit(module, loader())
    assert module.seen == []


def test_callback_is_configurable_from_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_sae_samples.ActivationSampleCallback
      init_args:
        collection_freq: {{0: 1, 2: 5}}
        max_samples_per_feature: 3
        samples_per_feature_to_save: 2
        context_size: 2
        activation_threshold: 0.25
        rank_features_by: activation_count
        dirpath: {tmp_path / "yaml_samples"}
"""
    )

    class DataModule(L.LightningDataModule):
        def train_dataloader(self):
            return loader()

    cli = LightningCLI(SyntheticSAE, DataModule, args=["fit", "--config", str(config)], save_config_callback=None)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ActivationSampleCallback))
    assert cb.schedule.as_config() == {0: 1, 2: 5}
    assert cb.settings.rank_features_by == "activation_count"
    assert (tmp_path / "yaml_samples" / "collection_summary.json").exists()
