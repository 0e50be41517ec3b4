"""Latents sharded across processes (tensor parallelism): each collects its own, the shards join exactly."""

import glob
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same, check_against_oracle, make_collector, padded_batches, read_dir, to_sparse
from oracle import Seen, assert_dir_matches_oracle, assert_state_matches

from lightning_sae_samples import LatentInputError
from lightning_sae_samples.analysis.history import FeatureHistory
from lightning_sae_samples.samples_dir.history_file import load_history
from lightning_sae_samples.samples_dir.reader import load_full_state
from lightning_sae_samples.sharding import ShardLayout
from lightning_sae_samples.state.slices import concat_states, slice_state

HERE = Path(__file__).parent


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    return proc


def _port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- in one process
def test_a_state_cut_into_ranges_joins_back_to_itself():
    collector = make_collector(num_latents=11, deduplicate_contexts=True)
    for step, (tokens, mask, latents) in enumerate(padded_batches(4, seed=3, num_latents=11)):
        collector.update(tokens, latents=latents, step=step, attention_mask=mask)
    state = collector.state_dict()["collector"]
    parts = [slice_state(state, 0, 4), slice_state(state, 4, 9), slice_state(state, 9, 11)]
    assert [int(p["num_latents"]) for p in parts] == [4, 5, 2]
    assert_same(concat_states(parts), state)


def test_shards_that_saw_other_tokens_do_not_join():
    states = []
    for seed in (1, 2):
        collector = make_collector(num_latents=4)
        tokens, mask, latents = padded_batches(1, seed=seed, num_latents=4)[0]
        collector.update(tokens, latents=latents, step=0, attention_mask=mask)
        states.append(collector.state_dict()["collector"])
    with pytest.raises(ValueError, match="did not see the same tokens"):
        concat_states(states)


def test_layouts_split_as_dtensor_and_refuse_ranges_outside_the_sae():
    assert [(s.offset, s.local) for s in (ShardLayout.even(10, 4, i) for i in range(4))] == [
        (0, 3), (3, 3), (6, 3), (9, 1)]
    with pytest.raises(ValueError, match="offset \\+ local <= total"):
        ShardLayout(8, 4, 10)
    with pytest.raises(ValueError, match="would be empty"):
        ShardLayout.even(3, 4, 3)


def test_sparse_latents_of_other_shards_select_nothing():
    whole, shard = make_collector(num_latents=9), make_collector(num_latents=9, shard_layout=ShardLayout(3, 3, 9))
    for step, (tokens, mask, latents) in enumerate(padded_batches(3, seed=4, num_latents=9)):
        indices, values, dense = to_sparse(latents, k=4)
        whole.update(tokens, latents=dense, step=step, attention_mask=mask)
        shard.update(tokens, latent_indices=indices, latent_values=values, step=step, attention_mask=mask)
    # Alone (no torch.distributed), a shard's state is its own latents, numbered from 0.
    assert_same(shard.state_dict()["collector"], slice_state(whole.state_dict()["collector"], 3, 6))


def test_a_local_width_other_than_num_latents_names_the_fix():
    tokens, mask, latents = padded_batches(1, seed=4, num_latents=9)[0]
    with pytest.raises(LatentInputError, match="shard_layout"):
        make_collector(num_latents=9).update(tokens, latents=latents[..., :5], step=0)
    sharded = make_collector(num_latents=9, shard_layout=ShardLayout(0, 5, 9))
    with pytest.raises(LatentInputError, match="this process's shard holds 5"):
        sharded.update(tokens, latents=latents, step=0)


