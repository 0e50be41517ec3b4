"""Old import paths of 0.1 that keep working for one release, with a ``DeprecationWarning`` naming the new one."""

from __future__ import annotations

import warnings
from importlib import import_module
from typing import Any, Callable


def forwarder(old: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that finds each name in ``homes`` (name -> new module) and warns."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"`{old}.{name}` moved to `{homes[name]}.{name}`; the old path goes away in the next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(import_module(homes[name]), name)

    return __getattr__


def homes_of(*modules: str) -> dict[str, str]:
    """Every public name of ``modules`` -> the module that defines it (the first one wins)."""
    homes: dict[str, str] = {}
    for module in modules:
        for name, value in vars(import_module(module)).items():
            if not name.startswith("_") and getattr(value, "__module__", module) == module:
                homes.setdefault(name, module)
            elif not name.startswith("_") and name.isupper():
                homes.setdefault(name, module)
    return homes
