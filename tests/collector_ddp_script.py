"""Two processes (gloo) feed ActivationSampleCollector in a plain loop, then save (run by tests)."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from helpers import assert_same, make_collector, padded_batches, to_sparse  # noqa: E402


def worker(rank: int, world: int, out: Path, mode: str, port: int, device: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    collector = make_collector(num_latents=9)
    seen = []
    for i, (tokens, mask, latents) in enumerate(padded_batches(6, seed=20 + rank)):
        step, rows = i // 2, (i % 2) * tokens.shape[0]
        on = {"attention_mask": mask.to(device)}
        if mode == "sparse":
            indices, values, latents = to_sparse(latents)
            collector.update(tokens.to(device), latent_indices=indices.to(device), latent_values=values.to(device),
                             step=step, **on)
        else:
            collector.update(tokens.to(device), latents=latents.to(device), step=step, **on)
        seen.append((step, rank, rows, tokens, latents, mask))
    state = collector.state_dict()
    saved = collector.save(out / "samples")
    torch.save(seen, out / f"seen_{rank}.pt")
    if rank == 0:
        torch.save(state, out / "state.pt")
        assert saved
    else:
        assert state["collector"] is None and saved == []
    dist.barrier()
    # Every process loads the same checkpoint; the merge after it must count each sample once.
    resumed = make_collector(num_latents=9)
    resumed.load_state_dict(torch.load(out / "state.pt", weights_only=True))
    again = resumed.state_dict()
    if rank == 0:
        assert_same(state["collector"], again["collector"])
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="dense")
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--device", default="cpu", help="where the latents are (both ranks share cuda:0 under gloo)")
    args = parser.parse_args()
    # Forked, not spawned: this parent has run no torch operator (no thread pool for a child to inherit), and a
    # spawned worker would import torch, this script and its helpers again: seconds each, on every run. CUDA is
    # not usable in a forked child: on the GPU the workers are spawned.
    start_method = "spawn" if args.device.startswith("cuda") else "fork"
    mp.start_processes(worker, args=(2, args.out, args.mode, args.port, args.device), nprocs=2,
                       start_method=start_method)
