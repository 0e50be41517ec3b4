"""sparsify's own Trainer on two hookpoints: one samples directory per hookpoint, exact against the oracle."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sparsify")
pytest.importorskip("transformers")
pytest.importorskip("datasets")

import torch  # noqa: E402
from helpers import read_dir  # noqa: E402
from oracle import Seen, assert_dir_matches_oracle  # noqa: E402
from sparsify import SparseCoderConfig, TrainConfig  # noqa: E402
from sparsify_helpers import (  # noqa: E402
    CTX,
    EXCLUDED,
    HOOKPOINTS,
    KEEP,
    SETTINGS,
    THR,
    TOPK,
    F,
    dense_latents,
    tiny_bert,
    token_dataset,
    token_ids,
)

from lightning_sae_samples.integrations.sparsify import STATE_NAME, SamplesSparsifyTrainer, state_name  # noqa: E402
from lightning_sae_samples.samples_dir.names import RUN_INDEX_NAME  # noqa: E402


def make_trainer(tmp_path, model, dataset, collection_freq=2, **cfg):
    config = TrainConfig(
        SparseCoderConfig(num_latents=F, k=TOPK), batch_size=4, hookpoints=HOOKPOINTS, log_to_wandb=False,
        save_dir=str(tmp_path / "ckpt"), run_name="run", save_every=3, lr=1e-3, exclude_tokens=[EXCLUDED], **cfg,
    )
    return SamplesSparsifyTrainer(
        config, dataset, model, samples_dir=tmp_path / "samples", collection_freq=collection_freq, **SETTINGS
    )


def record(trainer):
    """Every batch's tokens and what each SAE returned (dense ``[B, T, F]``, excluded tokens all zero)."""
    seen = {name: [] for name in HOOKPOINTS}
    batch = {}
    trainer.model.register_forward_pre_hook(lambda m, args: batch.update(tokens=args[0].detach().clone()))

    def keeper(name):
        def keep(module, args, out):
            tokens = batch["tokens"]
            dense = dense_latents(tokens, out.latent_indices, out.latent_acts.detach())
            seen[name].append(Seen(trainer.global_step, 0, 0, tokens, dense))
        return keep

    for name in HOOKPOINTS:
        trainer.saes[name].register_forward_hook(keeper(name))
    return seen


def check(samples_dir, seen):
    for name in HOOKPOINTS:
        collected = [s for s in seen[name] if s.step % 2 == 0]
        assert_dir_matches_oracle(read_dir(samples_dir / name), collected, F, KEEP, CTX, THR, exclude=(EXCLUDED,))


def test_sparsify_trainer_on_two_hookpoints_equals_the_oracle(tmp_path):
    trainer = make_trainer(tmp_path, tiny_bert(), token_dataset())
    seen = record(trainer)
    trainer.fit()
    assert len(seen[HOOKPOINTS[0]]) == 6
    check(tmp_path / "samples", seen)
    assert (tmp_path / "samples" / RUN_INDEX_NAME).is_file()
    assert (tmp_path / "ckpt" / "run" / STATE_NAME).is_file()


class Crash(Exception):
    pass


def test_sparsify_resume_after_a_crash_equals_the_oracle(tmp_path):
    """A crash after the checkpoint at batch 1; sparsify's resume trains batch 1 again, which is not counted twice."""
    first = make_trainer(tmp_path, tiny_bert(), token_dataset(), collection_freq=1)
    seen_first = record(first)

    def crash(module, args):
        if first.global_step == 3:
            raise Crash

    first.model.register_forward_pre_hook(crash)
    with pytest.raises(Crash):
        first.fit()
    first.samples.close()
    resumed = make_trainer(tmp_path, tiny_bert(), token_dataset(), collection_freq=1)
    seen_resumed = record(resumed)
    resumed.load_state(str(tmp_path / "ckpt" / "run"))
    assert resumed.global_step == 1, "sparsify restarts at the batch its checkpoint was saved in"
    resumed.fit()
    for name in HOOKPOINTS:
        seen = [s for s in seen_first[name] if s.step <= 1] + [s for s in seen_resumed[name] if s.step >= 2]
        assert [s.step for s in seen] == list(range(6))
        assert_dir_matches_oracle(read_dir(tmp_path / "samples" / name), seen, F, KEEP, CTX, THR,
                                  exclude=(EXCLUDED,))


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """Both runs of ``sparsify_distribute_script.py`` (one launch of its two processes): their folder by name."""
    out = tmp_path_factory.mktemp("distribute")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).parent / "sparsify_distribute_script.py"
    proc = subprocess.run([sys.executable, str(script), "--out", str(out), "--port", str(port)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def run_of(out):
    owned = [json.loads((out / f"owned_{rank}.json").read_text()) for rank in (0, 1)]
    seen = [torch.load(out / f"seen_{rank}.pt", weights_only=True) for rank in (0, 1)]
    return owned, seen


def gathered_batches(steps):
    """The batch each SAE's rank sees at each step: rank 0's shard rows, then rank 1's (sparsify's gather)."""
    ids = token_ids(48)
    shards = [ids[rank::2] for rank in (0, 1)]
    return [torch.cat([shard[4 * step:4 * step + 4] for shard in shards]) for step in range(steps)]


def check_distributed(out, seen, steps):
    batches = gathered_batches(6)
    for rank, name in enumerate(HOOKPOINTS):
        assert {entry[0] for entry in seen[rank]} == {name}
        assert [entry[1] for entry in seen[rank]] == list(range(6))
        collected = [Seen(step, 0, 0, batches[step], dense_latents(batches[step], indices, values))
                     for _, step, indices, values in seen[rank] if step in steps]
        assert_dir_matches_oracle(read_dir(out / "samples" / name), collected, F, KEEP, CTX, THR, exclude=(EXCLUDED,))
    index = json.loads((out / "samples" / RUN_INDEX_NAME).read_text())
    assert [entry["name"] for entry in index["saes"]] == HOOKPOINTS
    for rank in (0, 1):
        assert (out / "ckpt" / "run" / state_name(rank)).is_file()


@pytest.mark.slow
def test_sparsify_distribute_modules_collects_each_sae_on_its_rank(distributed_runs):
    """Two ranks, one SAE each: each collects only its own, over both ranks' rows, and the run folder has both."""
    owned, seen = run_of(distributed_runs / "plain")
    assert [o["collects"] for o in owned] == [[name] for name in HOOKPOINTS]
    check_distributed(distributed_runs / "plain", seen, steps=(0, 2, 4))


@pytest.mark.slow
def test_sparsify_distribute_modules_resume_after_a_crash_equals_the_oracle(distributed_runs):
    """Both ranks stop at batch 3, resume from sparsify's checkpoint (batch 1 again, not counted twice)."""
    owned, seen = run_of(distributed_runs / "resumed")
    assert [o["resumed_at"] for o in owned] == [1, 1], "sparsify restarts at the batch its checkpoint was saved in"
    check_distributed(distributed_runs / "resumed", seen, steps=range(6))
