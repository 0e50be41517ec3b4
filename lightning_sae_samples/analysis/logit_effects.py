"""Logit effects of SAE latents: the tokens each decoder direction promotes and suppresses most.

For latent ``j`` the direct effect of its decoder direction on the next-token logits is
``W_dec[j] @ W_U`` (``W_dec`` ``[F, d_model]``, the language model's unembedding ``W_U``
``[d_model, vocab]``). Its ``k`` largest entries are the tokens the latent promotes, its ``k`` smallest
the tokens it suppresses, as SAE dashboards show them. The computation is one matrix product per
chunk of latents (chunked so a chunk's logits stay below ~256 MiB) on ``W_U``'s device, and every
distinct token id is decoded once.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from lightning_sae_samples.analysis.records import LogitEffects, TokenEffect
from lightning_sae_samples.tokens import TokenDecoder

CHUNK_ELEMENTS = 1 << 26


LogitEffectsFn = Callable[[Any], "tuple[Tensor, Tensor]"]


def check_matrices(w_dec: Any, w_u: Any, num_latents: Optional[int] = None) -> None:
    """Check the shapes of ``W_dec`` ``[F, d_model]`` and ``W_U`` ``[d_model, vocab]``.

    Raises:
        TypeError: One of them is not a floating-point tensor.
        ValueError: The shapes do not fit; the message says which transpose fixes it.
    """
    for name, matrix in (("W_dec", w_dec), ("W_U", w_u)):
        if not isinstance(matrix, Tensor) or matrix.dim() != 2 or not matrix.is_floating_point():
            got = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise TypeError(f"`{name}` must be a 2-D floating-point tensor, got {got}.")
    if num_latents is not None and w_dec.shape[0] != num_latents:
        hint = " It looks transposed: pass `W_dec.T`." if w_dec.shape[1] == num_latents else ""
        raise ValueError(
            f"`W_dec` must be [F, d_model] with F={num_latents} latents, got {tuple(w_dec.shape)}.{hint}"
        )
    if w_dec.shape[1] != w_u.shape[0]:
        hint = ""
        if w_u.shape[1] == w_dec.shape[1]:
            hint = " `W_U` looks like `lm_head.weight` [vocab, d_model]: pass `lm_head.weight.T`."
        elif w_dec.shape[0] == w_u.shape[0]:
            hint = " `W_dec` looks transposed: pass `W_dec.T`."
        raise ValueError(
            f"`W_dec` [F, d_model] and `W_U` [d_model, vocab] must share d_model; got W_dec"
            f" {tuple(w_dec.shape)} and W_U {tuple(w_u.shape)}.{hint}"
        )


@torch.no_grad()
def top_logit_effects(
    w_dec: Tensor, w_u: Tensor, features: Sequence[int], k: int = 10, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-``k`` and bottom-``k`` entries of ``W_dec[features] @ W_U``, chunked over features.

    Computed on ``W_U``'s device in the promoted dtype of both matrices.

    Args:
        w_dec: Decoder ``[F, d_model]``.
        w_u: Unembedding ``[d_model, vocab]``.
        features: Latent indices.
        k: Tokens per side (at most ``vocab``).
        chunk_elements: Most logits computed at once.

    Returns:
        ``(promoted_values, promoted_ids, suppressed_values, suppressed_ids)``, each ``[len(features), k]``
        on the CPU; values are float32, promoted descending and suppressed ascending.
    """
    check_matrices(w_dec, w_u)
    k = min(int(k), w_u.shape[1])
    dtype = torch.promote_types(w_dec.dtype, w_u.dtype)
    w_u = w_u.detach().to(dtype=dtype)
    index = torch.as_tensor(list(features), dtype=torch.long, device=w_dec.device)
    rows = w_dec.detach()[index]
    chunk = max(1, chunk_elements // max(1, w_u.shape[1]))
    outputs: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, len(index), chunk):
        logits = rows[start : start + chunk].to(device=w_u.device, dtype=dtype) @ w_u
        top = torch.topk(logits, k, dim=1, largest=True, sorted=True)
        bottom = torch.topk(logits, k, dim=1, largest=False, sorted=True)
        for out, part in zip(outputs, (top.values, top.indices, bottom.values, bottom.indices)):
            out.append(part.cpu())
    if not outputs[0]:
        empty_values, empty_ids = torch.zeros((0, k)), torch.zeros((0, k), dtype=torch.long)
        return empty_values, empty_ids, empty_values, empty_ids
    values_top, ids_top, values_bottom, ids_bottom = (torch.cat(parts) for parts in outputs)
    return values_top.float(), ids_top, values_bottom.float(), ids_bottom


