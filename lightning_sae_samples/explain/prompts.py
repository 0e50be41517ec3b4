"""The explainer's and the scorer's prompts, and how their answers are read.

The explanation prompt follows delphi's default explainer: each example is a context with the tokens where the
latent fires strongly between ``<<`` and ``>>``, followed by those tokens with their activation on a 0 to 10
scale (10: the latent's largest activation). The detection prompt shows one context without marks and asks
whether a latent with the explanation fires on it. Changing either prompt changes :data:`PROMPT_VERSION`, so a
later ``explain`` run explains the latents again instead of skipping them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lightning_sae_samples.analysis.records import Sample

PROMPT_VERSION = "1"
#: Tokens at or above this share of the latent's largest shown activation are marked in the examples.
MARK_SHARE = 0.3
#: The longest explanation kept from an answer; a longer answer is cut at a word boundary.
MAX_EXPLANATION_CHARS = 200

Message = dict[str, str]

_SYSTEM = (
    "You explain what a feature of a neural network detects in text. In each example, the tokens where the feature"
    " fires are between <<delimiters>>, and listed after it with how strongly it fires, from 0 to 10. Find what"
    " the marked tokens and their contexts have in common. Answer with one short phrase on a line starting with"
    " [EXPLANATION]:"
)
#: A worked example shown before the real one, so that small models answer in the expected form.
_DEMONSTRATION = (
    'Example 1: and the <<LORD>> said unto Moses\nActivations: ("LORD", 10)\n\n'
    'Example 2: for the <<Lord>> thy God is\nActivations: ("Lord", 8)\n\n'
    'Example 3: praise ye the <<Lord>>.\nActivations: ("Lord", 6)\n\nWhat does the feature detect?',
    "[EXPLANATION]: the word Lord, as a name of God",
)

_SYSTEM_DETECTION = (
    "You check explanations of a feature of a neural network. Given the explanation and a short text, say whether"
    " the text contains what the explanation describes. Answer Yes or No."
)


def _activation_scale(samples: Sequence[Sample]) -> float:
    return max((t.activation for s in samples for t in s.context), default=0.0)


def highlighted(sample: Sample, scale: float) -> tuple[str, list[tuple[str, int]]]:
    """The sample's text with its strongly firing tokens between ``<<`` and ``>>``, and those tokens' 0-10 levels."""
    marks = [scale > 0 and t.activation >= MARK_SHARE * scale for t in sample.context]
    if not any(marks):
        marks[sample.context_position] = True
    spaced = _spaced(sample)
    text = ""
    levels: list[tuple[str, int]] = []
    for i, token in enumerate(sample.context):
        piece = token.text
        glue = "" if spaced or not text else " "
        if not spaced and piece.startswith("##"):
            piece, glue = piece[2:], ""
        lead = piece[: len(piece) - len(piece.lstrip())]
        body = piece[len(lead):]
        if marks[i] and (i == 0 or not marks[i - 1]):
            body = "<<" + body
        if marks[i] and (i + 1 == len(marks) or not marks[i + 1]):
            body += ">>"
        text += glue + lead + body
        if marks[i]:
            levels.append((token.text.strip(), round(10 * token.activation / scale) if scale > 0 else 0))
    return " ".join(text.split()), levels


def _spaced(sample: Sample) -> bool:
    """Whether the token strings carry their own spaces (byte-level BPE), else they are words joined by spaces."""
    return any(t.text[:1].isspace() for t in sample.context)


def example_block(samples: Sequence[Sample]) -> str:
    """The numbered examples of an explanation prompt."""
    scale = _activation_scale(samples)
    lines = []
    for number, sample in enumerate(samples, 1):
        text, levels = highlighted(sample, scale)
        shown = ", ".join(f'("{token}", {level})' for token, level in levels)
        lines.append(f"Example {number}: {text}\nActivations: {shown}")
    return "\n\n".join(lines)


def explanation_prompt(samples: Sequence[Sample]) -> list[Message]:
    """The chat messages asking for an explanation of the latent these samples come from."""
    return [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": _DEMONSTRATION[0]},
        {"role": "assistant", "content": _DEMONSTRATION[1]},
        {"role": "user", "content": example_block(samples) + "\n\nWhat does the feature detect?"},
    ]


def context_text(sample: Sample) -> str:
    """A context as plain text (no marks), as the scorer sees it: the tokenizer's decoding of its tokens."""
    return " ".join(sample.context_text.split())


def detection_prompt(explanation: str, text: str) -> list[Message]:
    """The chat messages asking whether a latent with ``explanation`` fires on ``text``."""
    return [
        {"role": "system", "content": _SYSTEM_DETECTION},
        {"role": "user", "content": f"Explanation: {explanation}\nText: {text}\nDoes the text contain it? Yes or No?"},
    ]


def parse_explanation(answer: str) -> str:
    """The explanation in a model's answer: the text after the last ``[EXPLANATION]:``, else its first line."""
    found = re.split(r"\[?EXPLANATION\]?\s*:", answer, flags=re.IGNORECASE)
    text = found[-1] if len(found) > 1 else answer
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = line.strip().strip('"').strip("'").strip("*").strip()
    if len(line) > MAX_EXPLANATION_CHARS:
        line = line[:MAX_EXPLANATION_CHARS].rsplit(" ", 1)[0] + "..."
    return line


def parse_detection(answer: str) -> bool:
    """Whether an answer says yes (its first word); anything else counts as no."""
    words = re.findall(r"[A-Za-z]+", answer)
    return bool(words) and words[0].lower() in ("yes", "true", "y")
