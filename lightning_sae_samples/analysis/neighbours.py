"""A latent's neighbours: the latents whose decoder directions are closest to its own (cosine similarity).

The rows of ``decoder_directions.pt`` are unit vectors, so the cosine of two latents is the dot product of their
rows. One latent's neighbours come from one pass over the rows, a chunk at a time, in the rows' own dtype
(bfloat16 by default: half the bytes of float32 to read, which is what a pass costs). No ``F x F`` matrix is ever
formed; the memory beyond the rows is one chunk's products and the candidates.

The pass's products come back rounded to the rows' dtype, so the pass only picks candidates: every row whose
rounded product is within :func:`rounding_margin` of the ``k``-th best. The candidates are then scored again in
float64 (where the products of half-precision rows are exact, so equal rows tie exactly) and the best ``k`` of
those are returned. The result is the exact top ``k`` of the stored rows (equal
cosines: the lower latent first), not an approximation of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Rows per chunk of the product.
CHUNK_ROWS = 1 << 18
DEFAULT_NEIGHBOURS = 10


@dataclass(frozen=True)
class Neighbour:
    """One latent close to another: its index and the cosine of their decoder directions."""

    feature_idx: int
    cosine: float


def rounding_margin(dtype: torch.dtype, d_model: int) -> float:
    """How far a product of two unit rows, computed in ``dtype``, can be from its float32 value.

    The product is rounded once to ``dtype`` (half a unit in the last place of a value at most 1) after an
    accumulation whose error is below ``d_model`` float32 roundings; twice their sum leaves room for a backend
    that rounds the partial sums as well.
    """
    return 2.0 * (torch.finfo(dtype).eps + d_model * torch.finfo(torch.float32).eps)


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
    num, d_model = directions.shape
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < num]
    if bad:
        raise IndexError(f"latents {bad[:5]} are outside the decoder's {num} rows")
    if not latents or k < 1 or num < 2:
        return [[] for _ in latents]
    index = torch.tensor(latents, dtype=torch.int64)
    queries = directions[index]  # [m, d]
    margin = rounding_margin(directions.dtype, d_model)
    best = torch.full((k, len(latents)), -torch.inf)  # the k best rounded products so far, per query
    kept_rows, kept_queries, kept_rounded = [], [], []
    columns = queries.T.contiguous()  # [d, m]: a strided right operand takes a slower kernel
    for start in range(0, num, chunk_rows):
        chunk = directions[start : start + chunk_rows]
        rounded = (chunk @ columns[:, 0] if len(latents) == 1 else chunk @ columns).float().view(len(chunk), -1)
        inside = (index >= start) & (index < start + len(rounded))
        rounded[index[inside] - start, inside.nonzero().flatten()] = -torch.inf
        best = torch.topk(torch.cat([best, torch.topk(rounded, min(k, len(rounded)), dim=0).values]), k, dim=0).values
        floor = (best[-1] - margin).clamp(min=torch.finfo(torch.float32).min)  # never the excluded (-inf) ones
        row, query = (rounded >= floor).nonzero(as_tuple=True)
        kept_rows.append(row + start)
        kept_queries.append(query)
        kept_rounded.append(rounded[row, query])
    rows, query, rounded = torch.cat(kept_rows), torch.cat(kept_queries), torch.cat(kept_rounded)
    near = rounded >= best[-1][query] - margin  # the final k-th best is known only now
    rows, query = rows[near], query[near]
    cosine = (directions[rows].double() * queries[query].double()).sum(1)
    order = torch.argsort(rows, stable=True)
    order = order[torch.argsort(cosine[order], descending=True, stable=True)]
    order = order[torch.argsort(query[order], stable=True)]  # per query: best first, equal ones by latent
    rows, query, cosine = rows[order], query[order], cosine[order]
    first = torch.searchsorted(query, torch.arange(len(latents)))
    rank = torch.arange(len(rows)) - first[query]
    top = rank < k
    live = queries.float().abs().sum(1) > 0
    found: list[list[Neighbour]] = [[] for _ in latents]
    for q, r, c in zip(query[top].tolist(), rows[top].tolist(), cosine[top].tolist()):
        if live[q]:
            found[q].append(Neighbour(r, c))
    return found
