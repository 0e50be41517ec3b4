"""Atomic saves: a process killed in the middle of a save never leaves a half-written samples directory."""

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import WRITE, state_after

from lightning_sae_samples.samples_dir.commit import read_manifest
from lightning_sae_samples.samples_dir.files import load_json
from lightning_sae_samples.samples_dir.names import MANIFEST_NAME, PENDING_DIR, SUMMARY_NAME, SamplesDirectoryError
from lightning_sae_samples.samples_dir.reader import read_samples_dir
from lightning_sae_samples.samples_dir.writer import write_samples_dir


def snapshot(path):
    d = read_samples_dir(path)
    return d.summary, {i: load_json(p) for i, p in d.feature_files.items()}


def test_failure_before_commit_leaves_previous_save(tmp_path):
    write_samples_dir(tmp_path, state_after(1), global_step=1, **WRITE)
    before = snapshot(tmp_path)

    def crash(pending):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_samples_dir(tmp_path, state_after(4, seed=1), global_step=4, before_commit=crash, **WRITE)
    assert snapshot(tmp_path) == before
    # the next save cleans up the abandoned pending files
    write_samples_dir(tmp_path, state_after(5, seed=2), global_step=5, **WRITE)
    assert not (tmp_path / PENDING_DIR).exists()
    assert read_samples_dir(tmp_path).summary["global_step"] == 5


KILL = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from helpers import state_after, WRITE
    from lightning_sae_samples.samples_dir.names import PENDING_DIR
    from lightning_sae_samples.samples_dir.writer import write_samples_dir
    where = sys.argv[2]
    write_samples_dir(sys.argv[1], state_after(1), global_step=1, **WRITE)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".json") and PENDING_DIR not in str(dst):
            calls.append(dst)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    def before_commit(pending):
        if where == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = replace

    write_samples_dir(sys.argv[1], state_after(6, seed=3), global_step=6, before_commit=before_commit, **WRITE)
    """
)


@pytest.mark.parametrize("where", ["before", "during"])
def test_killed_process_mid_save_leaves_a_complete_save(tmp_path, where):
    script = tmp_path / "kill.py"
    script.write_text(KILL.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, str(script), str(out), where], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    summary, features = snapshot(out)
    expected_step = 1 if where == "before" else 6
    assert summary["global_step"] == expected_step
    assert sorted(features) == sorted(e["feature_idx"] for e in summary["top_features_by_activation"])
    for entry in summary["top_features_by_activation"]:
        stats = features[entry["feature_idx"]]["statistics"]
        assert stats["activation_count"] == entry["activation_count"]
    if where == "during":
        # files on disk are a mix; the reader resolves the commit record to the new complete save
        assert (out / PENDING_DIR / "COMMIT").exists()
        on_disk = json.loads((out / SUMMARY_NAME).read_text())
        assert on_disk["global_step"] == 1
        write_samples_dir(out, state_after(6, seed=3), global_step=7, **WRITE)
        assert not (out / PENDING_DIR).exists()


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(SamplesDirectoryError, match="does not exist"):
        read_samples_dir(tmp_path / "nope")
    with pytest.raises(SamplesDirectoryError, match="holds no samples"):
        read_samples_dir(tmp_path)
    (tmp_path / SUMMARY_NAME).write_text("{not json")
    with pytest.raises(SamplesDirectoryError, match=str(tmp_path / SUMMARY_NAME)):
        read_samples_dir(tmp_path)
    (tmp_path / SUMMARY_NAME).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(SamplesDirectoryError, match="format_version 99"):
        read_samples_dir(tmp_path)


def test_json_never_holds_non_finite_numbers(tmp_path):
    state = state_after(3)
    write_samples_dir(tmp_path, state, global_step=3, **WRITE)
    for file in tmp_path.glob("*.json"):
        text = file.read_text()
        assert "NaN" not in text and "Infinity" not in text


def test_the_manifest_lists_what_each_save_wrote_and_only_its_stale_files_go(tmp_path):
    write_samples_dir(tmp_path, state_after(2), global_step=2, **{**WRITE, "top_features": 5})
    first = read_manifest(tmp_path)
    assert sorted(first) == sorted(p.name for p in tmp_path.iterdir() if p.name != MANIFEST_NAME)
    (tmp_path / "feature_7_samples.json").write_text("{}")  # not a name the writer produces
    (tmp_path / "feature_99999_samples.json").write_text("{}")  # the writer's form, but never written here
    write_samples_dir(tmp_path, state_after(6, seed=4), global_step=6, **{**WRITE, "top_features": 1})
    second = read_manifest(tmp_path)
    assert len([n for n in second if n.startswith("feature_")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*second, MANIFEST_NAME, "feature_7_samples.json", "feature_99999_samples.json"])
    assert 7 not in read_samples_dir(tmp_path).feature_files


def test_a_foreign_directory_is_refused_by_the_writer_itself(tmp_path):
    (tmp_path / "collection_summary.json").write_text('{"mine": true}')
    with pytest.raises(SamplesDirectoryError, match="holds no sae_samples_manifest.json"):
        write_samples_dir(tmp_path, state_after(1), global_step=1, **WRITE)
    assert [p.name for p in tmp_path.iterdir()] == ["collection_summary.json"]
    assert (tmp_path / "collection_summary.json").read_text() == '{"mine": true}'


def test_a_first_save_interrupted_while_committing_is_finished_not_refused(tmp_path, monkeypatch):
    from lightning_sae_samples.samples_dir import commit as storage

    real_move, moved = storage._move_in, []

    def move_then_die(pending, dirpath, name):
        if len(moved) == 2:
            raise KeyboardInterrupt("killed")
        real_move(pending, dirpath, name)
        moved.append(name)

    monkeypatch.setattr(storage, "_move_in", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_samples_dir(tmp_path, state_after(2), global_step=2, **WRITE)
    monkeypatch.setattr(storage, "_move_in", real_move)
    assert len(moved) == 2 and not (tmp_path / MANIFEST_NAME).exists()
    assert storage.claim_samples_dir(tmp_path)  # the data files on disk belong to a committed save of ours
    assert read_samples_dir(tmp_path).summary["global_step"] == 2
    write_samples_dir(tmp_path, state_after(3), global_step=3, **WRITE)
    assert read_samples_dir(tmp_path).summary["global_step"] == 3 and not (tmp_path / PENDING_DIR).exists()
