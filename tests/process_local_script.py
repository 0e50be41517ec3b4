"""Two gloo processes, each the only one collecting its own SAE (MultiSAECollector(process_local=True)); run by tests.

Rank ``r`` collects SAE ``s<r>``, then saves to ``<out>/locked`` (a run folder whose lock the test holds) and to
``<out>/run``; ``result_<rank>.json`` says what each save did, ``seen_<rank>.pt`` holds the batches folded.
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

from lightning_sae_samples import MultiSAECollector  # noqa: E402

F = 6
SETTINGS = dict(max_samples_per_feature=2, context_size=2, activation_threshold=0.0, top_features_to_save=F,
                samples_per_feature_to_save=2, write_report=False)


def attempt(save) -> str:
    try:
        save()
    except Exception as err:  # noqa: BLE001 - the test reads what each rank raised
        return f"{type(err).__name__}: {err}"
    return "saved"


def worker(rank: int, out: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    collector = MultiSAECollector({f"s{rank}": {"num_latents": F}}, process_local=True, **SETTINGS)
    generator = torch.Generator().manual_seed(rank)
    seen = []
    for step in range(3):
        tokens = torch.randint(0, 20, (2, 5), generator=generator)
        latents = torch.rand(2, 5, F, generator=generator)
        collector.update(tokens, latents={f"s{rank}": latents}, step=step)
        seen.append((step, tokens, latents))
    result = {"locked": attempt(lambda: collector.save(out / "locked")),
              "run": attempt(lambda: collector.save(out / "run"))}
    torch.save(seen, out / f"seen_{rank}.pt")
    (out / f"result_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # Forked, not spawned: this parent has run no torch operator (no thread pool for a child to inherit), and a
    # spawned worker would import torch, this script and its helpers again: seconds each, on every run.
    mp.start_processes(worker, args=(args.out, args.port), nprocs=2, start_method="fork")
