"""A compact state split into its tensors and its skeleton (everything else), and joined back.

A distributed checkpoint stores tensors by name, each process its own; the skeleton (counts, settings, shapes of
the tensors) is small and travels apart (in the checkpoint's metadata), so no pickled object is ever read back
from the tensor store.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Marks a tensor's place in a skeleton: ``{_TENSOR: name, "shape": [...], "dtype": "float32"}``.
_TENSOR = "__tensor__"


def split_tensors(state: dict, prefix: str = "") -> tuple[dict, dict[str, Tensor]]:
    """``(skeleton, tensors)``: ``tensors`` by flat name (``table/field``), the skeleton naming each in its place."""
    skeleton: dict[str, Any] = {}
    tensors: dict[str, Tensor] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            skeleton[key], inner = split_tensors(value, f"{name}/")
            tensors.update(inner)
        elif torch.is_tensor(value):
            skeleton[key] = {_TENSOR: name, "shape": list(value.shape), "dtype": str(value.dtype).split(".")[-1]}
            tensors[name] = value.detach().cpu().contiguous()
        else:
            skeleton[key] = value
    return skeleton, tensors


def empty_tensors(skeleton: dict) -> dict[str, Tensor]:
    """The tensors a skeleton names, allocated (uninitialized), by flat name: where a checkpoint loads them."""
    out: dict[str, Tensor] = {}
    for value in skeleton.values():
        if isinstance(value, dict) and _TENSOR in value:
            dtype = getattr(torch, str(value["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{value[_TENSOR]!r} has no torch dtype {value['dtype']!r}")
            out[value[_TENSOR]] = torch.empty([int(n) for n in value["shape"]], dtype=dtype)
        elif isinstance(value, dict):
            out.update(empty_tensors(value))
    return out


def join_tensors(skeleton: dict, tensors: dict[str, Tensor]) -> dict:
    """The state a skeleton and its tensors make (see :func:`split_tensors`)."""
    out: dict[str, Any] = {}
    for key, value in skeleton.items():
        if isinstance(value, dict) and _TENSOR in value:
            out[key] = tensors[value[_TENSOR]]
        elif isinstance(value, dict):
            out[key] = join_tensors(value, tensors)
        else:
            out[key] = value
    return out
