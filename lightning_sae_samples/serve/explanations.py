"""The explanations and labels of a run in memory: a score column over all latents and a ranked word search.

Built once per version of the sidecar (``explanations/explanations.jsonl``), with vectorized torch over the bytes
of all texts, as the token index is built over the samples:

* words are runs of ``[0-9a-z_]`` or non-ASCII bytes of the case-folded text (a latent's label and explanation
  together); each word is hashed by two polynomial hashes computed with prefix sums, and the distinct hashes give
  the word ids;
* postings are the distinct (word, latent) pairs with their term frequency, sorted by word, each with its BM25
  weight (``k1 = 1.2``, ``b = 0.75``) computed at build;
* a query adds the weights of its words' postings per latent (one ``index_add_`` per word) and takes the top ones.

No request loops in Python over latents or postings.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_sae_samples.analysis.explanations import ExplanationRecord

K1, B = 1.2, 0.75
_MOD = (1 << 31) - 1
_BASES = (131, 137)
#: Longest query, in characters.
MAX_QUERY = 200


def _word_bytes(data: Tensor) -> Tensor:
    """Which bytes belong to a word: ASCII digits, lower-case letters, underscore, and every non-ASCII byte."""
    return ((data >= 48) & (data <= 57)) | ((data >= 97) & (data <= 122)) | (data == 95) | (data >= 128)


def _word_hashes(data: Tensor) -> tuple[Tensor, Tensor]:
    """The words of ``data`` (uint8): each word's 62-bit hash and the index of its first byte."""
    inside = _word_bytes(data)
    if not bool(inside.any()):
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    previous = torch.cat([torch.zeros(1, dtype=torch.bool), inside[:-1]])
    first = inside & ~previous
    starts = first.nonzero().flatten()
    positions = inside.nonzero().flatten()
    word = (torch.cumsum(first, 0) - 1)[positions]  # the word each byte belongs to
    offset = positions - starts[word]
    values = data[positions].to(torch.int64) + 1
    longest = int(offset.max()) + 1
    keys = torch.zeros(len(starts), dtype=torch.int64)
    for base in _BASES:
        powers = torch.ones(longest, dtype=torch.int64)
        for n in range(1, longest):  # at most the longest word's length
            powers[n] = powers[n - 1] * base % _MOD
        terms = values * powers[offset] % _MOD
        sums = torch.zeros(len(starts), dtype=torch.int64).index_add_(0, word, terms) % _MOD
        keys = keys * _MOD + sums
    return keys, starts


@dataclass(frozen=True)
class Explained:
    """A latent's explanation and label as the page shows them."""

    text: Optional[str]
    score: Optional[float]
    score_contexts: Optional[int]
    random_score: Optional[float]
    embedding_score: Optional[float]
    embedding_contexts: Optional[int]
    embedding_random_score: Optional[float]
    model: str
    samples_step: Optional[int]
    source: Optional[str]
    time: Optional[str]
    label: Optional[str]
    label_time: Optional[str]

    def to_json(self, global_step: int) -> dict:
        """JSON for the page, with ``stale``: written from samples older than the save shown."""
        out = dict(self.__dict__)
        out["stale"] = self.samples_step is not None and self.samples_step < global_step
        return out


