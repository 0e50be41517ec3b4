"""Find the latents and tokens of a training step and check them before they reach the collector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sae_samples.arguments import TOKEN_ID_MAX
from lightning_sae_samples.config import CallbackConfig

NUM_LATENTS_ATTRS = ("num_latents", "d_sae", "n_latents", "dict_size")


class LatentInputError(ValueError):
    """The training step's outputs or batch do not hold usable latents and tokens."""


@dataclass(frozen=True)
class InputKeys:
    """Names of the entries the callback reads (defaults: ``CallbackConfig``'s ``*_key`` settings).

    Args:
        latents: Dense latents ``[B, T, F]`` or ``[B*T, F]`` in the training-step outputs.
        latent_indices: Sparse (TopK) active indices ``[B, T, k]`` or ``[B*T, k]``.
        latent_values: Values of those indices, same shape.
        tokens: Token ids ``[B, T]``, in the outputs or else in the batch.
        attention_mask: Attention mask ``[B, T]`` (0/False at padding), in the outputs or else in the batch;
            optional.
        token_refs: Shuffled rows' token refs ``[N]`` (into a token source), read when there are no tokens.
    """

    latents: str
    latent_indices: str
    latent_values: str
    tokens: str
    attention_mask: str
    token_refs: str = "token_refs"

    @classmethod
    def of(cls, settings: CallbackConfig) -> InputKeys:
        """The keys ``settings`` name."""
        return cls(*(getattr(settings, name) for name in settings.input_key_names()))


#: The keys of the default settings, which the plain-loop collector's messages use.
DEFAULT_KEYS = InputKeys.of(CallbackConfig())


@dataclass
class LatentBatch:
    """One step's latents, detached, reshaped to ``[B, T, ...]`` and validated.

    Exactly one of ``dense`` or (``indices``, ``values``) is set. Shuffled rows carry ``token_refs`` ``[N]`` in
    place of ``tokens`` (then empty ``[0, 0]``), with latents ``[N, ...]`` and an optional mask ``[N]``.
    """

    tokens: Tensor
    dense: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    values: Optional[Tensor] = None
    attention_mask: Optional[Tensor] = None
    token_refs: Optional[Tensor] = None
    #: Where dense latents that came as a ``DTensor`` sit among the SAE's (a ``sharding.ShardLayout``).
    shard: Optional[Any] = None

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


def _lookup(outputs: Mapping, batch: Any, key: str) -> Any:
    if key in outputs:
        return outputs[key]
    if isinstance(batch, Mapping) and key in batch:
        return batch[key]
    return None


def _plain(tensor: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``tensor`` detached, in ``dtype``, with ordinary strides: the caller's own tensor when it already is one.

    The collection only reads what it is given, so it works on any view the caller hands over (slices,
    transposes, ``expand``, results of ``topk`` or ``sort``) without writing to it; a copy is made only where the
    strides or the dtype differ.
    """
    return tensor.detach().to(dtype or tensor.dtype).contiguous()


def check_tokens(tokens: Any, key: str) -> Tensor:
    """``tokens`` as detached int64 ids, if it is a ``[batch, seq]`` integer tensor of any integer dtype."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise LatentInputError(f"`{key}` must be a [batch, seq] tensor of token ids, got {shape}.")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise LatentInputError(
            f"`{key}` must hold integer token ids, got dtype {tokens.dtype}. Pass the ids (e.g. `input_ids`),"
            " not embeddings or masks."
        )
    return _plain(tokens, torch.int64)


def find_tokens(outputs: Mapping, batch: Any, key: str) -> Tensor:
    """Token ids from ``outputs[key]``, else ``batch[key]``."""
    tokens = _lookup(outputs, batch, key)
    if tokens is None:
        raise LatentInputError(
            f"No token ids found: expected `{key}` in the training_step outputs (keys: {_keys_of(outputs)})"
            f" or in the batch (keys: {_keys_of(batch)}). Return them as `{key}` or set `tokens_key`."
        )
    return check_tokens(tokens, key)


