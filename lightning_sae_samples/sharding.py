"""Latents split across processes: a shard is a collection with an offset.

Under tensor parallelism each process holds a contiguous range of the SAE's latents (its shard) for the same
tokens as the other shards of its data-parallel replica. Its collection keeps only those latents, numbered from 0;
this module knows where they sit among all ``F`` (:class:`ShardLayout`), which processes hold the same range for
other tokens (the replicas, which merge as data-parallel processes do), and how the ranges join into one state.
The engine never sees the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_sae_samples.state.slices import concat_states

#: One process's entry in the exchange at a merge: collecting?, sharded?, offset, local F, global F.
_DESCRIPTION = 5


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Where one process's latents sit among the SAE's, and which processes hold the same ones.

    Args:
        offset: Global id of this process's first latent.
        local: How many latents this process holds (its latents are ``offset`` to ``offset + local - 1``).
        total: The SAE's latent count ``F``.
        replica_group: The ``torch.distributed`` process group of the processes that hold these same latents for
            other tokens (the data-parallel replicas of this shard), this process included. ``None``: no other
            process holds them (tensor parallelism alone).
    """

    offset: int
    local: int
    total: int
    replica_group: Any = None

    def __post_init__(self) -> None:
        for name in ("offset", "local", "total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ShardLayout `{name}` must be an int, got {type(value).__name__}.")
        if self.total < 1 or self.local < 1 or self.offset < 0 or self.offset + self.local > self.total:
            raise ValueError(
                f"ShardLayout(offset={self.offset}, local={self.local}, total={self.total}) is not a range of the"
                " SAE's latents: it needs 0 <= offset, 1 <= local and offset + local <= total."
            )

    @property
    def stop(self) -> int:
        """One past the global id of this process's last latent."""
        return self.offset + self.local

    @property
    def whole(self) -> bool:
        """Whether this shard holds every latent (a layout that changes nothing)."""
        return self.local == self.total

    @classmethod
    def even(cls, total: int, shards: int, index: int, replica_group: Any = None) -> ShardLayout:
        """Shard ``index`` of ``shards`` over ``total`` latents, split as ``torch.chunk`` and ``DTensor`` split."""
        from torch.distributed.tensor import Shard

        local, offset = Shard.local_shard_size_and_offset(total, shards, index)
        if local < 1:
            raise ValueError(f"{total} latents cannot be split into {shards} shards: shard {index} would be empty.")
        return cls(int(offset), int(local), int(total), replica_group)

    def replica_rank(self) -> int:
        """This process's rank among the replicas of its shard: the rank its token order keys and resumes go by."""
        if self.replica_group is None:
            return 0
        return torch.distributed.get_rank(self.replica_group)

    def same_range(self, other: ShardLayout) -> bool:
        """Whether two layouts cover the same latents of the same SAE."""
        return (self.offset, self.local, self.total) == (other.offset, other.local, other.total)


class GroupGather:
    """``all_gather`` over a ``torch.distributed`` process group (default: the world), stacked on a new first dim."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = torch.distributed.get_world_size(group)
        nccl = torch.distributed.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` (same shape everywhere), stacked in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)


@dataclasses.dataclass(frozen=True)
class Shards:
    """Every process's part in one merge: whether it collects, and its layout (``None``: not sharded)."""

    collecting: list[bool]
    layouts: list[Optional[tuple[int, int, int]]]

    @classmethod
    def exchange(cls, layout: Optional[ShardLayout], collecting: bool) -> Shards:
        """Every process's description (a collective over the world)."""
        world = GroupGather()
        mine = [int(collecting), int(layout is not None)]
        mine += [layout.offset, layout.local, layout.total] if layout is not None else [0, 0, 0]
        table = world.all_gather(torch.tensor(mine, dtype=torch.int64, device=world.device)).view(-1, _DESCRIPTION)
        rows = table.cpu().tolist()
        return cls([bool(r[0]) for r in rows], [tuple(r[2:]) if r[1] else None for r in rows])

    @property
    def sharded(self) -> bool:
        """Whether any process collects a shard."""
        return any(layout is not None for layout in self.layouts)

    def ranges(self) -> list[tuple[int, int, int]]:
        """The distinct shards ``(offset, local, total)``, in order; checked to cover every latent once.

        Raises:
            ValueError: Some processes are sharded and others not, or the shards overlap, leave latents out or
                disagree on ``F``.
        """
        if any(layout is None for layout in self.layouts):
            plain = [rank for rank, layout in enumerate(self.layouts) if layout is None]
            raise ValueError(
                f"Rank(s) {plain} collect all latents while others collect a shard: give every process a shard"
                " layout (or a DTensor of latents), or none."
            )
        ranges = sorted(set(self.layouts))  # type: ignore[arg-type]
        totals = {total for _, _, total in ranges}
        covered = 0
        for offset, local, _ in ranges:
            if offset != covered:
                break
            covered += local
        if len(totals) != 1 or covered != next(iter(totals)) or covered != sum(local for _, local, _ in ranges):
            raise ValueError(
                f"The processes' latent shards {[(o, o + n) for o, n, _ in ranges]} (of F={sorted(totals)}) do not"
                " cover the SAE's latents exactly once: each latent must belong to one shard, which its replicas"
                " hold with the same offset and size."
            )
        return ranges

    def replicas(self, shard: tuple[int, int, int]) -> list[int]:
        """The global ranks that hold ``shard``."""
        return [rank for rank, layout in enumerate(self.layouts) if layout == shard]


