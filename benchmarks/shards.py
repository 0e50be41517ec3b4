"""Peak memory per process and save time of a collection of sharded latents on 1, 2 and 4 CPU processes.

Run from the repository root::

    python benchmarks/shards.py                                   # F = 1048576, 1, 2 and 4 shards
    python benchmarks/shards.py --num-latents 262144 --shards 1 2

For each shard count ``P``, ``P`` processes (gloo) each hold ``ShardLayout.even(F, P, rank)`` (tensor parallelism
alone: no replicas) and fold the same ``--steps`` sparse batches (TopK k = 32 with global ids, every process the
same, as a TopK SAE under tensor parallelism returns them; 8 x 128 tokens a step). Then one ``save`` (a
collective: each shard's process writes its own latents' feature files and its part of the full state, rank 0
the run-level files and the commit; nothing is gathered whole). Printed per rank: peak RSS after collecting and
after the save (``ru_maxrss``), the save's wall time and the bytes the rank received in collectives during the
save; then the time ``serve`` takes to load the directory (``RunIndex.load`` in the parent, its second load);
the ratios to one process come last. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_sae_samples import ActivationSampleCollector  # noqa: E402
from lightning_sae_samples.sharding import ShardLayout  # noqa: E402

SETTINGS = dict(max_samples_per_feature=8, samples_per_feature_to_save=8, context_size=8, samples_per_interval=0,
                top_features_to_save=100, write_report=False)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _count_received() -> list[int]:
    """From now on, count the bytes this process receives from the others in object and tensor collectives."""
    rank, counter = dist.get_rank(), [0]

    def others(objects: list) -> int:
        return sum(len(pickle.dumps(o)) for i, o in enumerate(objects or []) if i != rank)

    def wrap(name: str, received) -> None:
        original = getattr(dist, name)

        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            counter[0] += received(*args, **kwargs)
            return result
        setattr(dist, name, call)

    wrap("gather_object", lambda obj, object_gather_list=None, *a, **k: others(object_gather_list))
    wrap("all_gather_object", lambda object_list, obj, *a, **k: others(object_list))
    wrap("broadcast_object_list", lambda objs, src=0, *a, **k: 0 if rank == src else others([0, *objs]))
    wrap("all_gather", lambda tensors, tensor, *a, **k: sum(t.nbytes for t in tensors) - tensor.nbytes)
    return counter


def worker(rank: int, shards: int, num_latents: int, steps: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=shards)
    torch.set_num_threads(1)
    layout = ShardLayout.even(num_latents, shards, rank)
    collector = ActivationSampleCollector(num_latents=num_latents, shard_layout=layout, **SETTINGS)
    gen = torch.Generator().manual_seed(0)  # the same batches on every process: one tensor-parallel group
    for step in range(steps):
        tokens = torch.randint(0, 50_000, (8, 128), generator=gen)
        first = (torch.rand(8, 128, 1, generator=gen) ** 4 * num_latents).long()  # some fire often, most rarely
        indices = (first + torch.arange(32) * 32_749) % num_latents  # 32 distinct latents per token (odd stride)
        values = torch.rand(8, 128, 32, generator=gen) * 5 + 0.2
        collector.update(tokens, latent_indices=indices, latent_values=values, step=step)
    collected = _peak_mib()
    dist.barrier()
    received = _count_received()
    start = time.perf_counter()
    collector.save(out / "samples")
    dist.barrier()
    seconds = time.perf_counter() - start
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "collected_mib": collected, "saved_mib": _peak_mib(), "save_s": seconds,
         "received_bytes": received[0]}))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    from lightning_sae_samples.serve.index import RunIndex  # here: the workers need not import serve

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-latents", type=int, default=1 << 20)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    results = {}
    for shards in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            mp.spawn(worker, args=(shards, args.num_latents, args.steps, _port(), out), nprocs=shards)
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(shards)]
            parts = sorted(p.name for p in (out / "samples").glob("full_state*"))
            RunIndex.load(out / "samples")  # the first load also pays for imports and a cold file cache
            start = time.perf_counter()
            RunIndex.load(out / "samples")
            ranks[0]["serve_load_s"] = time.perf_counter() - start
        results[shards] = ranks
        print(f"{shards} shard(s) of F={args.num_latents:,}: full state {parts};"
              f" serve loads it in {ranks[0]['serve_load_s']:.2f} s")
        for r in ranks:
            print(f"  rank {r['rank']}: peak RSS {r['collected_mib']:.0f} MiB after collecting,"
                  f" {r['saved_mib']:.0f} MiB after the save; save {r['save_s']:.2f} s;"
                  f" received {r['received_bytes']:,} bytes in the save")
    base = results.get(1)
    if base:
        for shards, ranks in results.items():
            others = [r["collected_mib"] for r in ranks[1:]] or [ranks[0]["collected_mib"]]
            first = ranks[0]["collected_mib"] / base[0]["collected_mib"]
            print(f"{shards} shard(s) / 1: peak RSS after collecting, rank 0 {first:.2f},"
                  f" other ranks (max) {max(others) / base[0]['collected_mib']:.2f};"
                  f" after the save, rank 0 {ranks[0]['saved_mib'] / base[0]['saved_mib']:.2f};"
                  f" save time {ranks[0]['save_s'] / base[0]['save_s']:.2f};"
                  f" serve load {ranks[0]['serve_load_s'] / base[0]['serve_load_s']:.2f}")


if __name__ == "__main__":
    main()
