"""The plain explainer that needs no language model: a latent's most frequent activating tokens, as text.

With their left and right neighbours: ``"gold", "silver" (after "of", "and"; before ",")``.

It reads the same samples an LLM explainer is shown (never the held-out ones its score is computed on), so it is
the bar an LLM's explanation must beat. Ties keep the order the samples first show them in, best sample first.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence

from lightning_sae_samples.analysis.records import Sample

#: ``ExplanationRecord.model`` of its explanations.
TOP_TOKENS_MODEL = "top-tokens"
#: ``ExplanationRecord.prompt_version`` of its explanations; changing the text's form changes it.
TOP_TOKENS_VERSION = "1"
#: Activating tokens named, most frequent first.
TOKENS_SHOWN = 3
#: Left and right neighbours named on each side: those seen at least twice, most frequent first.
NEIGHBOURS_SHOWN = 3


def _clean(text: str) -> str:
    return " ".join(text.split())


def _quoted(counts: Counter, limit: int, at_least: int = 1) -> list[str]:
    return [json.dumps(t, ensure_ascii=False) for t, n in counts.most_common() if n >= at_least][:limit]


def _counts(texts: Iterable[str]) -> Counter:
    return Counter(t for t in (_clean(x) for x in texts) if t)


def top_tokens_explanation(samples: Sequence[Sample]) -> str:
    """The explanation of the latent these samples come from (``"(no samples)"`` without any)."""
    tokens = _counts(s.activating_token.text for s in samples)
    before = _counts(s.context[s.context_position - 1].text for s in samples if s.context_position > 0)
    after = _counts(s.context[s.context_position + 1].text for s in samples
                    if s.context_position + 1 < len(s.context))
    named = _quoted(tokens, TOKENS_SHOWN)
    if not named:
        return "(no samples)"
    sides = [f"{word} {', '.join(shown)}" for word, shown in
             (("after", _quoted(before, NEIGHBOURS_SHOWN, 2)), ("before", _quoted(after, NEIGHBOURS_SHOWN, 2)))
             if shown]
    return ", ".join(named) + (f" ({'; '.join(sides)})" if sides else "")
