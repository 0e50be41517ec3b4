r"""Every rule for showing untrusted token text, in one place.

Token strings come from a tokenizer and the training data: they may hold HTML, Markdown syntax,
control characters or only whitespace. Each renderer takes token text through these functions and
through nothing else:

* :func:`visible` makes whitespace-only tokens, line breaks, tabs and control characters visible
  (console, Markdown and HTML all use it);
* :func:`markdown_text` makes a string inert in Markdown: HTML characters become entities, every
  other ASCII punctuation character is backslash-escaped (so ``|`` becomes ``\|`` and cannot split
  a table row) and no line break survives;
* HTML relies on Jinja autoescaping of the :func:`visible` string (see ``render/templates.py``).
"""

from __future__ import annotations

import string
import unicodedata

SPACE_MARK = "·"
NEWLINE_MARK = "⏎"
TAB_MARK = "→"
CARRIAGE_RETURN_MARK = "␍"
EMPTY_MARK = "∅"

_ALWAYS_VISIBLE = {"\n": NEWLINE_MARK, "\t": TAB_MARK, "\r": CARRIAGE_RETURN_MARK}
_HTML_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}
_MARKDOWN_PUNCTUATION = frozenset(string.punctuation) - _HTML_ENTITIES.keys()
# Characters that reorder or hide text (Trojan-source style) are shown as code points.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _show_char(char: str) -> str:
    if char in _ALWAYS_VISIBLE:
        return _ALWAYS_VISIBLE[char]
    if unicodedata.category(char) in _HIDDEN_CATEGORIES:
        return f"\\u{ord(char):04x}"
    return char


def visible(token: str) -> str:
    r"""Display form of one token's text.

    Line breaks, tabs and control or format characters are always replaced (``⏎``, ``→``, ``␍``,
    ``\uXXXX``). Spaces are kept inside a token that has other text, but a token made only of
    spaces shows each as ``·`` so that it can be seen; an empty token shows as ``∅``.

    Args:
        token: Raw token text.

    Returns:
        A single-line string with at least one visible character.
    """
    if token == "":
        return EMPTY_MARK
    if token.strip(" ") == "":
        return SPACE_MARK * len(token)
    return "".join(_show_char(c) for c in token)


def split_outer_spaces(text: str) -> tuple[str, str, str]:
    """Split ``text`` into leading spaces, core and trailing spaces (core never starts/ends with one)."""
    core = text.strip(" ")
    if not core:
        return "", text, ""
    start = text.index(core)
    return text[:start], core, text[start + len(core) :]


def markdown_text(text: str) -> str:
    """Escape a string so Markdown renders it literally, also inside a table cell.

    ``& < > " '`` become HTML entities (no raw HTML, no autolinks), other ASCII punctuation is
    backslash-escaped (no emphasis, links, headings, code spans or table pipes), and the text is
    passed through :func:`visible` first, so no line break can end a paragraph or a table row.

    Args:
        text: Untrusted text (a token or a label built from tokens).
    """
    out = []
    for char in visible(text):
        if char in _HTML_ENTITIES:
            out.append(_HTML_ENTITIES[char])
        elif char in _MARKDOWN_PUNCTUATION:
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def markdown_emphasis(token: str) -> str:
    """A token emphasized in Markdown (bold), safe next to any neighbouring text.

    Leading and trailing spaces stay outside the ``**`` markers, and hair spaces (U+200A, Unicode
    whitespace for CommonMark) around them keep the markers valid whatever punctuation touches them.
    """
    lead, core, trail = split_outer_spaces(visible(token))
    return f"{lead}\u200a**{markdown_text(core)}**\u200a{trail}"
