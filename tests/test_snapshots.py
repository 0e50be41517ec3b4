"""Snapshots with one SAE state: evaluation loops collect into their own samples directory per run."""

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import (
    CTX,
    F,
    K,
    SyntheticSAE,
    TokenDataset,
    assert_same,
    callback_factory,
    check_against_oracle,
    loader,
    read_dir,
)
from helpers import trainer as make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae_samples import ActivationSampleAnalyzer

make_callback = callback_factory(
    collection_freq=2, max_samples_per_feature=K, context_size=CTX, activation_threshold=0.5, top_features_to_save=F,
    samples_per_feature_to_save=K, write_report=False,
)
VAL = TokenDataset(num_sequences=12, seed=5)


def snapshot_dir(root, step):
    return root / "samples" / "snapshots" / f"step_{step}"


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_trainer_validate_alone_writes_a_snapshot_equal_to_the_oracle_with_one_step(tmp_path, mode):
    module = SyntheticSAE(num_latents=F, mode=mode)
    trainer = make_trainer(tmp_path, [make_callback(tmp_path, collect_in=("validate",))])
    trainer.validate(module, loader(VAL))
    (run,) = module.eval_runs
    files = check_against_oracle(snapshot_dir(tmp_path, 0), run)
    summary = files["collection_summary.json"]
    assert summary["source"] == "validate" and summary["weights_step"] == 0
    assert summary["tokens_seen"] == sum(s.tokens.numel() for s in run)
    assert summary["first_collected_step"] == summary["last_collected_step"] == 0  # one SAE state
    assert not (tmp_path / "samples" / "collection_summary.json").exists()  # no training collection


def test_validation_runs_during_fit_are_snapshots_that_never_enter_the_training_collection(tmp_path):
    def fit(root, collect_in):
        module = SyntheticSAE(num_latents=F)
        callbacks = [make_callback(root, collect_in=collect_in), ModelCheckpoint(dirpath=root / "ckpt", save_last=True)]
        run = make_trainer(root, callbacks, max_epochs=2, enable_checkpointing=True, check_val_every_n_epoch=1,
                           num_sanity_val_steps=2)
        run.fit(module, loader(), loader(VAL))
        return module, run

    module, run = fit(tmp_path / "with", ("train", "validate"))
    plain, _ = fit(tmp_path / "without", ("train",))
    assert len(module.eval_runs) == 2  # one per epoch; the sanity check is not collected
    for eval_run in module.eval_runs:
        step = eval_run[0].step
        check_against_oracle(snapshot_dir(tmp_path / "with", step), eval_run)
    with_val, without = read_dir(tmp_path / "with" / "samples"), read_dir(tmp_path / "without" / "samples")
    for name in without:  # the training collection is what a run without snapshots collects
        if name == "collection_summary.json":
            for files in (with_val, without):
                files[name]["config"].pop("collect_in"), files[name]["config"].pop("dirpath", None)
        assert_same(with_val[name], without[name], name)
    ckpt = torch.load(tmp_path / "with" / "ckpt" / "last.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ActivationSampleCallback"))
    assert int(state["collector"]["tokens_seen"]) == sum(s.tokens.numel() for s in module.seen if s.step % 2 == 0)


def test_resuming_with_snapshots_continues_the_training_collection_exactly(tmp_path):
    full = tmp_path / "full"
    make_trainer(full, [make_callback(full, collect_in=("train", "validate"))], max_epochs=2,
                 num_sanity_val_steps=0).fit(SyntheticSAE(num_latents=F), loader(), loader(VAL))
    part = tmp_path / "part"
    first = [make_callback(part, collect_in=("train", "validate")), ModelCheckpoint(dirpath=part / "ckpt",
                                                                                      save_last=True)]
    make_trainer(part, first, max_epochs=1, enable_checkpointing=True, num_sanity_val_steps=0).fit(
        SyntheticSAE(num_latents=F), loader(), loader(VAL))
    make_trainer(part, [make_callback(part, collect_in=("train", "validate"))], max_epochs=2,
                 num_sanity_val_steps=0).fit(SyntheticSAE(num_latents=F), loader(), loader(VAL),
                                             ckpt_path=part / "ckpt" / "last.ckpt")
    a, b = read_dir(full / "samples"), read_dir(part / "samples")
    for files in (a, b):
        files["collection_summary.json"]["config"].pop("dirpath", None)
    assert a.keys() == b.keys()
    assert_same(a, b)
    last = max(int(p.name.split("_")[1]) for p in (full / "samples" / "snapshots").iterdir())
    assert_same(read_dir(snapshot_dir(full, last)), read_dir(snapshot_dir(part, last)))