def compute_logit_effects(
    w_dec: Tensor,
    w_u: Tensor,
    features: Sequence[int],
    k: int = 10,
    tokenizer: Any = None,
    decoder: Any = None,
) -> dict[int, LogitEffects]:
    """Logit effects of ``features``, with each distinct token decoded once.

    Args:
        w_dec: Decoder ``[F, d_model]``.
        w_u: Unembedding ``[d_model, vocab]``.
        features: Latent indices.
        k: Tokens per side.
        tokenizer: Tokenizer for the token strings (``None``: token ids as strings).
        decoder: An object with ``prepare(ids)`` and ``token_str(id)`` used instead of ``tokenizer``.

    Returns:
        Latent index to its :class:`LogitEffects`, in the order of ``features``.

    Raises:
        ValueError: ``k`` is not a positive integer, or a shape or index does not fit.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}. It is how many tokens to show per side.")
    features = [int(f) for f in features]
    check_matrices(w_dec, w_u)
    bad = [f for f in features if not 0 <= f < w_dec.shape[0]]
    if bad:
        raise ValueError(f"Feature indices {bad[:5]} are outside W_dec's {w_dec.shape[0]} rows.")
    values_top, ids_top, values_bottom, ids_bottom = top_logit_effects(w_dec, w_u, features, k)
    decoder = decoder if decoder is not None else TokenDecoder(tokenizer)
    decoder.prepare(torch.cat([ids_top.reshape(-1), ids_bottom.reshape(-1)]).unique().tolist())

    def effects(ids: list[int], values: list[float]) -> tuple[TokenEffect, ...]:
        return tuple(TokenEffect(i, decoder.token_str(i), v) for i, v in zip(ids, values))

    lists = (values_top.tolist(), ids_top.tolist(), values_bottom.tolist(), ids_bottom.tolist())
    return {
        f: LogitEffects(f, effects(lists[1][n], lists[0][n]), effects(lists[3][n], lists[2][n]))
        for n, f in enumerate(features)
    }


def resolve_logit_effects_fn(spec: Union[str, Callable, None]) -> Optional[Callable]:
    """Resolve ``"package.module:function"`` (or ``"package.module.function"``) to the function.

    Args:
        spec: A callable (returned as is), an import path, or ``None``.

    Raises:
        ValueError: The path cannot be imported or does not name a callable.
    """
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"`logit_effects` must be a callable or an import path such as 'my_pkg.sae:logit_matrices',"
            f" got {spec!r}."
        )
    module_name, sep, attr = spec.strip().partition(":")
    if not sep:
        module_name, _, attr = module_name.rpartition(".")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"`logit_effects`={spec!r} cannot be resolved ({type(err).__name__}: {err}). Give"
            " 'package.module:function' for a function taking the LightningModule and returning (W_dec, W_U)."
        ) from err
    if not callable(target):
        raise ValueError(f"`logit_effects`={spec!r} names a {type(target).__name__}, not a function.")
    return target


def module_matrices(fn: Optional[Callable], pl_module: Any, num_latents: int) -> Optional[tuple[Tensor, Tensor]]:
    """``(W_dec, W_U)`` from the callback's ``logit_effects`` function, checked; ``None`` without one or on failure.

    A failure is reported with ``rank_zero_warn``: a save goes on without logit effects and neighbours (a report
    must never stop training).
    """
    if fn is None:
        return None
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    try:
        matrices = fn(pl_module)
        if not (isinstance(matrices, (tuple, list)) and len(matrices) == 2):
            raise TypeError(f"it must return a pair (W_dec, W_U), got {type(matrices).__name__}")
        w_dec, w_u = matrices
        check_matrices(w_dec, w_u, int(num_latents))
    except Exception as err:  # noqa: BLE001 - a report must never stop training
        rank_zero_warn(
            f"ActivationSampleCallback could not compute logit effects with `logit_effects` (nor save the decoder for"
            f" neighbours): {err}"
        )
        return None
    return w_dec, w_u


def logit_effect_extras(
    matrices: Optional[tuple[Tensor, Tensor]],
    state: dict,
    rank_by: str,
    top_features: int,
    k: int,
    tokenizer: Any,
) -> Optional[dict[int, dict]]:
    """The ``logit_effects`` entries of the features a save writes, for ``write_samples_dir(feature_extras=)``.

    A failure is reported with ``rank_zero_warn`` and the save goes on without logit effects.

    Args:
        matrices: ``(W_dec, W_U)`` from :func:`module_matrices`, or ``None`` (then nothing is computed).
        state: The merged collector state being saved.
        rank_by: The ranking choosing the saved features.
        top_features: How many features the save writes.
        k: Tokens per side.
        tokenizer: Tokenizer for the token strings.

    Returns:
        Feature index to ``{"logit_effects": {...}}``, or ``None``.
    """
    if matrices is None or top_features == 0:
        return None
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    from lightning_sae_samples.state.statistics import rank_features

    features = rank_features(state, rank_by, top_features).tolist()
    if not features:
        return None
    try:
        effects = compute_logit_effects(matrices[0], matrices[1], features, k, tokenizer)
    except Exception as err:  # noqa: BLE001 - a report must never stop training
        rank_zero_warn(f"ActivationSampleCallback could not compute logit effects with `logit_effects`: {err}")
        return None
    return {idx: {"logit_effects": e.to_json()} for idx, e in effects.items()}
