"""Find the latents and tokens of a training step and check them before they reach the collector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


class LatentInputError(ValueError):
    """The training step's outputs or batch do not hold usable latents and tokens."""


@dataclass(frozen=True)
class InputKeys:
    """Names of the entries the callback reads.

    Args:
        latents: Dense latents ``[B, T, F]`` or ``[B*T, F]`` in the training-step outputs.
        latent_indices: Sparse (TopK) active indices ``[B, T, k]`` or ``[B*T, k]``.
        latent_values: Values of those indices, same shape.
        tokens: Token ids ``[B, T]``, in the outputs or else in the batch.
    """

    latents: str = "latents"
    latent_indices: str = "latent_indices"
    latent_values: str = "latent_values"
    tokens: str = "tokens"


@dataclass
class LatentBatch:
    """One step's latents, detached, reshaped to ``[B, T, ...]`` and validated.

    Exactly one of ``dense`` or (``indices``, ``values``) is set.
    """

    tokens: Tensor
    dense: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    values: Optional[Tensor] = None

    @property
    def num_latents(self) -> Optional[int]:
        """``F`` for dense latents; unknown (``None``) for sparse ones."""
        return None if self.dense is None else self.dense.shape[-1]


def _keys_of(obj: Any) -> list[str]:
    return sorted(str(k) for k in obj.keys()) if isinstance(obj, Mapping) else []


def _as_rows(tensor: Tensor, tokens: Tensor, name: str) -> Tensor:
    batch, seq = tokens.shape
    if tensor.dim() == 3 and tensor.shape[:2] == tokens.shape:
        return tensor
    if tensor.dim() == 2 and tensor.shape[0] == batch * seq:
        return tensor.reshape(batch, seq, tensor.shape[1])
    raise LatentInputError(
        f"`{name}` has shape {tuple(tensor.shape)} but tokens have shape {tuple(tokens.shape)}: expected"
        f" [{batch}, {seq}, F] or [{batch * seq}, F]. Return latents for every token of the batch, in the"
        " tokens' row-major order."
    )


def find_tokens(outputs: Mapping, batch: Any, key: str) -> Tensor:
    """Token ids from ``outputs[key]``, else ``batch[key]``."""
    if key in outputs:
        tokens = outputs[key]
    elif isinstance(batch, Mapping) and key in batch:
        tokens = batch[key]
    else:
        raise LatentInputError(
            f"No token ids found: expected `{key}` in the training_step outputs (keys: {_keys_of(outputs)})"
            f" or in the batch (keys: {_keys_of(batch)}). Return them as `{key}` or set `tokens_key`."
        )
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise LatentInputError(f"`{key}` must be a [batch, seq] tensor of token ids, got {shape}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise LatentInputError(
            f"`{key}` must hold integer token ids, got dtype {tokens.dtype}. Pass the ids (e.g. `input_ids`),"
            " not embeddings or masks."
        )
    return tokens.detach()


def read_latents(outputs: Any, batch: Any, keys: InputKeys) -> LatentBatch:
    """Extract and validate one step's latents and tokens.

    Raises:
        LatentInputError: With the keys found and expected, or both shapes, and how to fix it.
    """
    if not isinstance(outputs, Mapping):
        raise LatentInputError(
            f"training_step must return a dict holding the latents; got {type(outputs).__name__}. Return e.g."
            f" {{'loss': loss, '{keys.latents}': latents}} or {{'loss': loss, '{keys.latent_indices}': idx,"
            f" '{keys.latent_values}': vals}}."
        )
    dense = outputs.get(keys.latents)
    indices = outputs.get(keys.latent_indices)
    values = outputs.get(keys.latent_values)
    if dense is None and (indices is None or values is None):
        raise LatentInputError(
            f"No latents in the training_step outputs (keys: {_keys_of(outputs)}). Expected dense"
            f" `{keys.latents}` or sparse `{keys.latent_indices}` + `{keys.latent_values}`; set the"
            " callback's `latents_key` / `latent_indices_key` / `latent_values_key` to your names."
        )
    tokens = find_tokens(outputs, batch, keys.tokens)
    if dense is not None:
        if not isinstance(dense, Tensor) or not dense.is_floating_point():
            raise LatentInputError(f"`{keys.latents}` must be a floating-point tensor.")
        return LatentBatch(tokens=tokens, dense=_as_rows(dense.detach(), tokens, keys.latents))
    if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
        dtype = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
        raise LatentInputError(
            f"`{keys.latent_indices}` must be an integer tensor of latent indices, got {dtype}."
            " Return the indices from torch.topk (`.indices`), not their values."
        )
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise LatentInputError(f"`{keys.latent_values}` must be a floating-point tensor.")
    if indices.shape != values.shape:
        raise LatentInputError(
            f"`{keys.latent_values}` has shape {tuple(values.shape)} but `{keys.latent_indices}` has shape"
            f" {tuple(indices.shape)}; they must match (one value per active index)."
        )
    return LatentBatch(
        tokens=tokens,
        indices=_as_rows(indices.detach(), tokens, keys.latent_indices),
        values=_as_rows(values.detach(), tokens, keys.latent_values),
    )


def check_indices_in_range(indices: Tensor, num_latents: int, key: str) -> None:
    """Raise if any sparse index is outside ``[0, num_latents)``."""
    if indices.numel() and bool(((indices < 0) | (indices >= num_latents)).any()):
        low, high = int(indices.min()), int(indices.max())
        raise LatentInputError(
            f"`{key}` holds indices in [{low}, {high}] but the SAE has {num_latents} latents (valid:"
            f" 0..{num_latents - 1}). Check `num_latents` and that indices index the latent dimension."
        )
