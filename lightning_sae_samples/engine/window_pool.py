"""The context windows of the samples that sample tables keep or stage: one pool, shared by a collector's tables.

A batch's candidate windows are written once, whichever tables take them: each table that stages a candidate holds
a reference to its slot, and lets go when the sample leaves it or never enters. A slot whose last reference goes is
free; free slots are gathered at the next size read-back (:meth:`WindowPool.ask`), so they cost no sync of their
own, and are taken again (in slot order) before never used ones. The pool starts small and grows to twice what it
needs when it runs out, so its memory follows the samples kept and staged.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Optional

import torch
from torch import Tensor

from lightning_sae_samples.engine.indices import indices_of
from lightning_sae_samples.state.schema import EMPTY, SAMPLE_FIELD

#: References to one slot fit in int8: a collector has at most five tables.
REFS_DTYPE = torch.int8


def wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype that holds every value of both (bfloat16 and float16 together: float32)."""
    return a if a == b else torch.promote_types(a, b)


class WindowPool:
    """Slots of window ``fields`` (one row each, and a scratch row past them), with a reference count per slot.

    Args:
        fields: What a slot holds: ``context_tokens`` and ``context_acts`` (``[window]`` each) and ``position``,
            or ``position`` and ``token_ref``.
        window: Window length ``2 * half_window + 1``.
        device: Where the pool lives.
        min_slots: Slots the pool takes at its first growth.
        token_dtype: Dtype of the context token ids (see :meth:`widen`).
        acts_dtype: Dtype of the context activations (see :meth:`widen`).
    """

    def __init__(
        self,
        fields: tuple[str, ...],
        window: int,
        device: torch.device,
        min_slots: int = 1 << 10,
        token_dtype: torch.dtype = torch.int16,
        acts_dtype: torch.dtype = torch.float32,
    ) -> None:
        dtypes = {"context_tokens": token_dtype, "context_acts": acts_dtype}
        self.fields: dict[str, Tensor] = {
            name: torch.empty((1, window) if name.startswith("context_") else (1,),
                              dtype=dtypes.get(name, SAMPLE_FIELD[name].dtype), device=device)
            for name in fields
        }
        self.refs = torch.zeros(1, dtype=REFS_DTYPE, device=device)
        self._minus_one = torch.full((1,), -1, dtype=REFS_DTYPE, device=device)
        self.min_slots = min_slots
        #: Slots the pool grows to at most by doubling (the tables add their places and stage); more only on demand.
        self.limit = 0
        self.next_unused = 0
        #: Free slots, taken first.
        self.released = torch.empty(0, dtype=torch.int64, device=device)
        #: Slots let go of (``EMPTY`` where a sample kept its slot or there was none), free where no reference is left.
        self._letting_go: list[Tensor] = []
        self._asked: Optional[Tensor] = None

    @property
    def slots(self) -> int:
        """Slots the pool holds now; the scratch row follows them."""
        return len(self.refs) - 1

    def widen(self, token_dtype: Optional[torch.dtype], acts_dtype: Optional[torch.dtype]) -> None:
        """Let the pool hold token ids of ``token_dtype`` and activations of ``acts_dtype``, converting in place.

        The pool only widens (the values it holds stay exact); activations take ``acts_dtype`` as is while no
        window was ever written.
        """
        if "context_tokens" not in self.fields:
            return
        if token_dtype is not None:
            current = self.fields["context_tokens"].dtype
            dtype = wider(current, token_dtype)
            if dtype != current:
                self.fields["context_tokens"] = self.fields["context_tokens"].to(dtype)
        if acts_dtype is not None:
            current = self.fields["context_acts"].dtype
            dtype = acts_dtype if self.next_unused == 0 else wider(current, acts_dtype)
            if dtype != current:
                self.fields["context_acts"] = self.fields["context_acts"].to(dtype)

    def write(self, windows: dict[str, Tensor], holders: Optional[Tensor] = None) -> Tensor:
        """Write windows (``[S, ...]`` per field) into free slots; returns their slots.

        ``holders``: the references each window starts with (``[S]``, int8), e.g. the tables that will stage it;
        ``None``: none yet (each holder then calls :meth:`hold`).
        """
        count = len(windows["position"])
        reused = min(count, len(self.released))
        start = self.next_unused
        self._reserve(start + count - reused)
        self.next_unused += count - reused
        if not reused:  # never used slots, side by side: slice copies
            for name, pool in self.fields.items():
                pool[start : start + count] = windows[name]
            if holders is not None:
                self.refs[start : start + count] = holders
            return torch.arange(start, start + count, device=self.refs.device)
        taken, self.released = self.released[:reused], self.released[reused:]
        slots = torch.cat([taken, torch.arange(start, start + count - reused, device=self.refs.device)])
        for name, pool in self.fields.items():
            pool.index_copy_(0, slots, windows[name].to(pool.dtype))
        if holders is not None:
            self.refs.index_copy_(0, slots, holders.to(REFS_DTYPE))
        return slots

    def hold(self, slots: Tensor) -> None:
        """One more reference to each of these slots (distinct)."""
        self.refs.index_add_(0, slots, torch.ones((), dtype=REFS_DTYPE, device=slots.device).expand(len(slots)))

    def let_go(self, slots: Tensor) -> None:
        """One reference less to each of these slots (distinct; ``EMPTY`` entries are skipped)."""
        if not len(slots):
            return
        at = slots % (self.slots + 1)  # EMPTY: the scratch row, whose count is never read
        self.refs.index_add_(0, at, self._minus_one.expand(len(at)))
        self._letting_go.append(torch.where(self.refs.index_select(0, at) == 0, slots, EMPTY))

    def ask(self) -> Optional[Tensor]:
        """The count to read back before :meth:`answer` frees the slots let go of so far (``None``: none were)."""
        if not self._letting_go:
            return None
        self._asked = torch.cat(self._letting_go) if len(self._letting_go) > 1 else self._letting_go[0]
        self._letting_go = []
        return (self._asked != EMPTY).sum().view(1)

    def answer(self, count: int) -> None:
        """Free the slots :meth:`ask` counted (``count`` of them, as read back)."""
        asked, self._asked = self._asked, None
        if count:
            # In slot order: windows written to them next land in ascending places of the pool.
            freed = torch.sort(asked.index_select(0, indices_of(asked != EMPTY, count)).long()).values
            self.released = torch.cat([self.released, freed]) if len(self.released) else freed

    def asks(self) -> Generator[Tensor, list[int], None]:
        """:meth:`ask` and :meth:`answer` as steps of ``sample_table.flush_tables``."""
        ask = self.ask()
        if ask is not None:
            (count,) = yield ask
            self.answer(count)

    def _reserve(self, slots: int) -> None:
        """Grow the pool to at least ``slots`` slots: to twice that, up to :attr:`limit` unless more are needed."""
        size = self.slots
        if slots <= size:
            return
        grown = max(slots, min(max(2 * slots, self.min_slots), self.limit))
        # Growing along the first dimension keeps a contiguous tensor's rows where they are. Slots past
        # `next_unused` are written before they are read, so the new part needs no fill; their counts start at 0.
        for pool in self.fields.values():
            pool.resize_((grown + 1, *pool.shape[1:]))
        self.refs.resize_(grown + 1)[size:].zero_()
