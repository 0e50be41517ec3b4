"""The collection on CUDA tensors: the oracle tests, the history window, two processes, and host syncs.

Skipped without CUDA (CI never needs a GPU); ``benchmarks/gpu_check.sh`` runs it on a GPU machine.
"""

import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import assert_same, engine_config, make_callback, to_sparse, trainer
from oracle import Seen
from test_activation_collector import check_saved
from test_collector import CTX, THR, F, K, assert_state_matches_oracle, random_batches
from test_device_work import MAX_SYNCS, settings, topk_batches

from lightning_sae_samples.engine import SampleCollector
from lightning_sae_samples.engine.sample_table import MergePolicy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
POLICIES = [MergePolicy(), MergePolicy(stage_limit=1), MergePolicy(merge_cells=1, min_pool_slots=2)]


@pytest.mark.parametrize("policy", POLICIES, ids=["merge-when-read", "merge-every-insert", "rows-one-by-one"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_collections_on_cuda_equal_the_brute_force_oracle(mode, policy):
    collector = SampleCollector(engine_config(F, K, CTX, THR), CUDA, policy=policy)
    seen = []
    for step, (tokens, latents) in enumerate(random_batches(8, seed=11)):
        if mode == "sparse":
            indices, values, latents = to_sparse(latents)
            collector.update_sparse(tokens.to(CUDA), indices.to(CUDA), values.to(CUDA), step)
        else:
            collector.update_dense(tokens.to(CUDA), latents.to(CUDA), step)
        seen.append(Seen(step, 0, 0, tokens, latents))
    assert collector.device.type == "cuda"
    assert_state_matches_oracle(collector.state_dict(), seen)


@pytest.mark.parametrize("options", [
    {}, {"recent_window_steps": 2}, {"deduplicate_contexts": True}, {"samples_per_interval": 0},
], ids=["defaults", "recent", "dedup", "no-intervals"])
def test_a_cuda_state_equals_the_cpu_state_history_window_included(options):
    states = []
    for device in ("cpu", CUDA):
        collector = SampleCollector(settings(**options), device)
        for step, (tokens, indices, values) in enumerate(topk_batches(5, seed=3)):
            collector.update_sparse(tokens.to(device), indices.to(device), values.to(device), step)
            if step == 2:
                collector.reset_window(step)  # a save closed the history window
        states.append(collector.state_dict())
    assert len(states[0]["window_tokens"]["key"]) > 0
    assert_same(states[0], states[1], "state")


def test_a_collection_on_cuda_waits_for_the_device_at_most_four_times():
    collector = SampleCollector(settings(), CUDA)
    waits = []
    for step, (tokens, indices, values) in enumerate(topk_batches(6)):
        tokens, indices, values = tokens.to(CUDA), indices.to(CUDA), values.to(CUDA)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                collector.update_sparse(tokens, indices, values, step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        waits.append(sum("synchroniz" in str(w.message) for w in caught))
    assert max(waits) <= MAX_SYNCS, waits


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_two_processes_with_cuda_latents_merge_exactly(tmp_path, mode):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parent / "collector_ddp_script.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--mode", mode, "--port", str(port),
           "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [Seen(*item) for rank in (0, 1) for item in torch.load(tmp_path / f"seen_{rank}.pt", weights_only=True)]
    check_saved(tmp_path / "samples", seen)


def test_a_compiled_sae_on_the_gpu_is_collected_with_its_history(tmp_path):
    from helpers import DriftingSAE, TokenDataset, loader
    from history_oracle import assert_window_matches, window_oracle

    from lightning_sae_samples.samples_dir.history_file import load_history, windows_of_payload

    model = DriftingSAE(drift_step=3, mode="sparse", num_latents=10)
    model.latents_for = torch.compile(model.latents_for)
    callback = make_callback(tmp_path / "samples", history_windows_per_level=100)
    run = trainer(tmp_path, [callback], accelerator="gpu", devices=1, max_steps=5, max_epochs=None)
    run.fit(model, loader(TokenDataset(num_sequences=40)))
    assert callback.collector.device.type == "cuda"
    found = windows_of_payload(load_history(tmp_path / "samples" / "training_history.pt"))
    window = found[0]
    seen = [s for s in model.seen if window["start"] <= s.step < window["end"]]
    expected = window_oracle(seen, 10, 0.5, 2, top_tokens=5, samples=3)
    assert_window_matches(window, expected, set(window["samples"]["latent"].tolist()))
