"""A crash before any file-system operation of a save never stops later saves, and loses nothing.

Each test counts the operations of an uninterrupted save (see ``crash_points.py``), then, for each of them, forks a
child that dies just before it, restarts the work as a user would, and checks that the next save succeeds and that
the directory ends up equal to an uninterrupted run's, byte for byte (the history included).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from crash_points import count_operations, crash_before, files_of, one_of_each_kind
from helpers import DriftingSAE, TokenDataset, loader, make_callback, make_collector, padded_batches, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sae_samples import read_samples_dir
from lightning_sae_samples.samples_dir.names import LOCK_NAME, MANIFEST_NAME, PENDING_DIR

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="crash points fork a child")


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """These are process kills, not power cuts: what reached the page cache survives them, so ``fsync`` (slow on a
    busy disk) changes nothing a test here can see. The children still count each ``fsync`` as a crash point."""
    monkeypatch.setattr("os.fsync", lambda fd: None)


def _fed_collector(batches):
    collector = make_collector(num_latents=9, write_report=True, top_features_to_save=2)
    for step, (tokens, mask, latents) in enumerate(batches):
        collector.update(tokens, latents=latents, step=step, attention_mask=mask)
    return collector


def _save(collector, dirpath: Path, step: int) -> None:
    try:
        collector.save(dirpath, global_step=step, decoder=torch.eye(9, 4))
    finally:
        collector.close()


def _kinds(operations) -> set[str]:
    return {kind for kind, _ in operations}


@pytest.mark.parametrize("which", ["first", "later"])
def test_a_crash_before_any_operation_of_a_collector_save_leaves_a_whole_save_and_the_next_one_succeeds(
    tmp_path, which
):
    batches = padded_batches(6, seed=3)
    before = batches[:3]

    def prepare(dirpath: Path) -> None:
        """The directory as it stands before the save under test (empty, or holding the first save)."""
        if which == "later":
            _save(_fed_collector(before), dirpath, step=2)

    # Every run uses the same path: the report names its directory.
    dirpath = tmp_path / "samples"
    previous_id = None
    if which == "later":
        prepare(dirpath)
        previous_id = json.loads((dirpath / MANIFEST_NAME).read_text())["save_id"]
        shutil.rmtree(dirpath)
    prepare(dirpath)
    operations = count_operations(lambda: _save(_fed_collector(batches), dirpath, step=5), dirpath)
    assert {"write", "fsync", "rename", "mkdir", "remove", "rmdir"} <= _kinds(operations), operations
    expected = files_of(dirpath, skip=(LOCK_NAME,))
    new_id = json.loads((dirpath / MANIFEST_NAME).read_text())["save_id"]
    shutil.rmtree(dirpath)

    for i in range(len(operations)):
        prepare(dirpath)
        crash_before(i, lambda: _save(_fed_collector(batches), dirpath, step=5), dirpath)
        # What a reader sees after the crash: the previous whole save or the new one, never a mix.
        if (dirpath / MANIFEST_NAME).exists() or (dirpath / PENDING_DIR / "COMMIT").exists():
            seen = read_samples_dir(dirpath).summary["save_id"]
            assert seen in (previous_id, new_id), (i, operations[i], seen)
        else:
            assert previous_id is None, (i, operations[i])
        # The user restarts from the state they had (their checkpoint of the collector) and saves again.
        _save(_fed_collector(batches), dirpath, step=5)
        assert files_of(dirpath, skip=(LOCK_NAME,)) == expected, (i, operations[i])
        shutil.rmtree(dirpath)


def _fit_to_step_4(root: Path, ckpt_path=None) -> None:
    """A run that collects every step, saves at steps 2 and 4 (history thinned from the second window) and ends.

    Its epochs are two steps long, so each checkpoint closes one: a plain DataLoader resumes exactly only there.
    """
    model = DriftingSAE(drift_step=3, mode="sparse", num_latents=10)
    callback = make_callback(root / "samples", history_windows_per_level=1, write_report=True)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    run = trainer(root, [callback, checkpoints], max_steps=4, max_epochs=None, enable_checkpointing=True)
    run.fit(model, loader(TokenDataset(num_sequences=8)), ckpt_path=ckpt_path)


def _latest_checkpoint(root: Path):
    found = sorted((root / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.rsplit("=", 1)[1]))
    return found[-1] if found else None


def _saves(operations) -> list[range]:
    """The operations of each save: each begins by making its pending directory under a staging name."""
    starts = [i for i, (kind, path) in enumerate(operations)
              if kind == "mkdir" and path.startswith(f"{PENDING_DIR}.new-")]
    return [range(a, b) for a, b in zip(starts, [*starts[1:], len(operations)])]


@pytest.mark.parametrize("save", [0, 1], ids=["first save", "later save"])
def test_a_run_killed_before_any_operation_of_a_save_resumes_to_what_an_uninterrupted_run_writes(tmp_path, save):
    root = tmp_path / "run"
    operations = count_operations(lambda: _fit_to_step_4(root), root / "samples")
    expected = files_of(root / "samples", skip=(LOCK_NAME,))
    shutil.rmtree(root)
    saves = _saves(operations)
    assert len(saves) >= 2, operations

    for i in one_of_each_kind(operations, saves[save]):
        crash_before(i, lambda: _fit_to_step_4(root), root / "samples")
        # Restarted as a user would: from the last Lightning checkpoint the crash left, or from scratch.
        _fit_to_step_4(root, ckpt_path=_latest_checkpoint(root))
        assert files_of(root / "samples", skip=(LOCK_NAME,)) == expected, (i, operations[i])
        shutil.rmtree(root)


@pytest.mark.parametrize("had_a_save", [True, False], ids=["after a save", "before the first save"])
def test_a_pending_folder_an_older_version_left_half_made_is_cleared_and_saves_go_on(tmp_path, had_a_save):
    """Earlier versions made ``.sae_samples_pending/`` first and its marker after; a kill in between left the
    folder holding only ``.WRITER.tmp``, and every later save failed ("not created by lightning-sae-samples")."""
    samples = tmp_path / "samples"
    if had_a_save:
        _save(_fed_collector(padded_batches(2, seed=1)), samples, step=1)
    (samples / PENDING_DIR).mkdir(parents=True)
    (samples / PENDING_DIR / ".WRITER.tmp").write_bytes(b'{"wri')

    _fit_to_step_4(tmp_path)

    assert read_samples_dir(samples).summary["global_step"] == 4
    assert not (samples / PENDING_DIR).exists()
