"""Latents as SAE modules return them, and forward hooks that catch them without a change to the training step.

:func:`latents_of` reads what an SAE's ``forward`` (or the value handed over for it) returns: a dense tensor, a
``(indices, values)`` pair, sparsify's ``ForwardOutput`` (``latent_acts``, ``latent_indices``) or
``EncoderOutput`` (``top_acts``, ``top_indices``), or a mapping with ``latents`` or ``latent_indices`` +
``latent_values``. SAELens' latents are the output of the SAE's ``hook_sae_acts_post`` module (what ``encode``
returns). :class:`LatentCapture` holds forward hooks on named modules only while it is open.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

from torch import Tensor, nn

from lightning_sae_samples.inputs import LatentInputError


class FoundLatents(NamedTuple):
    """One SAE's latents: ``dense`` or (``indices``, ``values``); unchecked (see ``inputs.check_latents``)."""

    dense: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    values: Optional[Tensor] = None


_SPARSE_ATTRS = (("latent_indices", "latent_acts"), ("top_indices", "top_acts"))
_FORMS = (
    "a dense tensor [..., F], an (indices, values) pair, a mapping with `latents` or `latent_indices` +"
    " `latent_values`, sparsify's ForwardOutput (`latent_indices`, `latent_acts`) or EncoderOutput"
)


def latents_of(value: Any, name: str) -> FoundLatents:
    """The latents in ``value``, what SAE ``name`` returned.

    Raises:
        LatentInputError: ``value`` holds none of the forms above; the message names the SAE and the forms.
    """
    if isinstance(value, Tensor):
        return FoundLatents(dense=value)
    if isinstance(value, Mapping):
        if value.get("latents") is not None:
            return FoundLatents(dense=value["latents"])
        if value.get("latent_indices") is not None:
            return FoundLatents(indices=value["latent_indices"], values=value.get("latent_values"))
    for indices_attr, values_attr in _SPARSE_ATTRS:
        indices, values = getattr(value, indices_attr, None), getattr(value, values_attr, None)
        if isinstance(indices, Tensor) and isinstance(values, Tensor):
            return FoundLatents(indices=indices, values=values)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, Tensor) for v in value):
        first, second = value
        # Whichever order: the integer tensor holds the indices.
        if second.is_floating_point() and not first.is_floating_point():
            return FoundLatents(indices=first, values=second)
        if first.is_floating_point() and not second.is_floating_point():
            return FoundLatents(indices=second, values=first)
    raise LatentInputError(
        f"SAE {name!r} gave {type(value).__name__}, which holds no latents: expected {_FORMS}."
    )


def find_module(root: nn.Module, pattern: str, name: str) -> nn.Module:
    """The one submodule of ``root`` whose name (as ``named_modules`` gives it) matches ``pattern`` (fnmatch).

    Raises:
        ValueError: No module, or more than one, matches; the message lists some names.
    """
    found = [(path, module) for path, module in root.named_modules() if path and fnmatch.fnmatchcase(path, pattern)]
    if len(found) == 1:
        return found[0][1]
    names = [path for path, _ in root.named_modules() if path]
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    if not found:
        raise ValueError(
            f"SAE {name!r}: no module of {type(root).__name__} is named {pattern!r} (its modules: {shown}). Give the"
            " SAE's module name as `module`."
        )
    raise ValueError(
        f"SAE {name!r}: {len(found)} modules match {pattern!r} ({', '.join(p for p, _ in found[:6])}); give a"
        " pattern that matches one module per SAE."
    )


def match_modules(root: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The submodules of ``root`` whose names match ``pattern`` (fnmatch), by name, in ``named_modules`` order.

    A match inside another match is left out: ``*`` also matches dots, so ``saes.*`` matches ``saes.l3`` and its
    own ``saes.l3.encoder``, and only the SAE ``saes.l3`` is meant.

    Raises:
        ValueError: None matches.
    """
    found: dict[str, nn.Module] = {}
    for path, module in root.named_modules():
        inside = any(path.startswith(outer + ".") for outer in found)
        if path and not inside and fnmatch.fnmatchcase(path, pattern):
            found[path] = module
    if not found:
        names = [path for path, _ in root.named_modules() if path]
        raise ValueError(
            f"No module of {type(root).__name__} matches `modules={pattern!r}` (its modules:"
            f" {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})."
        )
    return found


class LatentCapture:
    """Forward hooks on named SAE modules that keep what each returns, while open (``with capture:``).

    Opened only around the collected steps, the hooks cost nothing on the others. Each module's outputs of
    one batch are kept detached; a module called more than once in a batch is refused (which call would count?).

    Args:
        modules: SAE name -> module whose ``forward`` returns its latents (see :func:`latents_of`).
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.outputs: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}

    @property
    def is_open(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def open(self, names: Optional[Any] = None) -> None:
        """Register the hooks (of ``names`` only, when given) and forget earlier outputs."""
        self.close()
        self.outputs, self._calls = {}, {}
        for name, module in self.modules.items():
            if names is None or name in names:
                self._handles.append(module.register_forward_hook(self._keeper(name)))

    def close(self) -> None:
        """Remove the hooks (the outputs stay until the next :meth:`open` or :meth:`take`)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def take(self) -> dict[str, Any]:
        """The outputs kept since the last ``take`` (or ``open``), which are then forgotten.

        Raises:
            LatentInputError: A module ran more than once since then.
        """
        repeated = {name: n for name, n in self._calls.items() if n > 1}
        outputs, self.outputs, self._calls = self.outputs, {}, {}
        if repeated:
            name, count = next(iter(repeated.items()))
            raise LatentInputError(
                f"SAE {name!r}'s module ran {count} times in one batch; its hook keeps one output per batch. Call"
                " each SAE once per training batch, or return its latents in the training_step outputs."
            )
        return outputs

    def _keeper(self, name: str) -> Any:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self._calls[name] = self._calls.get(name, 0) + 1
            self.outputs[name] = _detached(output)

        return keep

    def __enter__(self) -> LatentCapture:
        if not self.is_open:
            self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _detached(value: Any) -> Any:
    """``value`` with its tensors detached (the collection never holds the autograd graph)."""
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(_detached(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value  # e.g. sparsify's ForwardOutput, read by attribute; its tensors are detached when checked
