"""Processes that each hold a shard of the latents feed ActivationSampleCollector (gloo on CPU; run by tests).

Ranks form a ``dp x tp`` grid (``rank = dp_rank * tp + tp_rank``): the ranks of one data-parallel replica see the
same batches, each with its shard of the latents (dense: the shard's columns; sparse: TopK indices as global ids);
the ranks of one shard merge. It saves, resumes every process from the checkpoint, goes on, and saves again.
"""

import argparse
import contextlib
import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from helpers import make_collector, padded_batches, to_sparse  # noqa: E402

from lightning_sae_samples.sharding import ShardLayout  # noqa: E402

F = 9


def feed(collector, layout, batches, first_step, mode):
    seen = []
    for i, (tokens, mask, latents) in enumerate(batches):
        step, rows = first_step + i // 2, (i % 2) * tokens.shape[0]
        if mode == "sparse":
            indices, values, latents = to_sparse(latents)
            collector.update(tokens, latent_indices=indices, latent_values=values, step=step, attention_mask=mask)
        else:
            collector.update(tokens, latents=latents[..., layout.offset : layout.stop], step=step,
                             attention_mask=mask)
        seen.append((step, rows, tokens, latents, mask))
    return seen


@contextlib.contextmanager
def received_bytes(counter: list) -> None:
    """Count the bytes this process receives from others in collectives (objects pickled, tensors raw)."""
    rank, saved = dist.get_rank(), {}

    def wrap(name, received):
        saved[name] = original = getattr(dist, name)

        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            counter[0] += received(*args, **kwargs)
            return result
        setattr(dist, name, call)

    def others(objects):
        return sum(len(pickle.dumps(o)) for i, o in enumerate(objects or []) if i != rank)

    wrap("gather_object", lambda obj, object_gather_list=None, *a, **k: others(object_gather_list))
    wrap("all_gather_object", lambda object_list, obj, *a, **k: others(object_list))
    wrap("broadcast_object_list", lambda object_list, src=0, *a, **k: 0 if rank == src else others([0, *object_list]))
    wrap("all_gather", lambda tensor_list, tensor, *a, **k: sum(t.nbytes for t in tensor_list) - tensor.nbytes)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def fail_later_saves(collector, layout, batches, mode, out: Path, fail_rank: int) -> None:
    """Save into ``first`` again while ``fail_rank`` fails writing its part: first with an error, then by dying."""
    from lightning_sae_samples.samples_dir import shards

    rank = dist.get_rank()
    feed(collector, layout, batches[6:], 3, mode)
    write_part = shards.atomic_torch_save

    def failing(path, obj):
        raise OSError(f"no space left writing {Path(path).name}")

    if rank == fail_rank:
        shards.atomic_torch_save = failing
    try:
        collector.save(out / "first")
        outcome = "saved"
    except Exception as err:  # every rank must raise, none may wait for ever
        outcome = f"{type(err).__name__}: {err}"
    torch.save(outcome, out / f"outcome_{rank}.pt")
    dist.barrier()

    def dying(path, obj):
        write_part(path, obj)  # the part is complete, and the process dies before it reports to rank 0
        os._exit(3)

    if rank == fail_rank:
        shards.atomic_torch_save = dying
    collector.save(out / "first")


def worker(rank: int, dp: int, tp: int, out: Path, mode: str, port: int, top: int, fail_rank: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=dp * tp)
    dp_rank, tp_rank = divmod(rank, tp)
    groups = [dist.new_group([d * tp + t for d in range(dp)]) for t in range(tp)] if dp > 1 else [None] * tp
    layout = ShardLayout.even(F, tp, tp_rank, groups[tp_rank])
    batches = padded_batches(8, seed=20 + dp_rank, num_latents=F)
    collector = make_collector(num_latents=F, shard_layout=layout, top_features_to_save=top)
    seen = feed(collector, layout, batches[:6], 0, mode)
    received = [0]
    with received_bytes(received):
        collector.save(out / "first")
    torch.save(received[0], out / f"received_{rank}.pt")
    state = collector.state_dict()  # as a checkpoint after the save: a new history window, the history joined
    if rank == 0:
        torch.save(state, out / "state.pt")
    dist.barrier()
    if fail_rank >= 0:
        fail_later_saves(collector, layout, batches, mode, out, fail_rank)
        return
    resumed = make_collector(num_latents=F, shard_layout=layout, top_features_to_save=top)
    resumed.load_state_dict(torch.load(out / "state.pt", weights_only=True))
    seen += feed(resumed, layout, batches[6:], 3, mode)
    resumed.save(out / "second")
    if tp_rank == 0:  # each replica's batches, once
        torch.save([(step, dp_rank, *rest) for step, *rest in seen], out / f"seen_{dp_rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="dense")
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--port", type=int, default=29534)
    parser.add_argument("--top", type=int, default=F, help="top_features_to_save")
    parser.add_argument("--fail-rank", type=int, default=-1, help="a rank that fails the saves after the first")
    args = parser.parse_args()
    # Forked, not spawned: this parent has run no torch operator (no thread pool for a child to inherit), and a
    # spawned worker would import torch, this script and its helpers again: seconds each, on every run.
    mp.start_processes(worker, args=(args.dp, args.tp, args.out, args.mode, args.port, args.top, args.fail_rank),
                       nprocs=args.dp * args.tp, start_method="fork")