def test_the_analyzer_reads_a_snapshot_and_a_later_fit_reuses_the_directory(tmp_path):
    module = SyntheticSAE(num_latents=F)
    make_trainer(tmp_path, [make_callback(tmp_path, collect_in=("validate",))]).validate(module, loader(VAL))
    analyzer = ActivationSampleAnalyzer(snapshot_dir(tmp_path, 0))
    assert analyzer.saved_features and analyzer.summary.tokens_seen == 12 * 9
    make_trainer(tmp_path, [make_callback(tmp_path)]).fit(SyntheticSAE(num_latents=F), loader())  # not refused
    assert json.loads((tmp_path / "samples" / "collection_summary.json").read_text())["steps_collected"] > 0
    assert (snapshot_dir(tmp_path, 0) / "collection_summary.json").exists()  # the snapshot is left alone


DDP = """
import sys, torch
sys.path.insert(0, {tests!r})
import lightning as L
from helpers import SyntheticSAE, TokenDataset, callback_factory, loader
from test_snapshots import make_callback, VAL
root = {root!r}
module = SyntheticSAE(num_latents=10)
trainer = L.Trainer(accelerator="cpu", devices={devices}, strategy="ddp" if {devices} > 1 else "auto", logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                    callbacks=[make_callback(root, collect_in=("validate",))])
trainer.validate(module, loader(VAL))
torch.save(module.eval_runs[-1], f"{{root}}/eval_{{trainer.global_rank}}.pt")
"""


def test_a_ddp_validation_snapshot_equals_the_single_process_one(tmp_path):
    tests = str(Path(__file__).parent)
    runs = {}
    for devices in (1, 2):
        root = tmp_path / f"devices_{devices}"
        root.mkdir()
        script = root / "run.py"
        script.write_text(DDP.format(tests=tests, root=str(root), devices=devices))
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        seen = [s for f in sorted(root.glob("eval_*.pt")) for s in torch.load(f, weights_only=False)]
        check_against_oracle(snapshot_dir(root, 0), seen)
        runs[devices] = read_dir(snapshot_dir(root, 0))
    one, two = runs[1], runs[2]
    for name in one:
        if name.startswith("feature_"):
            # Equal values and statistics; among equal values the order follows (step, rank, position), and
            # DistributedSampler puts other sequences on rank 0, so which of two tied samples is kept may differ
            # (each directory equals the oracle over what its ranks saw, above).
            values = [s["activation_value"] for s in one[name]["top_samples"]]
            assert values == [s["activation_value"] for s in two[name]["top_samples"]], name
            assert one[name]["statistics"] == two[name]["statistics"], name
    assert one["collection_summary.json"]["tokens_seen"] == two["collection_summary.json"]["tokens_seen"]


def test_reports_say_which_kind_of_directory_they_show(tmp_path):
    module = SyntheticSAE(num_latents=F)
    make_trainer(tmp_path, [make_callback(tmp_path, collect_in=("train", "validate"))], max_epochs=2,
                 num_sanity_val_steps=0).fit(module, loader(), loader(VAL))
    training = ActivationSampleAnalyzer(tmp_path / "samples")
    assert "training-time collection, mixing the SAE states of steps 0–" in training.render_markdown()
    last = max(int(p.name.split("_")[1]) for p in (tmp_path / "samples" / "snapshots").iterdir())
    snapshot = ActivationSampleAnalyzer(snapshot_dir(tmp_path, last))
    assert f"snapshot of one SAE state (step {last}, validate run)" in snapshot.render_html()
    assert snapshot.summary.kind.startswith("snapshot")


