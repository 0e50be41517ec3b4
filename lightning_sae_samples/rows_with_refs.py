"""Token refs that travel beside shuffled activation rows, where no trainer's transform can reach them.

A trainer may scale, normalize, cast or move a batch of activations before its SAE sees it (dictionary_learning's
``trainSAE(normalize_activations=True, autocast_dtype=torch.bfloat16)``, SAELens' activation scaler). Refs riding
inside that tensor as extra columns would be divided or cast with it: every context silently wrong, or a crash.
Here the data provider yields the activations alone and keeps each batch's refs beside it, and the collection
step asks for the refs of the batch it trains on (:meth:`RowsWithRefs.refs_for`).

The match is by order: a trainer takes a batch and trains on it before it takes the next (SAELens' ``fit``,
dictionary_learning's ``trainSAE``, a plain loop), so the batch trained on is the batch yielded last, whatever
was drawn before it for a norm estimate or an evaluation. What would break the order (a loader that reads ahead,
a trainer that reorders rows) is caught: the batch must hold the rows yielded last, in their order, up to a
positive scale per row and rounding (what normalizing and casting do), or :meth:`~RowsWithRefs.refs_for` refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor
from torch.linalg import vecdot, vector_norm

from lightning_sae_samples.inputs import LatentInputError, check_refs
from lightning_sae_samples.token_sources import TokenSource

__all__ = ["SAME_ROW_COSINE", "RowsWithRefs"]

#: A trained row is the yielded row if their cosine is at least this: casting to bfloat16 costs about 1e-5, a
#: positive scale nothing; another row of activations is far off.
SAME_ROW_COSINE = 0.99


class RowsWithRefs(Iterator[Tensor]):
    """A data provider of shuffled activation rows whose token refs wait beside them.

    Iterating yields each batch's activations ``[N, d]`` alone, for any trainer to transform; :meth:`refs_for`
    gives the refs ``[N]`` of the batch yielded last.

    Args:
        batches: Yields ``(activations [N, d], refs [N])`` per batch, e.g. a ``DataLoader(TensorDataset(acts,
            refs), batch_size=..., shuffle=True)`` over cached activations (refs ``s * T + t`` into an
            :class:`~lightning_sae_samples.token_sources.ArrayTokenSource` over their ``[S, T]`` tokens).
        token_source: Where the refs point; a collector made for these rows reads its windows there.

    Example::

        rows = RowsWithRefs(DataLoader(TensorDataset(acts, refs), batch_size=4096, shuffle=True), source)
        for step, batch in enumerate(rows):
            latents = sae.encode(batch / norm)  # any transform of the batch
            collector.update(token_refs=rows.refs_for(batch / norm), latents=latents, step=step)
    """

    def __init__(self, batches: Iterable[Any], token_source: Optional[TokenSource]) -> None:
        self.token_source = token_source
        self._batches = iter(batches)
        self._last: Optional[tuple[Tensor, Tensor]] = None
        #: Batches yielded so far (the trainer's norm estimates and evaluations draw some too).
        self.batches_yielded = 0

    def __iter__(self) -> RowsWithRefs:
        return self

    def __next__(self) -> Tensor:
        rows, refs = self._split(next(self._batches))
        self._last = (rows, refs)
        self.batches_yielded += 1
        return rows

    def _split(self, item: Any) -> tuple[Tensor, Tensor]:
        index = self.batches_yielded
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"RowsWithRefs: batch {index} must be (activations [N, d], refs [N]), got"
                             f" {type(item).__name__}.")
        rows, refs = item
        if not isinstance(rows, Tensor) or rows.dim() != 2 or not rows.is_floating_point():
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"RowsWithRefs: batch {index}'s activations must be a float [N, d] tensor, got {shape}.")
        refs = check_refs(refs, "token_refs")
        if len(refs) != len(rows):
            raise ValueError(f"RowsWithRefs: batch {index} has {len(rows)} activation rows and {len(refs)} refs;"
                             " give one ref per row.")
        return rows, refs

    def close(self) -> None:
        """Stop the underlying generator now rather than at interpreter exit."""
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()

    def refs_for(self, batch: Tensor) -> Tensor:
        """The token refs ``[N]`` of ``batch``, the batch yielded last as the trainer holds it now.

        ``batch`` may be that very tensor, or the trainer's copy of it: scaled, normalized, cast or moved. One
        host sync checks a copy; the tensor itself needs none.

        Raises:
            LatentInputError: Nothing was yielded yet, or ``batch`` does not hold the rows yielded last in their
                order (another batch, a subset, rows reordered, or a transform that is not a positive scale).
        """
        if self._last is None:
            raise LatentInputError(
                "RowsWithRefs.refs_for: no batch was yielded yet. Train on the batches this provider yields and ask"
                " with the batch of the current step."
            )
        rows, refs = self._last
        if not isinstance(batch, Tensor) or batch.dim() != 2 or len(batch) != len(rows):
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise LatentInputError(
                f"RowsWithRefs.refs_for: the batch {shape} is not the {tuple(rows.shape)} batch yielded last. Pass"
                " the batch of this step as the trainer got it from this provider (one ref per row)."
            )
        if batch is rows or _same_storage(batch, rows):
            return refs
        if not bool(_same_rows(batch, rows).all()):
            raise LatentInputError(
                f"RowsWithRefs.refs_for: the batch trained on is not the batch yielded last (batch"
                f" {self.batches_yielded - 1}): its rows differ beyond a positive scale and rounding. Train on each"
                " batch as it is yielded, one at a time: a loader that reads ahead (DataLoader workers, prefetch) or"
                " reorders rows breaks the pairing, and the refs would name other tokens."
            )
        return refs


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.data_ptr() == b.data_ptr()


def _same_rows(batch: Tensor, rows: Tensor) -> Tensor:
    """``[N]`` bool: each row of ``batch`` is the same row of ``rows`` up to a positive scale and rounding.

    Three passes over the rows (a dot product and two norms). A row holding a NaN or an infinity is not judged
    (the collector counts and skips non-finite values).
    """
    got = batch.detach().float()
    want = rows.detach().to(got.device, torch.float32)
    got_norm, want_norm = vector_norm(got, dim=1), vector_norm(want, dim=1)
    cosine = vecdot(got, want) / got_norm / want_norm
    both_zero = (got_norm == 0) & (want_norm == 0)
    return (cosine >= SAME_ROW_COSINE) | both_zero | ~torch.isfinite(want_norm)
