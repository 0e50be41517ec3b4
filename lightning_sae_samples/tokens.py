"""Token ids to display text: each distinct token is decoded once per save."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Optional, Union
from urllib.parse import urlparse

#: How a token id that no tokenizer could decode is shown: ``[12575]``.
UNDECODED_FORMAT = "[{}]"
_UNDECODED = re.compile(r"\[\d+\]")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: What a lone surrogate in a tokenizer's text becomes (U+FFFD, the replacement character).
REPLACEMENT_CHARACTER = "\ufffd"
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class TokenizerNotAvailableError(OSError):
    """A tokenizer name or path that cannot be loaded here (not cached locally, and the Hub is out of reach)."""


def undecoded(token_id: int) -> str:
    """Display string of a token id that could not be decoded: ``[12575]``."""
    return UNDECODED_FORMAT.format(int(token_id))


def is_undecoded(text: str) -> bool:
    """Whether a display string is an undecoded token id (``[12575]``)."""
    return _UNDECODED.fullmatch(text) is not None


def without_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (U+D800 to U+DFFF) replaced by U+FFFD.

    ``bytes.decode("utf-8", "surrogateescape")`` gives such characters (U+DCFF for the byte 0xFF); UTF-8
    cannot encode them, so they would make every JSON file of a save unwritable.
    """
    return _SURROGATE.sub(REPLACEMENT_CHARACTER, text)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` asks Hugging Face libraries not to use the network."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in _OFFLINE_VARIABLES)


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


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


def load_tokenizer(tokenizer: Union[str, os.PathLike, Any, None], local_only: bool = False) -> Any:
    """Return a tokenizer object, loading a Hugging Face name or path with ``AutoTokenizer``.

    A name is looked up in the local cache first (``local_files_only=True``), so a cached tokenizer loads
    without the network. Only when it is not cached, ``local_only`` is false, ``HF_HUB_OFFLINE`` is not set
    and the Hub answers is it downloaded; otherwise it fails at once instead of retrying for a minute.

    Args:
        tokenizer: A tokenizer object (returned as is), a Hugging Face name or local path, or ``None``.
        local_only: Never use the network.

    Raises:
        ImportError: A name was given but ``transformers`` is not installed.
        TokenizerNotAvailableError: The name is neither a local path nor cached, and cannot be downloaded.
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
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, ... for a missing one
        local_error = err
    if os.path.exists(name):
        raise TokenizerNotAvailableError(f"Cannot load the tokenizer at local path {name!r}: {local_error}")
    why = (
        "the network is off (HF_HUB_OFFLINE)" if hub_offline()
        else "only local files are used here" if local_only
        else None if _hub_reachable()
        else "the Hugging Face Hub cannot be reached"
    )
    if why is not None:
        raise TokenizerNotAvailableError(
            f"Tokenizer {name!r} was not found locally (no such folder, not in the Hugging Face cache), and {why}"
            f" ({type(local_error).__name__}: {' '.join(str(local_error).split())[:200]})."
            " Pass the path of a folder holding the tokenizer files or a tokenizer object, or download it once"
            " where the Hub is reachable (HF_HUB_OFFLINE=0 with network access)."
        ) from local_error
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


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 byte values (as GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[chr(byte)] = byte
        else:
            stand_ins[chr(256 + extra)] = byte
            extra += 1
    return stand_ins


def byte_fallback_display(piece: str) -> Optional[str]:
    """Display string of a token that decodes to an incomplete UTF-8 sequence (``"\ufffd"``).

    SentencePiece and GGUF byte tokens (``<0xE8>``) are kept as they are; a byte-level BPE piece (GPT-2's
    ``Ã¨`` alphabet) shows its text with the bytes that are not valid UTF-8 as ``<0xE8>``. ``None`` when the
    piece is neither.
    """
    if _BYTE_TOKEN.fullmatch(piece):
        return piece.upper().replace("0X", "0x")
    alphabet = _byte_level_alphabet()
    if not piece or any(c not in alphabet for c in piece):
        return None
    return _bytes_display(bytes(alphabet[c] for c in piece))


def _bytes_display(data: bytes) -> str:
    """UTF-8 text of ``data``, each byte that is not part of a valid character shown as ``<0xE8>``."""
    out, start = [], 0
    while start < len(data):
        try:
            out.append(data[start:].decode("utf-8"))
            break
        except UnicodeDecodeError as err:
            out.append(data[start : start + err.start].decode("utf-8"))
            bad = start + err.start
            out.append(f"<0x{data[bad]:02X}>")
            start = bad + 1
    return "".join(out)


class TokenDecoder:
    """Turns token ids into display strings and context text for one save.

    A token that decodes to an incomplete character (``"\ufffd"``: a byte-fallback token) shows as its
    byte (``<0xE8>``, see :func:`byte_fallback_display`), so distinct bytes stay distinct. Lone surrogates in
    what the tokenizer returns become U+FFFD (:func:`without_surrogates`), in display strings and context text.

    Args:
        tokenizer: Anything with ``decode`` and/or ``convert_ids_to_tokens``; ``None`` shows ids as ``[12575]``.
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
                self._strings[i] = self._raw[i] = undecoded(i)
            return
        raw = tok.convert_ids_to_tokens(new) if hasattr(tok, "convert_ids_to_tokens") else None
        wordpiece = self._is_wordpiece()
        for n, i in enumerate(new):
            text = tok.decode([i]) if hasattr(tok, "decode") else None
            piece = raw[n] if raw is not None else None
            self._raw[i] = str(piece if piece is not None else text)
            display = without_surrogates(str(text if text not in (None, "") else self._raw[i]))
            if "\ufffd" in display and piece is not None:
                display = byte_fallback_display(str(piece)) or display
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
            return without_surrogates(str(tok.convert_tokens_to_string([self._raw[i] for i in token_ids])))
        return "".join(self._strings[i] for i in token_ids)
