"""Argument checks shared by the callback, the collector and the commands: each error names the argument and a fix."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from typing import Any, NoReturn, Optional

TOKEN_ID_MAX = 2**31 - 1


def positive_int(value: Any, name: str, fix: str, minimum: int = 1) -> int:
    """``value`` if it is an integer ``>= minimum`` (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}. {fix}")
    return value


def optional_positive_int(value: Any, name: str, fix: str) -> Optional[int]:
    """``None``, or a positive integer (see :func:`positive_int`)."""
    return None if value is None else positive_int(value, name, fix)


def finite_float(value: Any, name: str, fix: str) -> float:
    """``value`` as a float if it is a finite real number (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}. {fix}")
    return float(value)


def integer(value: Any, name: str) -> int:
    """``value`` if it is an integer (not a bool), else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    return value


def choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a ``ValueError`` naming ``name`` and the choices."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")
    return value


def token_ids(value: Any, name: str) -> tuple[int, ...]:
    """A sequence of non-negative integer token ids as a sorted tuple without repeats."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"`{name}` must be a sequence of integer token ids, e.g. (0, 1), got {value!r}.")
    ids = []
    for item in value:
        if hasattr(item, "item") and callable(item.item):  # a tensor or numpy scalar
            item = item.item()
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= TOKEN_ID_MAX:
            raise ValueError(
                f"`{name}` must hold integer token ids in [0, {TOKEN_ID_MAX}], got {item!r}. Pass e.g."
                " `tokenizer.all_special_ids` or `(tokenizer.bos_token_id,)`."
            )
        ids.append(item)
    return tuple(sorted(set(ids)))


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line that points to ``--help`` (not the whole usage block)."""

    def error(self, message: str) -> NoReturn:
        """Exit with status 2 and ``PROG: error: MESSAGE. See PROG --help.`` on stderr."""
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')}. See `{self.prog} --help`.\n")
