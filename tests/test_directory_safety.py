"""The samples directory is not ours alone: what we did not write is never moved, deleted or overwritten."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import SyntheticSAE, TokenDataset, loader, make_callback, trainer

from lightning_sae_samples import read_samples_dir
from lightning_sae_samples.samples_dir.commit import read_manifest
from lightning_sae_samples.samples_dir.names import LOCK_NAME, MANIFEST_NAME, PENDING_DIR, PENDING_MARKER

F = 10


def fit(root, callback, steps=3, seed=0):
    module = SyntheticSAE(num_latents=F)
    trainer(root, [callback], max_steps=steps).fit(module, loader(TokenDataset(seed=seed)))
    return module


def snapshot(root, skip=()):
    """Every file and symlink under ``root`` (symlinks not followed) as bytes or link target."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if any(rel == s or rel.startswith(s + "/") for s in skip):
                continue
            files[rel] = ("link", os.readlink(path)) if path.is_symlink() else ("file", path.read_bytes())
    return files


def ours(samples):
    """What the callback owns in ``samples``: the files its manifest lists, the manifest and the lock file."""
    return [f"samples/{n}" for n in (*read_manifest(samples), MANIFEST_NAME, LOCK_NAME)]


def test_a_crafted_commit_record_touches_nothing_it_does_not_own(tmp_path):
    samples = tmp_path / "samples"
    fit(tmp_path, make_callback(samples))
    (tmp_path / "outside.txt").write_text("keep me")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "feature_00003_samples.json").write_text('{"mine": true}')
    (samples / "feature_99999_samples.json").write_text('{"user": 1}')
    (samples / "notes.txt").write_text("user notes")
    bad_names = ["../outside.txt", str(tmp_path / "outside.txt"), "../elsewhere/feature_00003_samples.json",
                 "sub/feature_00001_samples.json", "..", "", "feature_7_samples.json", "feature_99999_samples.json",
                 "collection_summary.json\n", 5]
    # The layout of an older writer: a bare `.pending/` with a COMMIT record.
    legacy = samples / ".pending"
    legacy.mkdir()
    (legacy / "COMMIT").write_text(json.dumps({"files": ["../moved.json"], "remove": bad_names[:3]}))
    (legacy / "moved.json").write_text("{}")
    # Our pending directory's name and marker, with a record naming paths and a symlink to move into place.
    pending = samples / PENDING_DIR
    pending.mkdir()
    (pending / PENDING_MARKER).write_text(json.dumps({"writer": "lightning-sae-samples"}))
    victim = sorted(n for n in read_manifest(samples) if n.startswith("feature_"))[0]
    (pending / victim).symlink_to(tmp_path / "outside.txt")
    (pending / "keep.txt").write_text("not a writer's name")
    (pending / "COMMIT").write_text(json.dumps({"files": bad_names + [victim],
                                                "remove": bad_names}))
    untouched = snapshot(tmp_path, skip=ours(samples) + [f"samples/{PENDING_DIR}"])

    # the reader applies the writer's rule: the symlink is not a save, no path leaves the directory
    with pytest.warns(UserWarning, match="Ignored '../outside.txt'"):
        view = read_samples_dir(samples)
    assert all(p.parent == samples for p in view.feature_files.values())
    assert all(p == samples / p.name for p in view.feature_files.values())
    assert view.summary == json.loads((samples / "collection_summary.json").read_text())

    with pytest.warns(UserWarning) as caught:
        module = fit(tmp_path, make_callback(samples), steps=4, seed=3)
    messages = [str(w.message) for w in caught]
    assert any("Ignored '../outside.txt' in `remove`" in m for m in messages)
    assert any("Ignored 'feature_99999_samples.json' in `remove`" in m for m in messages)
    assert any("Did not move" in m and victim in m for m in messages)
    assert any(f"{legacy} was not written by ActivationSampleCallback" in m for m in messages)
    assert any("Left" in m and "keep.txt" in m for m in messages)

    assert snapshot(tmp_path, skip=ours(samples) + [f"samples/{PENDING_DIR}"]) == untouched
    assert sorted(os.listdir(pending)) == [PENDING_MARKER, "keep.txt"]
    assert (tmp_path / "outside.txt").read_text() == "keep me"
    summary = read_samples_dir(samples).summary
    assert summary["global_step"] == 4 and summary["tokens_seen"] == sum(s.tokens.numel() for s in module.seen)