def check_attention_mask(mask: Any, tokens: Tensor, key: str) -> Optional[Tensor]:
    """``mask`` as a bool tensor shaped like ``tokens`` (True where the token is real), or ``None``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(tokens.shape):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise LatentInputError(
            f"`{key}` has shape {shape} but tokens have shape {tuple(tokens.shape)}: pass one 0/1 (or bool) entry"
            f" per token, 0 at padding, or set `attention_mask_key` to the right entry."
        )
    if mask.is_complex() or (mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all())):
        found = sorted({float(v) for v in mask.detach().flatten()[:1000].tolist()} - {0.0, 1.0})[:3]
        raise LatentInputError(
            f"`{key}` must hold 0/1 (or bool) entries, 0 at padding; got values such as {found} (dtype"
            f" {mask.dtype}). Pass the tokenizer's attention_mask, not an additive (-inf/0) mask."
        )
    return _plain(mask != 0 if mask.dtype != torch.bool else mask)


def read_latents(outputs: Any, batch: Any, keys: InputKeys) -> LatentBatch:
    """Extract and validate one step's latents, tokens and (optional) attention mask.

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
    mask = _lookup(outputs, batch, keys.attention_mask)
    tokens = _lookup(outputs, batch, keys.tokens)
    refs = _lookup(outputs, batch, keys.token_refs) if tokens is None else None
    if refs is not None:
        return check_rows(refs, dense, indices, values, mask, keys)
    if tokens is None:
        raise LatentInputError(
            f"No token ids found: expected `{keys.tokens}` (or shuffled rows' `{keys.token_refs}`) in the"
            f" training_step outputs (keys: {_keys_of(outputs)}) or in the batch (keys: {_keys_of(batch)})."
            f" Return them as `{keys.tokens}` or set `tokens_key` (`token_refs_key`)."
        )
    return check_latents(check_tokens(tokens, keys.tokens), dense, indices, values, mask, keys)


def check_refs(refs: Any, key: str = "token_refs") -> Tensor:
    """``refs`` as a detached int64 ``[N]`` tensor with plain strides, if it is a 1-D integer tensor."""
    if not isinstance(refs, Tensor) or refs.dim() != 1:
        shape = tuple(refs.shape) if isinstance(refs, Tensor) else type(refs).__name__
        raise LatentInputError(f"`{key}` must be a [N] tensor of token refs (one per activation row), got {shape}.")
    if refs.is_floating_point() or refs.is_complex() or refs.dtype == torch.bool:
        raise LatentInputError(
            f"`{key}` must hold integer token refs, got dtype {refs.dtype}. Refs that went through a float tensor"
            " (extra columns of the activations) were cast or scaled with it: keep them beside the activations as"
            " int64 (lightning_sae_samples.RowsWithRefs)."
        )
    return _plain(refs, torch.int64)


def check_rows(
    refs: Any,
    dense: Any = None,
    indices: Any = None,
    values: Any = None,
    attention_mask: Any = None,
    keys: InputKeys = DEFAULT_KEYS,
) -> LatentBatch:
    """Validate shuffled rows: token refs ``[N]``, latents ``[N, F]`` or ``[N, k]``, an optional mask ``[N]``.

    Raises:
        LatentInputError: Naming the entry, the shapes or dtype found, and a fix.
    """
    refs = check_refs(refs, keys.token_refs)
    indices, values = padded_sparse(indices, values, keys)
    # As a [1, N] batch, the rows pass the sequence path's latent checks unchanged.
    as_batch = refs.view(1, -1)
    for name, tensor in ((keys.latents, dense), (keys.latent_indices, indices), (keys.latent_values, values)):
        if isinstance(tensor, Tensor) and (tensor.dim() != 2 or tensor.shape[0] != len(refs)):
            raise LatentInputError(
                f"`{name}` has shape {tuple(tensor.shape)} but `{keys.token_refs}` has {len(refs)} rows: expected"
                f" [{len(refs)}, F] (dense) or [{len(refs)}, k] (sparse), one row per ref."
            )
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 1:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise LatentInputError(
                f"`{keys.attention_mask}` has shape {shape}; with `{keys.token_refs}` it must be [N], 0 where a row is"
                " padding."
            )
        attention_mask = attention_mask.view(1, -1)
    checked = check_latents(as_batch, dense, indices, values, attention_mask, keys)
    return LatentBatch(
        tokens=refs.new_empty((0, 0)),
        dense=None if checked.dense is None else checked.dense[0],
        indices=None if checked.indices is None else checked.indices[0],
        values=None if checked.values is None else checked.values[0],
        attention_mask=None if checked.attention_mask is None else checked.attention_mask[0],
        token_refs=refs,
        shard=checked.shard,
    )