def test_trainer_validate_with_ckpt_path_snapshots_the_checkpoint_weights(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    callbacks = [make_callback(tmp_path), ModelCheckpoint(dirpath=ckpt_dir, save_last=True)]
    make_trainer(tmp_path, callbacks, max_epochs=1, enable_checkpointing=True).fit(SyntheticSAE(num_latents=F),
                                                                                    loader())
    steps = json.loads((tmp_path / "samples" / "collection_summary.json").read_text())["global_step"]
    module = SyntheticSAE(num_latents=F)
    post_hoc = make_trainer(tmp_path, [make_callback(tmp_path, collect_in=("validate",))])
    post_hoc.validate(module, loader(VAL), ckpt_path=ckpt_dir / "last.ckpt")
    (run,) = module.eval_runs
    for seen in run:  # the trainer's counter stays 0 in validate; the snapshot has the checkpoint's step
        seen.step = steps
    files = check_against_oracle(snapshot_dir(tmp_path, steps), run)
    assert files["collection_summary.json"]["weights_step"] == steps


def test_a_snapshot_of_a_checkpoint_older_than_the_run_says_so(tmp_path, caplog):
    # every_n_train_steps + save_last: Lightning writes last.ckpt at the last periodic save, not at the end.
    caplog.set_level(logging.INFO)
    ckpt_dir = tmp_path / "ckpt"
    callbacks = [make_callback(tmp_path, collect_in=("train", "validate")),
                 ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_last=True)]
    run = make_trainer(tmp_path, callbacks, max_steps=8, max_epochs=-1, enable_checkpointing=True)
    module = SyntheticSAE(num_latents=F)
    run.fit(module, loader())
    assert run.global_step == 8
    caplog.clear()
    run.validate(module, loader(VAL), ckpt_path="last")
    summary = json.loads((snapshot_dir(tmp_path, 6) / "collection_summary.json").read_text())
    assert (summary["weights_step"], summary["trained_step"]) == (6, 8)
    saved = [r.getMessage() for r in caplog.records if "saved samples" in r.getMessage()]
    assert len(saved) == 1 and "at step 6 (weights of step 6, older than the run's last training step 8)" in saved[0]
    report = ActivationSampleAnalyzer(snapshot_dir(tmp_path, 6)).render_markdown()
    assert "snapshot of one SAE state (step 6, validate run; older than the run's last training step 8)" in report

    run.validate(module, loader(VAL))  # the in-memory weights: those training ended with, nothing to say
    final = json.loads((snapshot_dir(tmp_path, 8) / "collection_summary.json").read_text())
    assert final["weights_step"] == 8 and "trained_step" not in final


def test_save_and_validation_log_lines_are_true_and_minimal(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    callbacks = [make_callback(tmp_path, collection_freq=4, collect_in=("train", "validate")),
                 ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True)]
    run = make_trainer(tmp_path, callbacks, max_steps=8, max_epochs=-1, enable_checkpointing=True)
    module = SyntheticSAE(num_latents=F)
    run.fit(module, loader())  # collects steps 0 and 4; saves at 3 (twice: periodic and last), 6 (twice) and 8
    ours = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ActivationSampleCallback: ")]
    saves = [m for m in ours if "saved samples" in m or "not written again" in m]
    assert [m.split(" at step ")[1][:1] for m in saves if "saved samples" in m] == ["3", "6"]
    # The second save of a step is silent; the final save, with nothing new since step 6, says so truly.
    assert [m for m in saves if "not written again" in m] == [
        f"ActivationSampleCallback: nothing collected since the samples saved at step 6; {tmp_path / 'samples'}"
        " is not written again."
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.validate(module, loader(VAL))  # writes a snapshot beside the run's samples, replacing nothing
    assert not [str(w.message) for w in caught if "amples" in str(w.message)]
    assert (snapshot_dir(tmp_path, 8) / "collection_summary.json").is_file()