class WordIndex:
    """BM25 postings of the words of one text per latent (see the module docstring).

    Args:
        latents: The latents, ascending.
        texts: One text per latent.
    """

    def __init__(self, latents: list[int], texts: list[str]) -> None:
        self.doc_latent = torch.tensor(latents, dtype=torch.int64)
        encoded = [text.casefold().encode("utf-8") for text in texts]
        # Each text's first byte offset finds the document of each word: the texts may hold any byte, so no
        # separator can tell them apart. The space between texts only keeps a word from running into the next.
        blob = b" ".join(encoded)
        data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
        keys, starts = _word_hashes(data)
        lengths = torch.tensor([len(e) + 1 for e in encoded], dtype=torch.int64)
        doc_starts = torch.cumsum(lengths, 0) - lengths
        doc = torch.searchsorted(doc_starts, starts, right=True) - 1
        self.words, word = torch.unique(keys, return_inverse=True)
        num_docs = max(len(latents), 1)
        pair, tf = torch.unique(word * num_docs + doc, return_counts=True)
        self.post_word, self.post_doc = pair // num_docs, pair % num_docs
        df = torch.bincount(self.post_word, minlength=len(self.words)).double()
        length = torch.bincount(doc, minlength=num_docs).double()
        average = float(length.mean()) if len(length) and float(length.mean()) > 0 else 1.0
        idf = torch.log1p((num_docs - df + 0.5) / (df + 0.5))
        tf = tf.double()
        norm = tf + K1 * (1 - B + B * length[self.post_doc] / average)
        self.post_weight = (idf[self.post_word] * tf * (K1 + 1) / norm).float()
        self.word_start = torch.zeros(len(self.words) + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(self.post_word, minlength=len(self.words)), 0, out=self.word_start[1:])

    def match(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """The latents holding any of the word hashes ``keys`` (ascending) and their summed BM25 weights."""
        if not len(keys) or not len(self.words):
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
        where = torch.searchsorted(self.words, keys).clamp(max=len(self.words) - 1)
        found = where[self.words[where] == keys].tolist()
        spans = [(int(self.word_start[w]), int(self.word_start[w + 1])) for w in found]
        if len(spans) == 1:  # one word: its postings are the answer, already by latent
            start, stop = spans[0]
            docs, weights = self.post_doc[start:stop], self.post_weight[start:stop]
        elif sum(stop - start for start, stop in spans) * 16 < len(self.doc_latent):
            # Few postings: score only the latents that hold a query word (no pass over every latent).
            docs = torch.cat([self.post_doc[a:b] for a, b in spans]) if spans else torch.zeros(0, dtype=torch.int64)
            weights = torch.cat([self.post_weight[a:b] for a, b in spans]) if spans else torch.zeros(0)
            docs, inverse = torch.unique(docs, return_inverse=True)
            weights = torch.zeros(len(docs)).index_add_(0, inverse, weights)
        else:
            scores = torch.zeros(len(self.doc_latent))
            for start, stop in spans:  # one vectorized add per query word
                scores.index_add_(0, self.post_doc[start:stop], self.post_weight[start:stop])
            docs = (scores > 0).nonzero().flatten()
            weights = scores[docs]
        return self.doc_latent[docs], weights


#: The scores a feature list sorts by: the detection score and the embedding AUROC.
SCORE_FIELDS = ("score", "embedding_score")


class ExplanationIndex:
    """The latest explanation and label per latent, a score column and BM25 word indexes over their texts.

    Explanations and labels have one word index each, so a new label rebuilds only the (small) label index.

    Args:
        explanations: Latest explanation record per latent.
        labels: Latest label record per latent.
        num_latents: ``F`` (latents beyond it are ignored).
        reuse: An earlier index whose explanations' word index and scores are kept when its explanations are these.
    """

    def __init__(self, explanations: dict[int, ExplanationRecord], labels: dict[int, ExplanationRecord],
                 num_latents: int, reuse: Optional[ExplanationIndex] = None) -> None:
        self.explanations = {i: r for i, r in explanations.items() if i < num_latents}
        self.labels = {i: r for i, r in labels.items() if i < num_latents and r.text}  # an empty label clears one
        self.num_latents = num_latents
        self._orders: dict[tuple[int, bool, str], Tensor] = {}
        self._lock = threading.Lock()
        if reuse is not None and reuse.num_latents == num_latents and reuse.explanations == self.explanations:
            self.columns, self.explained = reuse.columns, reuse.explained
            self.explanation_words, self._orders = reuse.explanation_words, reuse._orders
        else:
            self.columns = {name: torch.full((num_latents,), math.nan, dtype=torch.float64) for name in SCORE_FIELDS}
            self.explained = torch.zeros(num_latents, dtype=torch.bool)
            if self.explanations:
                explained = torch.tensor(list(self.explanations), dtype=torch.int64)
                for name, column in self.columns.items():
                    values = [getattr(r, name) for r in self.explanations.values()]
                    column[explained] = torch.tensor([math.nan if v is None else float(v) for v in values],
                                                     dtype=torch.float64)
                self.explained[explained] = True
            ordered = sorted(self.explanations)
            self.explanation_words = WordIndex(ordered, [self.explanations[i].text for i in ordered])
        ordered = sorted(self.labels)
        self.label_words = WordIndex(ordered, [self.labels[i].text for i in ordered])

    def __len__(self) -> int:
        return len(self.explanations.keys() | self.labels.keys())

    def get(self, latent: int) -> Optional[Explained]:
        """What the page shows of one latent's explanation and label, or ``None``."""
        record, label = self.explanations.get(latent), self.labels.get(latent)
        if record is None and label is None:
            return None
        return Explained(
            text=None if record is None else record.text,
            score=None if record is None else record.score,
            score_contexts=None if record is None else record.score_contexts,
            random_score=None if record is None else record.random_score,
            embedding_score=None if record is None else record.embedding_score,
            embedding_contexts=None if record is None else record.embedding_contexts,
            embedding_random_score=None if record is None else record.embedding_random_score,
            model="" if record is None else record.model,
            samples_step=None if record is None else record.samples_step,
            source=None if record is None else record.source,
            time=None if record is None else record.time,
            label=None if label is None else label.text,
            label_time=None if label is None else label.time,
        )

    def search(self, query: str, offset: int = 0, limit: int = 50) -> tuple[Tensor, Tensor, int]:
        """Latents whose label or explanation holds words of ``query``, best BM25 score first.

        A latent's label and explanation scores add up; equal scores keep the lower latent first.

        Returns:
            ``(latents, scores, total)``: this page's latents and relevance scores, and how many match at all.
        """
        data = query[:MAX_QUERY].casefold().encode("utf-8")
        keys, _ = _word_hashes(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                               torch.zeros(0, dtype=torch.uint8))
        keys = torch.unique(keys)
        explained, weights = self.explanation_words.match(keys)
        labelled, label_weights = self.label_words.match(keys)
        if len(labelled):
            docs, inverse = torch.unique(torch.cat([explained, labelled]), return_inverse=True)
            weights = torch.zeros(len(docs)).index_add_(0, inverse, torch.cat([weights, label_weights]))
        else:
            docs = explained
        total = len(docs)
        take = min(offset + limit, total)
        if take <= offset:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0), total
        threshold = torch.topk(weights, take).values[-1]
        near = (weights >= threshold).nonzero().flatten()  # ties at the page's edge included: pages never overlap
        picked = near[torch.argsort(weights[near], descending=True, stable=True)][offset:take]
        return docs[picked], weights[picked], total

    @property
    def scores(self) -> Tensor:
        """``[F]`` detection score per latent (``nan``: none)."""
        return self.columns["score"]

    def order_by_score(self, latents: Tensor, descending: bool, by: str = "score") -> Tensor:
        """Row order of a feature table listing ``latents`` by a score (unscored last; ties: table order), cached.

        ``by``: ``"score"`` (detection) or ``"embedding_score"`` (embedding AUROC).
        """
        key = (id(latents), descending, by)
        with self._lock:
            cached = self._orders.get(key)
        if cached is not None:
            return cached
        values = self.columns[by][latents]
        values = torch.nan_to_num(-values if descending else values, nan=math.inf)
        order = torch.argsort(values, stable=True)
        with self._lock:
            self._orders[key] = order
            while len(self._orders) > 4:
                self._orders.pop(next(iter(self._orders)))
        return order

    def mask(self, latents: Tensor, kind: str, score_range: Optional[tuple[float, float]]) -> Optional[Tensor]:
        """Rows of a table listing ``latents`` kept by ``kind`` and a score range (``None``: all rows).

        ``kind``: ``"explained"``, ``"unexplained"``, anything else keeps all; ``score_range``: ``(low, high)`` of
        the detection score.
        """
        keep: Optional[Tensor] = None
        if kind == "explained":
            keep = self.explained[latents]
        elif kind == "unexplained":
            keep = ~self.explained[latents]
        if score_range is not None:
            low, high = score_range
            values = self.scores[latents]
            in_range = (values >= low) & (values <= high)
            keep = in_range if keep is None else keep & in_range
        return keep


def empty_index(num_latents: int) -> ExplanationIndex:
    """The index of a run without a sidecar."""
    return ExplanationIndex({}, {}, num_latents)


def latents_json(index: ExplanationIndex, latents: Sequence[int], global_step: int) -> list[Optional[dict]]:
    """The page's explanation view of each latent (``None`` where it has none)."""
    out = []
    for latent in latents:
        found = index.get(int(latent))
        out.append(None if found is None else found.to_json(global_step))
    return out
