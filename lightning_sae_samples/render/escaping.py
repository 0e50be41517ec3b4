r"""Every rule for showing untrusted token text, in one place.

Token strings come from a tokenizer and the training data: they may hold HTML, Markdown syntax,
control characters or only whitespace. Each renderer takes token text through these functions and
through nothing else:

* :func:`visible` makes whitespace-only tokens, line breaks, tabs and control characters visible
  (console, Markdown and HTML all use it);
* :func:`token_label` also marks the leading and trailing spaces of a token shown on its own (``·of``), so
  that " of" and "of" differ in token lists (console, Markdown and HTML all use it);
* :func:`markdown_text` makes a string inert in Markdown with as few backslashes as possible, so that the
  plain file reads as text: only characters that can start Markdown syntax in running text or split a
  table row are escaped, no HTML entity is written, and no line break survives;
* HTML relies on Jinja autoescaping of the :func:`visible` string (see ``render/templates.py``).
"""

from __future__ import annotations

import unicodedata
from typing import Optional

from lightning_sae_samples.tokens import is_undecoded

__all__ = [
    "SPACE_MARK",
    "is_undecoded",
    "markdown_emphasis",
    "markdown_text",
    "split_outer_spaces",
    "token_label",
    "visible",
]

SPACE_MARK = "·"
NEWLINE_MARK = "⏎"
TAB_MARK = "→"
CARRIAGE_RETURN_MARK = "␍"
EMPTY_MARK = "∅"

_ALWAYS_VISIBLE = {"\n": NEWLINE_MARK, "\t": TAB_MARK, "\r": CARRIAGE_RETURN_MARK}
# Escaped wherever they stand: emphasis, code spans, links and images (a "]" cannot close a link whose "[" is
# escaped), raw HTML and autolinks, table pipes, GFM strikethrough and math, entity references.
_MARKDOWN_SYNTAX = frozenset("*_`[<|~$&")
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


def token_label(token: str) -> str:
    """Display form of a token shown on its own (a token list, a table cell).

    :func:`visible`, with its leading and trailing spaces shown as ``·``: ``" of"`` reads ``·of``, ``"of"`` ``of``.
    """
    lead, core, trail = split_outer_spaces(visible(token))
    return SPACE_MARK * len(lead) + core + SPACE_MARK * len(trail)


def _is_punctuation(char: str) -> bool:
    # CommonMark's punctuation: ASCII punctuation and the Unicode P and S categories.
    return unicodedata.category(char)[0] in "PS"


def markdown_text(text: str) -> str:
    r"""Escape a string so that Markdown renders it literally, also inside a table cell, and reads as text.

    The text goes through :func:`visible` first (no line break can end a paragraph or a table row). Then
    ``* _ ` [ < | ~ $ &`` are backslash-escaped (no emphasis, code, link, HTML, autolink, strikethrough,
    math, entity or cell split), and a backslash only where it would escape what follows it (before ASCII
    punctuation or at the end, where the next token may start with some). Everything else stays as it is,
    so ``mother's`` and ``west,`` read the same in the file as on the page.

    The text never stands at the start of a line in the reports, so line-start syntax (``#``, ``>``,
    ``1.``, ``-``) needs no escape.

    Args:
        text: Untrusted text (a token or a label built from tokens).
    """
    shown = visible(text)
    out = []
    for n, char in enumerate(shown):
        if char in _MARKDOWN_SYNTAX:
            out.append("\\" + char)
        elif char == "\\":
            following = shown[n + 1 : n + 2]
            out.append("\\\\" if following == "" or (following.isascii() and _is_punctuation(following)) else char)
        else:
            out.append(char)
    return "".join(out)


def markdown_emphasis(token: str, before: Optional[str] = None, after: Optional[str] = None) -> str:
    """A token in bold Markdown, glued to its neighbours as the tokens are in the text.

    Leading and trailing spaces stay outside the ``**`` markers. No space is added, except a hair space
    (U+200A, whitespace for CommonMark) where the bold would otherwise not parse: between a letter or digit
    of a neighbour and punctuation at that edge of the token (``west`` then ``,``).

    Args:
        token: Raw token text.
        before: The Markdown text right before it on the line (``""``: the line starts here); ``None`` when
            unknown: a letter is assumed.
        after: The Markdown text right after it (``""``: the line ends here); ``None``: a letter is assumed.
    """
    lead, core, trail = split_outer_spaces(visible(token))
    body = markdown_text(core)
    left = lead[-1:] if lead else ("a" if before is None else before[-1:])
    right = trail[:1] if trail else ("a" if after is None else after[:1])
    open_gap = "\u200a" if _is_punctuation(body[0]) and left and not (left.isspace() or _is_punctuation(left)) else ""
    close_gap = (
        "\u200a" if _is_punctuation(body[-1]) and right and not (right.isspace() or _is_punctuation(right)) else ""
    )
    return f"{lead}{open_gap}**{body}**{close_gap}{trail}"
