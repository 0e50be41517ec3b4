"""sparsify's own Trainer with distribute_modules on two gloo processes, one SAE each (launched by tests).

Two runs, in ``<out>/plain`` and ``<out>/resumed`` (a crash and a resume). Each rank trains on its own shard of the
token dataset (rows ``rank::2``); sparsify gathers every hookpoint's outputs onto the SAE's rank. Each rank records
what its SAEs returned, per batch, in ``seen_<rank>.pt`` and the SAEs it collects in ``owned_<rank>.json``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from sparsify import SparseCoderConfig, TrainConfig  # noqa: E402
from sparsify_helpers import EXCLUDED, HOOKPOINTS, SETTINGS, TOPK, F, tiny_bert, token_dataset, token_ids  # noqa: E402

from lightning_sae_samples.integrations.sparsify import SamplesSparsifyTrainer  # noqa: E402

WORLD, ROWS = 2, 48


class Crash(Exception):
    pass


def make_trainer(out: Path, rank: int, collection_freq: int):
    config = TrainConfig(
        SparseCoderConfig(num_latents=F, k=TOPK), batch_size=4, hookpoints=HOOKPOINTS, log_to_wandb=False,
        save_dir=str(out / "ckpt"), run_name="run", save_every=3, lr=1e-3, exclude_tokens=[EXCLUDED],
        distribute_modules=True,
    )
    shard = token_dataset(token_ids(ROWS)[rank::WORLD])
    trainer = SamplesSparsifyTrainer(
        config, shard, tiny_bert(), samples_dir=out / "samples", collection_freq=collection_freq, **SETTINGS
    )
    seen = []
    for name, sae in trainer.saes.items():
        sae.register_forward_hook(
            lambda m, a, o, name=name: seen.append(
                (name, trainer.global_step, o.latent_indices.detach().clone(), o.latent_acts.detach().clone()))
        )
    return trainer, seen


def plain_run(out: Path, rank: int) -> tuple[dict, list]:
    """Six batches, collected every second one."""
    trainer, seen = make_trainer(out, rank, collection_freq=2)
    trainer.fit()
    return {"collects": trainer.samples.names}, seen


def crashed_and_resumed(out: Path, rank: int, crash_at: int = 3) -> tuple[dict, list]:
    """Every batch collected; both ranks stop at batch ``crash_at`` and resume from sparsify's last checkpoint."""
    trainer, first = make_trainer(out, rank, collection_freq=1)

    def crash(module, args):
        if trainer.global_step == crash_at:
            raise Crash

    trainer.model.register_forward_pre_hook(crash)
    try:
        trainer.fit()
    except Crash:
        pass
    trainer.samples.close()
    dist.barrier()
    trainer, again = make_trainer(out, rank, collection_freq=1)
    trainer.load_state(str(out / "ckpt" / "run"))
    resumed_at = trainer.global_step
    trainer.fit()
    # The collection restored holds the batch sparsify trains again, as the first run saw it.
    seen = [s for s in first if s[1] <= resumed_at] + [s for s in again if s[1] > resumed_at]
    return {"collects": trainer.samples.names, "resumed_at": resumed_at}, seen


def worker(rank: int, out: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    for scenario, run in (("plain", plain_run), ("resumed", crashed_and_resumed)):
        owned, seen = run(out / scenario, rank)
        torch.save(seen, out / scenario / f"seen_{rank}.pt")
        (out / scenario / f"owned_{rank}.json").write_text(json.dumps(owned))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Forked, not spawned: this parent has run no torch operator (no thread pool for a child to inherit), and a
    # spawned worker would import torch, this script and its helpers again: seconds each, on every run.
    mp.start_processes(worker, args=(args.out, args.port), nprocs=WORLD, start_method="fork")