# ---------------------------------------------------------------------- the plain collector, several processes
def _collector_run(tmp_path, mode, dp, tp):
    proc = _run("collector_shard_script.py", "--out", tmp_path, "--mode", mode, "--dp", dp, "--tp", tp,
                "--port", _port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [Seen(*item) for rank in range(dp) for item in torch.load(tmp_path / f"seen_{rank}.pt", weights_only=True)]
    assert {s.rank for s in seen} == set(range(dp))
    first = [s for s in seen if s.step < 3]
    assert_dir_matches_oracle(read_dir(tmp_path / "first"), first, 9, 4, 6, 0.5)
    assert_dir_matches_oracle(read_dir(tmp_path / "second"), seen, 9, 4, 6, 0.5)  # resumed from the checkpoint
    # The full state is saved in one part per shard, which read back as every latent's exact state.
    names = {p.name for p in (tmp_path / "second").iterdir()}
    assert {f"full_state-0000{i}-of-0000{tp}.pt" for i in range(1, tp + 1)} <= names and "full_state.pt" not in names
    assert_state_matches(load_full_state(tmp_path / "second" / "full_state.index.json"), seen, 9, 4, 6, 0.5)


def test_collector_shards_with_an_explicit_layout_equal_the_oracle(tmp_path):
    _collector_run(tmp_path, "dense", dp=1, tp=2)


def _unsharded_save(path, top, resumed=None):
    """What one process collecting every latent of replica 0's batches saves (``collector_shard_script``'s).

    ``resumed``: then resume from the collector's state, go on with the last batches and save there too.
    """
    collector = make_collector(num_latents=9, top_features_to_save=top)
    batches = padded_batches(8, seed=20, num_latents=9)
    for i, (tokens, mask, latents) in enumerate(batches[:6]):
        collector.update(tokens, latents=latents, step=i // 2, attention_mask=mask)
    collector.save(path)
    if resumed is not None:
        state = collector.state_dict()
        collector.close()
        collector = make_collector(num_latents=9, top_features_to_save=top)
        collector.load_state_dict(state)
        for i, (tokens, mask, latents) in enumerate(batches[6:]):
            collector.update(tokens, latents=latents, step=3 + i // 2, attention_mask=mask)
        collector.save(resumed)
    collector.close()


def test_a_sharded_save_reads_back_as_the_unsharded_one_with_no_shard_sent_to_rank_0(tmp_path):
    proc = _run("collector_shard_script.py", "--out", tmp_path, "--dp", 1, "--tp", 2, "--top", 4, "--port", _port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    _unsharded_save(tmp_path / "whole", top=4, resumed=tmp_path / "whole_second")
    sharded, whole = read_dir(tmp_path / "first"), read_dir(tmp_path / "whole")
    features = sorted(name for name in whole if name.startswith("feature_"))
    assert len(features) == 4 and [n for n in sharded if n.startswith("feature_")] == features
    assert {f"feature_0000{i}_samples.json" for i in range(5, 9)} & set(features), "a saved latent of shard 2"
    assert all(sharded[name] == whole[name] for name in features)
    summaries = [{**d["collection_summary.json"], "save_id": None} for d in (sharded, whole)]
    assert summaries[0] == summaries[1]
    assert_same(load_full_state(tmp_path / "first" / "full_state.index.json"),
                load_full_state(tmp_path / "whole" / "full_state.pt"))
    # Rank 0 wrote none of shard 2's files and never received its samples: only its top candidates, counts and
    # history window, much less than the part it wrote.
    part = (tmp_path / "first" / "full_state-00002-of-00002.pt").stat().st_size
    received = torch.load(tmp_path / "received_0.pt", weights_only=True)
    assert received < part / 2, (received, part)
    # The history too is written in parts, one per shard, which read back as the unsharded run's history (through a
    # resume: same windows, rows, samples and events); rank 0 received less than shard 2's window.
    assert not (tmp_path / "first" / "training_history.pt").exists()
    sharded_history = FeatureHistory.from_dir(tmp_path / "second")
    whole_history = FeatureHistory.from_dir(tmp_path / "whole_second")
    assert len(whole_history.windows) == 2
    assert_same(load_history(tmp_path / "second" / "training_history.index.json"),
                load_history(tmp_path / "whole_second" / "training_history.pt"), "history")
    assert sharded_history.events() == whole_history.events()
    window = load_history(tmp_path / "first" / "training_history-00002-of-00002.pt")  # shard 2's one window
    sent = len(pickle.dumps({group: window[group] for group in ("rows", "samples")}))  # as a gather would send it
    assert received < sent, (received, sent)


def test_a_rank_failing_or_dying_mid_save_leaves_the_previous_save(tmp_path):
    proc = _run("collector_shard_script.py", "--out", tmp_path, "--dp", 1, "--tp", 2, "--fail-rank", 1,
                "--port", _port())
    assert proc.returncode != 0 and "exit code 3" in proc.stderr, proc.stderr[-3000:]
    # Rank 1's error reached every rank: it raised its own, rank 0 one that names it; nothing was committed.
    assert torch.load(tmp_path / "outcome_1.pt", weights_only=True) == (
        "OSError: no space left writing full_state-00002-of-00002.pt")
    assert torch.load(tmp_path / "outcome_0.pt", weights_only=True).startswith(
        "ShardedSaveError: Rank 1 could not write its part of the save")
    # Then rank 1 died after writing its part: the directory still holds the first save, whole.
    first = tmp_path / "first"
    assert read_dir(first)["collection_summary.json"]["last_collected_step"] == 2
    assert (first / ".sae_samples_pending" / "full_state-00002-of-00002.pt").is_file()
    state = load_full_state(first / "full_state.index.json")
    assert int(state["last_collected_step"]) == 2 and int(state["num_latents"]) == 9
    # The next save (here one process) clears what the dead save left and commits.
    _unsharded_save(first, top=9)
    assert not (first / ".sae_samples_pending").exists()
    assert not [p for p in first.iterdir() if p.name.startswith("full_state-")]


@pytest.mark.slow
def test_collector_shards_and_replicas_equal_the_oracle(tmp_path):
    _collector_run(tmp_path, "sparse", dp=2, tp=2)


# ---------------------------------------------------------------------- the callback under ModelParallelStrategy
def _fit(out, *args):
    proc = _run("model_parallel_script.py", "--out", out, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _seen(out):
    seen = []
    for file in sorted(glob.glob(str(out / "seen_*.pt"))):
        seen.extend(s for s in torch.load(file, weights_only=False) if s.step % 2 == 0)
    return seen


def test_tensor_parallel_dtensor_latents_resume_through_the_distributed_checkpoint(tmp_path):
    # Each process returns its share as a plain tensor: its layout is the even split of the module's `num_latents`.
    # The same processes then fit the uninterrupted run to compare with, in `straight` (one launch for both).
    straight = tmp_path / "straight"
    _fit(tmp_path, "--tp", 2, "--max-epochs", 1, "--form", "local", "--save-ckpt", tmp_path / "ckpt",
         "--then", "--out", straight, "--tp", 2, "--max-epochs", 2, "--form", "local", "--save-ckpt", straight / "ckpt")
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    assert checkpoint.is_dir()  # Lightning's distributed checkpoint
    # Rank 0's metadata holds no samples: each shard's root wrote its own into the distributed checkpoint.
    from torch.distributed.checkpoint import FileSystemReader

    states = torch.load(checkpoint / "meta.pt", weights_only=True)["callbacks"]
    (ours,) = [state for key, state in states.items() if key.startswith("ActivationSampleCallback")]
    assert ours["collector"] is None and len(ours["collector_parts"]["keys"]) == 2
    stored = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    for key in ours["collector_parts"]["keys"]:
        assert any(name.startswith(f"state_dict.{key}.top/") for name in stored), key
    # Nor the history: each shard's root put its part there too.
    assert ours["history"] is None and len(ours["collector_parts"]["history"]["keys"]) == 2
    for key in ours["collector_parts"]["history"]["keys"]:
        assert any(name.startswith(f"state_dict.{key}.rows/") for name in stored), key
    # The resumed run returns a DTensor and no `num_latents`: the restored state is cut to the shard it tells.
    log = _fit(tmp_path, "--tp", 2, "--max-epochs", 2, "--no-num-latents", "--ckpt-path",
               tmp_path / "ckpt" / "last.ckpt")
    assert "saved samples to" in log and "from 2 shards" in log  # each shard's root wrote its own part
    assert log.count("resumes from 2 of the 2 parts") == 2  # no shard known before the first batch: all parts
    seen = _seen(tmp_path)
    assert {s.step for s in seen} == {0, 2, 4, 6, 8, 10}
    check_against_oracle(tmp_path / "samples", seen)
    assert (tmp_path / "samples" / "full_state-00002-of-00002.pt").is_file()
    # The resumed run's history, in parts, is the story of a run that was never stopped.
    resumed = load_history(tmp_path / "samples" / "training_history.index.json")
    assert resumed["windows"]["end"].tolist() == [6, 12]  # the checkpoint's save, then the last
    assert_same(resumed, load_history(straight / "samples" / "training_history.index.json"), "history")


def test_a_resume_whose_shards_are_known_reads_only_its_part_and_its_snapshots_are_sharded(tmp_path):
    _fit(tmp_path, "--tp", 2, "--max-epochs", 1, "--save-ckpt", tmp_path / "ckpt")
    log = _fit(tmp_path, "--tp", 2, "--max-epochs", 2, "--ckpt-path", tmp_path / "ckpt" / "last.ckpt", "--validate")
    assert log.count("resumes from 1 of the 2 parts of its collection") == 2, log[-3000:]
    seen = _seen(tmp_path)
    assert {s.step for s in seen} == {0, 2, 4, 6, 8, 10}
    check_against_oracle(tmp_path / "samples", seen)
    # The validation run after the resumed epoch: a snapshot saved from the shards' roots, equal to its oracle.
    files = sorted(glob.glob(str(tmp_path / "eval_seen_*.pt")))
    evaluated = [s for file in files for s in torch.load(file, weights_only=False)]
    (step,) = {s.step for s in evaluated}
    snapshot = tmp_path / "samples" / "snapshots" / f"step_{step}"
    assert (snapshot / "full_state-00002-of-00002.pt").is_file()
    assert log.count("from 2 shards") == 2  # the snapshot's save and the one at the end of training
    check_against_oracle(snapshot, evaluated)


def test_tensor_parallel_full_latents_on_every_process_are_refused(tmp_path):
    proc = _run("model_parallel_script.py", "--out", tmp_path, "--tp", 2, "--form", "full")
    assert proc.returncode != 0
    assert "this process's shard holds 5 (latents 0 to 4 of 10)" in proc.stderr
    assert not (tmp_path / "samples" / "collection_summary.json").exists()


def test_fsdp2_data_parallel_stays_exact(tmp_path):
    _fit(tmp_path, "--tp", 1, "--dp", 2)
    seen = _seen(tmp_path)
    assert {s.rank for s in seen} == {0, 1}
    check_against_oracle(tmp_path / "samples", seen)


@pytest.mark.slow
def test_tensor_and_data_parallel_equal_the_oracle(tmp_path):
    # No `num_latents` anywhere: each process learns its shard from the DTensor, its replicas from the mesh.
    _fit(tmp_path, "--tp", 2, "--dp", 2, "--no-num-latents")
    seen = _seen(tmp_path)
    assert {s.rank for s in seen} == {0, 1}
    check_against_oracle(tmp_path / "samples", seen)


# ---------------------------------------------------------------------- sharded saves
def _write(path, state, parts=None, **kwargs):
    from helpers import WRITE

    from lightning_sae_samples.samples_dir.writer import write_samples_dir

    return write_samples_dir(path, state, global_step=int(state["last_collected_step"]), full_state_parts=parts,
                             **{**WRITE, **kwargs})


def test_a_full_state_in_parts_reads_back_as_the_whole_one(tmp_path):
    from helpers import state_after

    from lightning_sae_samples import ActivationSampleAnalyzer
    from lightning_sae_samples.samples_dir.parts import load_part_of
    state = state_after(5)
    _write(tmp_path / "whole", state)
    _write(tmp_path / "parts", state, parts=[(0, 3), (3, 8)])
    names = {p.name for p in (tmp_path / "parts").iterdir()}
    assert {"full_state-00001-of-00002.pt", "full_state-00002-of-00002.pt", "full_state.index.json"} <= names
    assert "full_state.pt" not in names
    assert_same(load_full_state(tmp_path / "parts" / "full_state.index.json"),
                load_full_state(tmp_path / "whole" / "full_state.pt"))
    part, start = load_part_of(tmp_path / "parts" / "full_state.index.json", 5)  # only the part latent 5 is in
    assert start == 3 and int(part["num_latents"]) == 5
    whole, sharded = ActivationSampleAnalyzer(tmp_path / "whole"), ActivationSampleAnalyzer(tmp_path / "parts")
    unsaved = [f for f in range(8) if f not in whole.saved_features]
    assert [f for f in unsaved if f >= 3], "a latent of the second part that only the full state holds"
    assert all(sharded.feature(f, num_examples=3) == whole.feature(f, num_examples=3) for f in unsaved)
    assert sharded._state is None and sorted(sharded._parts) == sorted({0 if f < 3 else 3 for f in unsaved})
    assert all(sharded.feature(f) == whole.feature(f) for f in range(8))
    assert sharded.features(rank_by="activation_count") == whole.features(rank_by="activation_count")  # all parts


def test_a_sharded_save_replaces_the_whole_file_and_back(tmp_path):
    from helpers import state_after

    state = state_after(3)
    _write(tmp_path, state)
    _write(tmp_path, state_after(4), parts=[(0, 4), (4, 8)])
    names = {p.name for p in tmp_path.iterdir()}
    assert "full_state.pt" not in names and "full_state.index.json" in names
    _write(tmp_path, state_after(5))
    names = {p.name for p in tmp_path.iterdir()}
    assert "full_state.pt" in names and not [n for n in names if n.startswith("full_state-")]
    assert "full_state.index.json" not in names


def test_a_part_that_does_not_match_its_index_is_refused(tmp_path):
    from helpers import state_after

    from lightning_sae_samples.samples_dir.names import SamplesDirectoryError

    _write(tmp_path, state_after(3), parts=[(0, 4), (4, 8)])
    other = tmp_path / "other"
    _write(other, state_after(3), parts=[(0, 2), (2, 8)])
    (other / "full_state-00001-of-00002.pt").replace(tmp_path / "full_state-00001-of-00002.pt")
    with pytest.raises(SamplesDirectoryError, match="full_state-00001-of-00002.pt holds 2 latents where its index"):
        load_full_state(tmp_path / "full_state.index.json")


def test_a_history_in_parts_reads_as_the_whole_one_and_a_bad_part_is_refused(tmp_path):
    from lightning_sae_samples import ActivationSampleAnalyzer
    from lightning_sae_samples.samples_dir.history_file import history_of_latents
    from lightning_sae_samples.samples_dir.names import HISTORY_INDEX_NAME, SamplesDirectoryError
    from lightning_sae_samples.samples_dir.parts import write_index

    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    _unsharded_save(whole, top=4, resumed=sharded)  # two saves: a history of two windows
    payload = load_history(sharded / "training_history.pt")
    (sharded / "training_history.pt").unlink()
    parts = {"training_history-00001-of-00002.pt": (0, 4), "training_history-00002-of-00002.pt": (4, 9)}
    for name, (start, stop) in parts.items():
        torch.save(history_of_latents(payload, start, stop), sharded / name)
    write_index(sharded, list(parts.values()), 9, HISTORY_INDEX_NAME)
    history = ActivationSampleAnalyzer(sharded).history  # what serve, export and the command line read
    assert len(history.windows) == 2 and history.rows() == FeatureHistory(payload, sharded).rows()
    assert history.events() == FeatureHistory(payload, sharded).events()
    first = torch.load(sharded / "training_history-00001-of-00002.pt", weights_only=True)
    torch.save(first, sharded / "training_history-00002-of-00002.pt")  # part 1's latents where part 2's belong
    with pytest.raises(SamplesDirectoryError, match="training_history-00002-of-00002.pt holds latents outside 4 to 8"):
        FeatureHistory.from_dir(sharded)
    (sharded / "training_history-00002-of-00002.pt").write_bytes(b"not a history")
    with pytest.raises(SamplesDirectoryError, match="Cannot load .*training_history-00002-of-00002.pt"):
        FeatureHistory.from_dir(sharded)