USER_FILES = {
    "feature_7_samples.json": b'{"user": 7}',
    "feature_99999_samples.json": b'{"user": 99999}',
    ".pending/COMMIT": b'{"files": [], "remove": ["feature_99999_samples.json"]}',
    ".pending/draft.txt": b"work in progress",
    "notes.txt": b"my notes",
}


def put_user_files(samples):
    for name, data in USER_FILES.items():
        (samples / name).parent.mkdir(parents=True, exist_ok=True)
        (samples / name).write_bytes(data)


def test_a_directory_we_did_not_write_is_refused_untouched(tmp_path):
    samples = tmp_path / "samples"
    put_user_files(samples)
    before = snapshot(tmp_path)
    module = SyntheticSAE(num_latents=F)
    with pytest.raises(ValueError, match=rf"{samples} is not empty .*Pass an empty or new `dirpath`"):
        trainer(tmp_path, [make_callback(samples)], max_steps=2).fit(module, loader())
    assert module.seen == []  # refused in setup, before the first step
    assert snapshot(tmp_path) == before


def test_user_files_in_a_directory_of_ours_survive_later_saves(tmp_path):
    samples = tmp_path / "samples"
    fit(tmp_path, make_callback(samples))
    first = set(read_manifest(samples))
    put_user_files(samples)
    untouched = snapshot(tmp_path, skip=ours(samples))

    with pytest.warns(UserWarning, match=rf"Samples directory {samples} exists and is not empty"):
        fit(tmp_path, make_callback(samples, top_features_to_save=2), steps=4, seed=5)

    second = set(read_manifest(samples))
    features = {n for n in second if n.startswith("feature_")}
    assert len(features) == 2
    stale = {n for n in first if n.startswith("feature_")} - features
    assert stale and not any((samples / n).exists() for n in stale)
    assert snapshot(tmp_path, skip=ours(samples)) == untouched  # stale files of ours gone, the user's all there
    assert read_samples_dir(samples).summary["global_step"] == 4


HOLD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from helpers import SyntheticSAE, loader, make_callback, trainer

    class Hang(SyntheticSAE):
        def training_step(self, batch, batch_idx):
            print("training", flush=True)
            time.sleep(600)

    trainer(sys.argv[1], [make_callback(sys.argv[2])], max_steps=1).fit(Hang(num_latents=10), loader())
    """
)


def test_one_writer_per_directory_and_a_killed_writer_does_not_block(tmp_path):
    samples = tmp_path / "samples"
    script = tmp_path / "hold.py"
    script.write_text(HOLD.format(tests=str(Path(__file__).parent)))
    path = os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    holder = subprocess.Popen([sys.executable, str(script), str(tmp_path / "other"), str(samples)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "training", holder.stderr.read()
        module = SyntheticSAE(num_latents=F)
        with pytest.raises(ValueError, match=rf"holds the lock {samples / LOCK_NAME}"):
            trainer(tmp_path, [make_callback(samples)], max_steps=2).fit(module, loader())
        # The holder caught committing its first save (a file moved in, the manifest not yet): still the lock.
        (samples / "feature_00001.json").write_text("{}")
        with pytest.raises(ValueError, match=rf"holds the lock {samples / LOCK_NAME}"):
            trainer(tmp_path, [make_callback(samples)], max_steps=2).fit(module, loader())
        (samples / "feature_00001.json").unlink()
        assert module.seen == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    module = fit(tmp_path, make_callback(samples))
    assert read_samples_dir(samples).summary["tokens_seen"] == sum(s.tokens.numel() for s in module.seen)


def test_the_lock_is_released_at_teardown(tmp_path):
    samples = tmp_path / "samples"
    fit(tmp_path, make_callback(samples), steps=1)
    fit(tmp_path, make_callback(samples), steps=2)  # a second run after the first ended is not blocked
    assert read_samples_dir(samples).summary["global_step"] == 2


def test_under_ddp_a_refused_directory_stops_every_rank(tmp_path):
    samples = tmp_path / "samples"
    put_user_files(samples)
    before = snapshot(tmp_path)
    script = Path(__file__).parent / "ddp_script.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--devices", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # both ranks raise (neither waits for the other in a collective)
    assert proc.stderr.count(f"ValueError: ActivationSampleCallback will not write into `dirpath`: Samples directory"
                             f" {samples} is not empty") == 2, proc.stderr[-3000:]
    assert not list(tmp_path.glob("seen_*"))  # no rank trained
    assert snapshot(tmp_path) == before
