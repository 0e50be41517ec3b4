"""A latent's neighbours: the latents whose decoder directions are closest to its own (cosine similarity).

The rows of ``decoder_directions.pt`` are unit vectors, so the cosine of two latents is the dot product of their
rows. One latent's neighbours are found by a matrix-vector product over chunks of rows (each chunk's top ``k``
kept, then the best ``k`` of those): no ``F x F`` matrix is ever formed, and the memory beyond the rows is one
chunk's products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Rows per chunk of the product (a chunk's float32 products stay at 1 MiB).
CHUNK_ROWS = 1 << 18
DEFAULT_NEIGHBOURS = 10


@dataclass(frozen=True)
class Neighbour:
    """One latent close to another: its index and the cosine of their decoder directions."""

    feature_idx: int
    cosine: float


@torch.no_grad()
def nearest_latents(directions: Tensor, latent: int, k: int = DEFAULT_NEIGHBOURS,
                    chunk_rows: int = CHUNK_ROWS) -> list[Neighbour]:
    """The ``k`` latents (other than ``latent``) of highest cosine with ``latent``, best first.

    A zero row (a decoder direction of norm 0) has no neighbours.

    Args:
        directions: Unit rows ``[F, d]`` (any of the decoder file's dtypes).
        latent: The latent, ``0 <= latent < F``.
        k: How many neighbours.
        chunk_rows: Rows per matrix-vector product.
    """
    return nearest_latents_of(directions, [latent], k, chunk_rows)[0]


@torch.no_grad()
def nearest_latents_of(directions: Tensor, latents: Sequence[int], k: int = DEFAULT_NEIGHBOURS,
                       chunk_rows: int = CHUNK_ROWS) -> list[list[Neighbour]]:
    """:func:`nearest_latents` of several latents in one pass over the rows (a report's features)."""
    num = directions.shape[0]
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < num]
    if bad:
        raise IndexError(f"latents {bad[:5]} are outside the decoder's {num} rows")
    if not latents or k < 1 or num < 2:
        return [[] for _ in latents]
    index = torch.tensor(latents, dtype=torch.int64)
    queries = directions[index]  # [m, d]
    live = queries.float().abs().sum(1) > 0
    values, indices = [], []
    for start in range(0, num, chunk_rows):
        cos = (directions[start : start + chunk_rows] @ queries.T).float()  # [chunk, m]
        inside = (index >= start) & (index < start + len(cos))
        cos[index[inside] - start, inside.nonzero().flatten()] = -torch.inf
        top = torch.topk(cos, min(k, len(cos)), dim=0)
        values.append(top.values)
        indices.append(top.indices + start)
    values_all, indices_all = torch.cat(values).T, torch.cat(indices).T  # [m, candidates]
    by_index = torch.argsort(indices_all, dim=1)  # equal cosines (float16 rounding): the lower latent first
    values_all, indices_all = torch.gather(values_all, 1, by_index), torch.gather(indices_all, 1, by_index)
    order = torch.argsort(values_all, dim=1, descending=True, stable=True)[:, :k]
    best_values = torch.gather(values_all, 1, order).tolist()
    best_indices = torch.gather(indices_all, 1, order).tolist()
    return [
        [Neighbour(i, v) for v, i in zip(vs, ids) if v > -torch.inf] if alive else []
        for vs, ids, alive in zip(best_values, best_indices, live.tolist())
    ]