#: The index that pads a token's active latents to a rectangle (its value must be 0), as variable-k SAEs pad.
PAD_INDEX = -1


def padded_sparse(indices: Any, values: Any, keys: InputKeys = DEFAULT_KEYS) -> tuple[Any, Any]:
    """Nested sparse latents (one 1-D component of active latents per token) as ``[N, k_max]`` padded with -1 / 0.

    Anything else is returned as it is, for the shape checks to judge.

    Raises:
        LatentInputError: Only one of the two is nested, a component is not 1-D, or a token's indices and values
            differ in length.
    """
    nested = [isinstance(t, Tensor) and t.is_nested for t in (indices, values)]
    if not any(nested):
        return indices, values
    fix = (
        f"Pass `{keys.latent_indices}` and `{keys.latent_values}` as nested tensors of one 1-D component per token"
        f" (N = B*T components), or padded yourself to [N, k] with index {PAD_INDEX} and value 0."
    )
    if not all(nested):
        which = keys.latent_indices if nested[0] else keys.latent_values
        raise LatentInputError(f"Only `{which}` is a nested tensor. {fix}")
    if indices.dim() != 2 or values.dim() != 2:
        raise LatentInputError(
            f"Nested `{keys.latent_indices}` / `{keys.latent_values}` have {indices.dim() - 1}-D / {values.dim() - 1}-D"
            f" components; each must be 1-D (one token's active latents). {fix}"
        )
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise LatentInputError(
            f"`{keys.latent_indices}` must be an integer tensor of latent indices, got {indices.dtype}."
        )
    if not values.is_floating_point():
        raise LatentInputError(f"`{keys.latent_values}` must be a floating-point tensor.")
    indices, values = indices.detach(), values.detach()
    to_padded = torch.nested.to_padded_tensor
    index_pad = to_padded(indices, PAD_INDEX) != to_padded(indices, PAD_INDEX - 1)
    value_pad = to_padded(values, 0.0) != to_padded(values, 1.0)
    # Two fillings differ exactly at the padding, so the masks match iff every token's two lengths match.
    if index_pad.shape != value_pad.shape or not bool((index_pad == value_pad).all()):
        raise LatentInputError(
            f"Nested `{keys.latent_indices}` and `{keys.latent_values}` differ in a token's number of entries; give"
            " one value per active index."
        )
    return to_padded(indices, PAD_INDEX), to_padded(values, 0.0)


def check_latents(
    tokens: Any,
    dense: Any = None,
    indices: Any = None,
    values: Any = None,
    attention_mask: Any = None,
    keys: InputKeys = DEFAULT_KEYS,
) -> LatentBatch:
    """Validate one batch's tokens, latents (dense, or sparse indices and values) and attention mask.

    Raises:
        LatentInputError: Naming the entry (by its key in ``keys``), the shapes or dtype found, and a fix.
    """
    tokens = check_tokens(tokens, keys.tokens)
    mask = check_attention_mask(attention_mask, tokens, keys.attention_mask)
    if isinstance(dense, Tensor) and dense.is_nested:
        raise LatentInputError(
            f"`{keys.latents}` is a nested tensor; dense latents are [B, T, F] or [B*T, F]. Pass variable-k latents"
            f" as sparse `{keys.latent_indices}` + `{keys.latent_values}` (nested, or padded with index {PAD_INDEX}"
            " and value 0)."
        )
    indices, values = padded_sparse(indices, values, keys)
    if dense is not None:
        if indices is not None or values is not None:
            raise LatentInputError(
                f"Pass either dense `{keys.latents}` or sparse `{keys.latent_indices}` + `{keys.latent_values}`,"
                " not both."
            )
        if not isinstance(dense, Tensor) or not dense.is_floating_point():
            raise LatentInputError(f"`{keys.latents}` must be a floating-point tensor.")
        from lightning_sae_samples.sharding import unwrap_dtensor  # it reads batches: imported here, not above

        dense, shard = unwrap_dtensor(dense, keys.latents)
        return LatentBatch(tokens=tokens, dense=_plain(_as_rows(dense, tokens, keys.latents)), attention_mask=mask,
                           shard=shard)
    if indices is None or values is None:
        raise LatentInputError(
            f"No latents: pass dense `{keys.latents}` [B, T, F], or sparse `{keys.latent_indices}` and"
            f" `{keys.latent_values}` [B, T, k] together."
        )
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
        indices=_plain(_as_rows(indices, tokens, keys.latent_indices), torch.int64),
        values=_plain(_as_rows(values, tokens, keys.latent_values)),
        attention_mask=mask,
    )


