"""``decoder_directions.pt``: the SAE's decoder rows, unit length, in a compact dtype, for a latent's neighbours.

The file is written by a save (through the commit protocol, like ``full_state.pt``) and holds
``{"format_version": 1, "directions": Tensor[F, d_model], "global_step": int}``. Rows are divided by their norm
(a zero row stays zero) and stored as ``bfloat16`` by default: half the bytes of ``float32`` (what one latent's
neighbour search reads), a cosine error below 4e-3 (2**-8), below the gaps between neighbours a reader compares,
and the dtype CPUs with AVX-512 BF16 or AMX multiply fastest. Older files in ``float16`` still load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_sae_samples.samples_dir.names import PathLike, SamplesDirectoryError

DECODER_FORMAT_VERSION = 1
#: Dtypes a decoder file may hold.
DECODER_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DEFAULT_DECODER_DTYPE = torch.bfloat16
_CHECK_ROWS = 1 << 16  # rows checked at once when a file is validated (bounds the float32 temporaries)


def unit_directions(w_dec: Any, num_latents: int, dtype: torch.dtype = DEFAULT_DECODER_DTYPE) -> Tensor:
    """``W_dec`` ``[F, d_model]`` as unit rows on the CPU in ``dtype``, normalized in float32 a chunk at a time.

    Raises:
        ValueError: It is not a finite 2-D floating-point tensor with ``num_latents`` rows; the message says what
            to pass.
    """
    if not isinstance(w_dec, Tensor) or w_dec.dim() != 2 or not w_dec.is_floating_point():
        got = tuple(w_dec.shape) if isinstance(w_dec, Tensor) else type(w_dec).__name__
        raise ValueError(f"The decoder must be a 2-D floating-point tensor [F, d_model], got {got}.")
    if w_dec.shape[0] != num_latents:
        hint = " It looks transposed: pass `W_dec.T`." if w_dec.shape[1] == num_latents else ""
        raise ValueError(f"The decoder must be [F, d_model] with F={num_latents} latents, got"
                         f" {tuple(w_dec.shape)}.{hint}")
    if dtype not in DECODER_DTYPES:
        raise ValueError(f"The decoder dtype must be one of {DECODER_DTYPES}, got {dtype}.")
    w_dec = w_dec.detach()
    out = torch.empty(w_dec.shape, dtype=dtype)
    for start in range(0, w_dec.shape[0], _CHECK_ROWS):
        rows = w_dec[start : start + _CHECK_ROWS].float()
        if not torch.isfinite(rows).all():
            raise ValueError("The decoder holds NaN or infinite values; its directions cannot be saved.")
        norms = rows.norm(dim=1, keepdim=True)
        out[start : start + len(rows)] = (rows / norms.clamp(min=1e-12)).cpu().to(dtype)
    return out


def decoder_payload(directions: Tensor, global_step: int) -> dict:
    """What :func:`~lightning_sae_samples.samples_dir.atomic.atomic_torch_save` writes as the decoder file."""
    return {"format_version": DECODER_FORMAT_VERSION, "directions": directions.contiguous(),
            "global_step": torch.tensor(int(global_step))}


def load_decoder_directions(path: PathLike, num_latents: int) -> Tensor:
    """The unit decoder rows of a decoder file, validated, memory-mapped (tensors only, no pickle).

    Raises:
        SamplesDirectoryError: The file is unreadable, of another format version, or its ``directions`` are not
            a finite ``[num_latents, d]`` tensor of unit (or zero) rows in one of :data:`DECODER_DTYPES`.
    """
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise SamplesDirectoryError(f"Cannot load {path}: {err}. The file is corrupt or unreadable.") from err
    if not isinstance(payload, dict) or payload.get("format_version") != DECODER_FORMAT_VERSION:
        got = payload.get("format_version") if isinstance(payload, dict) else type(payload).__name__
        raise SamplesDirectoryError(f"{path}: field `format_version` must be {DECODER_FORMAT_VERSION}, got {got!r}.")
    directions = payload.get("directions")
    if not isinstance(directions, Tensor) or directions.dim() != 2 or directions.shape[0] != num_latents:
        got = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions).__name__
        raise SamplesDirectoryError(
            f"{path}: field `directions` must be a [{num_latents}, d_model] tensor (one row per latent), got {got}."
        )
    if directions.dtype not in DECODER_DTYPES:
        raise SamplesDirectoryError(f"{path}: field `directions` has dtype {directions.dtype}; expected one of"
                                    f" {', '.join(str(d) for d in DECODER_DTYPES)}.")
    for start in range(0, num_latents, _CHECK_ROWS):
        rows = directions[start : start + _CHECK_ROWS].float()
        if not torch.isfinite(rows).all():
            raise SamplesDirectoryError(f"{path}: field `directions` holds NaN or infinite values.")
        norms = rows.norm(dim=1)
        if not ((norms - 1).abs().le(1e-2) | norms.eq(0)).all():
            raise SamplesDirectoryError(f"{path}: field `directions` must hold unit rows (or zero rows).")
    return directions