def replica_members(shards: Shards, layout: ShardLayout) -> list[int]:
    """The global ranks of this process's replica group, in the group's rank order (checked).

    Raises:
        ValueError: The layout's ``replica_group`` (``None``: this process alone) is not the set of processes that
            hold its shard.
    """
    members = shards.replicas((layout.offset, layout.local, layout.total))
    group = layout.replica_group
    ranks = [torch.distributed.get_rank()] if group is None else torch.distributed.get_process_group_ranks(group)
    if sorted(ranks) != members:
        raise ValueError(
            f"The shard of latents {layout.offset} to {layout.stop - 1} is held by ranks {members}, and its"
            f" replica_group by ranks {sorted(ranks)}: pass as replica_group the data-parallel process group (the"
            " processes that hold the same latents for other tokens), or None where no other process holds them."
        )
    return list(ranks)


def merge_replicas(
    collector: Any, layout: ShardLayout, shards: Shards, gather_replicas: Callable[[Any, GroupGather, bool], Any]
) -> Optional[dict]:
    """Merge this process's shard over its replicas; the shard's merged state on its root, ``None`` elsewhere.

    The root is the first process of the shard's replica group (global rank 0 is the root of its shard).

    Args:
        collector: This process's engine (:class:`~lightning_sae_samples.engine.SampleCollector`) of its shard.
        layout: This process's shard.
        shards: Every process's part (:meth:`Shards.exchange`).
        gather_replicas: ``(collector, GroupGather, is_root) -> Optional[dict]``, the exact data-parallel merge.
    """
    shards.ranges()
    members = replica_members(shards, layout)
    is_root = torch.distributed.get_rank() == members[0]
    if len(members) > 1:
        return gather_replicas(collector, GroupGather(layout.replica_group), is_root)
    return collector.state_dict()


def join_shards(layout: ShardLayout, merged: Optional[dict]) -> Optional[dict]:
    """Every shard's merged state (``merged`` on each root, see :func:`merge_replicas`) joined on global rank 0.

    The whole state of every latent on one process: only for what needs it whole (a checkpoint that Lightning
    keeps on rank 0 only); sharded saves write each shard from its root instead.
    """
    rank = torch.distributed.get_rank()
    parts: Optional[list] = [None] * torch.distributed.get_world_size() if rank == 0 else None
    torch.distributed.gather_object((layout.offset, merged) if merged is not None else None, parts, dst=0)
    if parts is None:
        return None
    return concat_states([state for _, state in sorted((p for p in parts if p is not None), key=lambda p: p[0])])


def merge_shards(
    collector: Any, layout: ShardLayout, shards: Shards, gather_replicas: Callable[[Any, GroupGather, bool], Any]
) -> Optional[dict]:
    """Merge each shard's replicas, then join the shards in order; the whole state on global rank 0.

    See :func:`merge_replicas` for the arguments.
    """
    return join_shards(layout, merge_replicas(collector, layout, shards, gather_replicas))
