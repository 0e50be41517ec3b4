"""Token ids to display text: each distinct token is decoded once per save."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, Optional, Union

_ONLINE = ("0", "false", "off", "no")


def check_tokenizer(tokenizer: Any) -> None:
    """Check a tokenizer argument without loading anything.

    Raises:
        TypeError: It is not ``None``, a name or path, or an object with ``convert_ids_to_tokens`` or ``decode``.
    """
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        return
    if not (hasattr(tokenizer, "convert_ids_to_tokens") or hasattr(tokenizer, "decode")):
        raise TypeError(
            f"`tokenizer` must have `convert_ids_to_tokens` or `decode`; got {type(tokenizer).__name__}."
            " Pass a Hugging Face tokenizer, its name or path, or None to show token ids."
        )


def load_tokenizer(tokenizer: Union[str, os.PathLike, Any, None]) -> Any:
    """Return a tokenizer object, loading a Hugging Face name or path with ``AutoTokenizer``.

    A name is looked up locally first (a path, or the Hugging Face cache); it is downloaded only when
    ``HF_HUB_OFFLINE=0`` is set, so a missing name fails at once instead of retrying without a network.

    Raises:
        ImportError: A name was given but ``transformers`` is not installed.
        OSError: The name or path cannot be loaded; the message says how to fix it.
        TypeError: The object has neither ``convert_ids_to_tokens`` nor ``decode``.
    """
    check_tokenizer(tokenizer)
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    name = os.fspath(tokenizer)
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ImportError(
            f"`tokenizer={name!r}` is a name or path, and loading it needs `transformers`:"
            " run `pip install transformers`, or pass a tokenizer object."
        ) from err
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as err:
        if os.path.exists(name):
            raise OSError(f"Cannot load the tokenizer at local path {name!r}: {err}") from err
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _ONLINE:
            raise OSError(
                f"Tokenizer {name!r} was not found locally (no such path, not in the Hugging Face cache). Set"
                " HF_HUB_OFFLINE=0 with network access to download it, or pass a local path or a tokenizer object."
            ) from err
    return AutoTokenizer.from_pretrained(name)


def describe_tokenizer(tokenizer: Union[str, os.PathLike, Any, None]) -> Optional[str]:
    """A short JSON-friendly description of a tokenizer: its name or local path where known, else its class."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        return os.fspath(tokenizer)
    name = getattr(tokenizer, "name_or_path", None)
    if isinstance(name, (str, os.PathLike)) and os.fspath(name):
        return os.fspath(name)
    return type(tokenizer).__name__


class TokenDecoder:
    """Turns token ids into display strings and context text for one save.

    Args:
        tokenizer: Anything with ``decode`` and/or ``convert_ids_to_tokens``; ``None`` shows ids.
    """

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._strings: dict[int, str] = {}
        self._raw: dict[int, str] = {}

    def prepare(self, token_ids: Iterable[int]) -> None:
        """Decode every id not seen yet, once each, in one call to the tokenizer where possible."""
        new = sorted({int(i) for i in token_ids} - self._strings.keys())
        if not new:
            return
        tok = self.tokenizer
        if tok is None:
            for i in new:
                self._strings[i] = self._raw[i] = str(i)
            return
        raw = tok.convert_ids_to_tokens(new) if hasattr(tok, "convert_ids_to_tokens") else None
        wordpiece = self._is_wordpiece()
        for n, i in enumerate(new):
            text = tok.decode([i]) if hasattr(tok, "decode") else None
            piece = raw[n] if raw is not None else None
            self._raw[i] = str(piece if piece is not None else text)
            display = str(text if text not in (None, "") else self._raw[i])
            if wordpiece:
                # WordPiece marks continuations with "##" instead of marking word starts with a space (as
                # byte-level BPE does): give word starts a space so joined display strings read as text.
                display = display[2:] if self._raw[i].startswith("##") and display.startswith("##") else " " + display
            self._strings[i] = display

    def _is_wordpiece(self) -> bool:
        join = getattr(self.tokenizer, "convert_tokens_to_string", None)
        if join is None:
            return False
        try:
            return join(["a", "##b"]) == "ab"
        except Exception:  # noqa: BLE001 - a tokenizer that cannot join these is not WordPiece
            return False

    def token_str(self, token_id: int) -> str:
        """Display string of one token (after :meth:`prepare`)."""
        return self._strings[int(token_id)]

    def context_text(self, token_ids: list[int]) -> str:
        """Readable text of a context window (after :meth:`prepare`)."""
        tok = self.tokenizer
        if tok is None:
            return " ".join(self._strings[i] for i in token_ids)
        if hasattr(tok, "convert_tokens_to_string") and hasattr(tok, "convert_ids_to_tokens"):
            return str(tok.convert_tokens_to_string([self._raw[i] for i in token_ids]))
        return "".join(self._strings[i] for i in token_ids)
