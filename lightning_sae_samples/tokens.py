"""Token ids to display text: each distinct token is decoded once per save."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional, Union


def load_tokenizer(tokenizer: Union[str, Any, None]) -> Any:
    """Return a tokenizer object, loading a Hugging Face name or path with ``AutoTokenizer``.

    Raises:
        ImportError: A name was given but ``transformers`` is not installed.
        TypeError: The object has neither ``convert_ids_to_tokens`` nor ``decode``.
    """
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str):
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError(
                f"`tokenizer={tokenizer!r}` is a name or path, and loading it needs `transformers`:"
                " run `pip install transformers`, or pass a tokenizer object."
            ) from err
        return AutoTokenizer.from_pretrained(tokenizer)
    if not (hasattr(tokenizer, "convert_ids_to_tokens") or hasattr(tokenizer, "decode")):
        raise TypeError(
            f"`tokenizer` must have `convert_ids_to_tokens` or `decode`; got {type(tokenizer).__name__}."
            " Pass a Hugging Face tokenizer, its name or path, or None to show token ids."
        )
    return tokenizer


def describe_tokenizer(tokenizer: Union[str, Any, None]) -> Optional[str]:
    """A short JSON-friendly description of a tokenizer argument."""
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


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
