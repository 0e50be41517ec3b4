"""ActivationSampleCollector in a plain training loop (no Trainer), against the brute-force oracle."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same, make_collector, padded_batches, read_dir, to_sparse
from oracle import Seen, assert_dir_matches_oracle

from lightning_sae_samples import LatentInputError

F, K, CTX, THR = 9, 4, 6, 0.5
make = make_collector


def check_saved(dirpath, seen, exclude=()):
    files = assert_dir_matches_oracle(read_dir(dirpath), seen, F, K, CTX, THR, exclude=exclude)
    return files["collection_summary.json"]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_state_dict_round_trip_continues_exactly(mode):
    batches = padded_batches(6, seed=5)

    def feed(collector, part, start):
        for step, (tokens, mask, latents) in enumerate(part, start=start):
            if mode == "sparse":
                indices, values, _ = to_sparse(latents)
                collector.update(tokens, latent_indices=indices, latent_values=values, step=step, attention_mask=mask)
            else:
                collector.update(tokens, latents=latents, step=step, attention_mask=mask)

    straight = make(num_latents=F)
    feed(straight, batches, 0)
    first = make(num_latents=F)
    feed(first, batches[:3], 0)
    saved = first.state_dict()
    resumed = make(num_latents=F)
    resumed.load_state_dict(saved)
    feed(resumed, batches[3:], 3)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a["config"] == b["config"]
    assert_same(a["collector"], b["collector"])


def test_bad_updates_are_explained():
    tokens = torch.zeros(2, 5, dtype=torch.long)
    collector = make()
    with pytest.raises(LatentInputError, match="num_latents=F"):
        collector.update(tokens, latent_indices=torch.zeros(2, 5, 2, dtype=torch.long),
                         latent_values=torch.ones(2, 5, 2), step=0)
    with pytest.raises(LatentInputError, match=r"`attention_mask` has shape \(2, 4\)"):
        collector.update(tokens, latents=torch.ones(2, 5, 3), step=0, attention_mask=torch.ones(2, 4))
    with pytest.raises(LatentInputError, match="`latents` has 3 latents but `num_latents` is 4"):
        make(num_latents=4).update(tokens, latents=torch.ones(2, 5, 3), step=0)
    collector.update(tokens, latents=torch.ones(2, 5, 3), step=4)
    with pytest.raises(LatentInputError, match="went back from 4 to 3"):
        collector.update(tokens, latents=torch.ones(2, 5, 3), step=3)
    with pytest.raises(ValueError, match="`step`"):
        collector.update(tokens, latents=torch.ones(2, 5, 3), step=-1)


def test_save_without_updates_writes_nothing(tmp_path):
    assert make().save(tmp_path / "samples") == []
    assert not (tmp_path / "samples").exists()


def test_two_processes_merge_exactly_under_torch_distributed(tmp_path, mode="sparse"):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parent / "collector_ddp_script.py"
    cmd = [sys.executable, str(script), "--out", str(tmp_path), "--mode", mode, "--port", str(port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [Seen(*item) for rank in (0, 1) for item in torch.load(tmp_path / f"seen_{rank}.pt", weights_only=True)]
    assert {s.rank for s in seen} == {0, 1}
    check_saved(tmp_path / "samples", seen)