def _position(flat: int, seq: int) -> str:
    return f"(batch row {flat // seq}, position {flat % seq})"


def check_distinct_indices(indices: Tensor, real: Tensor, key: str) -> None:
    """Raise if a real token's top-k lists one latent twice (one sort along k, one compare).

    Args:
        indices: Active latent indices ``[B, T, k]``.
        real: ``[B, T]`` bool, the positions that are not padding.
        key: Name of ``indices`` in messages.
    """
    if indices.shape[-1] < 2 or not indices.numel():
        return
    ordered = indices.sort(dim=-1).values
    repeated = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] != PAD_INDEX)).any(dim=-1) & real
    if bool(repeated.any()):
        flat = int(repeated.view(-1).nonzero()[0, 0])
        row = ordered.reshape(-1, ordered.shape[-1])[flat]
        latent = int(row[1:][row[1:] == row[:-1]][0])
        raise LatentInputError(
            f"`{key}` lists latent {latent} more than once for the token at {_position(flat, real.shape[1])}."
            " Each token's active latents must be distinct, as torch.topk returns them."
        )


def check_token_ids(tokens: Tensor, real: Tensor, key: str) -> None:
    """Raise if a real token's id does not fit the stored token dtype (int32)."""
    if tokens.element_size() <= 4 or not tokens.numel():
        return
    too_large = (tokens > TOKEN_ID_MAX) & real
    if bool(too_large.any()):
        flat = int(too_large.view(-1).nonzero()[0, 0])
        value = int(tokens.view(-1)[flat])
        raise LatentInputError(
            f"`{key}` holds token id {value} at {_position(flat, tokens.shape[1])}, above the largest storable id"
            f" {TOKEN_ID_MAX}. Pass token ids from the tokenizer's vocabulary."
        )


def find_num_latents(module: Any) -> Optional[int]:
    """The latent count ``F`` where SAE code keeps it, or ``None``.

    Looks for ``num_latents`` / ``d_sae`` / ``n_latents`` / ``dict_size`` on ``module``, on its ``cfg``, in
    its ``hparams``, then on each direct child module and its ``cfg`` (sparsify keeps ``sae.num_latents``,
    SAELens ``sae.cfg.d_sae``).
    """
    hparams = getattr(module, "hparams", None)
    places = [module, getattr(module, "cfg", None), hparams if isinstance(hparams, Mapping) else None]
    children = module.children() if isinstance(module, torch.nn.Module) else ()
    for child in children:
        places += [child, getattr(child, "cfg", None)]
    for place in places:
        if place is None:
            continue
        for name in NUM_LATENTS_ATTRS:
            value = place.get(name) if isinstance(place, Mapping) else getattr(place, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_indices_in_range(
    indices: Tensor, num_latents: int, key: str, real: Optional[Tensor] = None, values: Optional[Tensor] = None
) -> None:
    """Raise if any sparse index (of a real token, when ``real`` ``[B, T]`` is given) is outside ``[0, F)``.

    With ``values``, an index of ``PAD_INDEX`` whose value is 0 is padding (a variable number of active latents
    padded to a rectangle) and allowed; with another value it is an error.
    """
    outside = (indices < 0) | (indices >= num_latents)
    if values is not None:
        outside &= (indices != PAD_INDEX) | (values != 0)
    if real is not None:
        outside &= real.unsqueeze(-1)
    if indices.numel() and bool(outside.any()):
        low, high = int(indices[outside].min()), int(indices[outside].max())
        if values is not None and low == high == PAD_INDEX:
            value = float(values[outside][0])
            raise LatentInputError(
                f"`{key}` pads with index {PAD_INDEX} an entry whose value is {value}: padding must have value 0"
                f" (set the values of padded entries to 0, or give the entry its latent index)."
            )
        raise LatentInputError(
            f"`{key}` holds indices in [{low}, {high}] but the SAE has {num_latents} latents (valid:"
            f" 0..{num_latents - 1}). Check `num_latents` and that indices index the latent dimension."
        )
