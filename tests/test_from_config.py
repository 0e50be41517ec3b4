"""ActivationSampleCallback.from_config: the configuration of the tool this project replaces."""

import logging
from types import SimpleNamespace

import pytest
from helpers import SyntheticSAE, loader, read_dir, trainer

from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples.config import SEED_KEYS

SEED = {
    "save_activation_samples": True,
    "sample_collection_freq": 3,
    "max_samples_per_feature": 7,
    "sample_context_size": 4,
    "sample_activation_threshold": 0.25,
    "top_features_to_save": 5,
    "samples_per_feature_to_save": 2,
    "learning_rate": 1e-3,  # the rest of a training config is not ours and is left alone
}


@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "object"])
def test_every_seed_key_maps_to_its_setting(as_object):
    cfg = SimpleNamespace(**SEED) if as_object else SEED
    cb = ActivationSampleCallback.from_config(cfg, dirpath="somewhere")
    assert set(SEED_KEYS) == {k for k in SEED if k not in ("save_activation_samples", "learning_rate")}
    for seed_key, setting in SEED_KEYS.items():
        value = getattr(cb.settings, setting)
        assert value == SEED[seed_key], seed_key
    assert str(cb.dirpath) == "somewhere"


def test_a_seed_config_collects_through_a_trainer(tmp_path):
    cb = ActivationSampleCallback.from_config({**SEED, "sample_collection_freq": 1}, dirpath=tmp_path / "samples")
    trainer(tmp_path, [cb]).fit(SyntheticSAE(num_latents=8), loader())
    summary = read_dir(tmp_path / "samples")["collection_summary.json"]
    assert summary["config"]["context_size"] == 4 and summary["config"]["max_samples_per_feature"] == 7
    assert len([k for k in read_dir(tmp_path / "samples") if k.startswith("feature_")]) == 5


def test_save_activation_samples_false_gives_no_callback_and_says_so(caplog):
    caplog.set_level(logging.INFO)
    assert ActivationSampleCallback.from_config({**SEED, "save_activation_samples": False}) is None
    assert any("save_activation_samples is false" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "key, meant",
    [("sample_context_sise", "sample_context_size"), ("max_sample_per_feature", "max_samples_per_feature"),
     ("sample_activation_treshold", "sample_activation_threshold"), ("samples_per_feature_to_sav",
                                                                     "samples_per_feature_to_save")],
)
def test_a_look_alike_key_names_the_closest(key, meant):
    with pytest.raises(ValueError, match=rf"{key!r}.*did you mean {meant!r}"):
        ActivationSampleCallback.from_config({"save_activation_samples": True, key: 3})
