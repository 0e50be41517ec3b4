"""Counting what a collection asks of the device: operators dispatched, and host synchronisations.

On a GPU every operator is a kernel launch, and an operator whose output size depends on the data (``nonzero``,
``unique``, a boolean-mask index) or that reads a value back (``.item()``, ``.tolist()``, a copy to the host)
makes the host wait for the device. :class:`DeviceWork` counts both on any device, CPU included, so the
counts are the same on a machine without a GPU and deterministic: they depend on the code, not on timing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that wait for the device on CUDA: their output size depends on the data, or they read a value back.
SYNCING_OPERATORS = frozenset({
    "nonzero", "masked_select", "_local_scalar_dense", "unique", "_unique", "_unique2", "unique_consecutive",
    "unique_dim", "bincount", "equal", "is_nonzero", "histc", "masked_scatter", "argwhere",
})
#: Tensor methods that copy to the host (not visible as operators on a CPU tensor).
HOST_READS = ("tolist", "cpu", "numpy")


def _syncing(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The name of the synchronisation ``func`` forces with these arguments, or ``None``."""
    name = func.overloadpacket.__name__
    if name in SYNCING_OPERATORS:
        return name
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
        return name
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        indices = args[1] if isinstance(args[1], (list, tuple)) else ()
        if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices):
            return f"{name}[bool]"
    if name in ("_to_copy", "copy_"):
        source = args[1] if name == "copy_" else args[0]
        target = args[0].device if name == "copy_" else kwargs.get("device")
        if isinstance(source, torch.Tensor) and target is not None and torch.device(target).type == "cpu" \
                and source.device.type != "cpu":
            return f"{name}[to host]"
    return None


class DeviceWork(TorchDispatchMode):
    """A context that counts operators dispatched and host synchronisations, by name.

    ``.tolist()``, ``.cpu()`` and ``.numpy()`` count as synchronisations wherever they are called, even on a
    CPU tensor (where they dispatch nothing): on a GPU they would wait.
    """

    def __init__(self) -> None:
        super().__init__()
        self.operators = 0
        self.syncs: Counter[str] = Counter()
        self._originals: dict[str, Any] = {}

    @property
    def num_syncs(self) -> int:
        """Host synchronisations counted so far."""
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.operators += 1
        reason = _syncing(func, args, kwargs)
        if reason is not None:
            self.syncs[reason] += 1
        return func(*args, **kwargs)

    def __enter__(self) -> DeviceWork:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                self.syncs[f".{_name}()"] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}
