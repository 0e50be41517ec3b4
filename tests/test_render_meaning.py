"""Explanations, labels and neighbours in the console, Markdown and HTML reports (real Trainer run, real sidecar)."""

import io
import json
from html.parser import HTMLParser

import pytest
from markdown_it import MarkdownIt
from render_support import FakeTokenizer, decoder_matrices, hostile_vocab, write_run_dir
from rich.console import Console

from lightning_sae_samples import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.explanations import ExplanationRecord, append_explanations

HOSTILE = "<b>bold</b> *words* | pipes"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = write_run_dir(tmp_path_factory.mktemp("meaning"), FakeTokenizer(hostile_vocab()), num_latents=12,
                         top_features=4, logit_effects=decoder_matrices)
    summary = json.loads((path / "collection_summary.json").read_text())
    step, saved = summary["global_step"], [e["feature_idx"] for e in summary["top_features_by_activation"]]
    first = saved[0]
    append_explanations(path, [
        ExplanationRecord(latent=first, text=HOSTILE, score=0.8, score_contexts=20, random_score=0.5,
                          samples_step=step - 1, embedding_score=0.91, embedding_contexts=40,
                          embedding_random_score=0.47),
        ExplanationRecord(latent=first ^ 1, text="partner latent", score=0.6, samples_step=step),
        ExplanationRecord(latent=saved[1], text="typed by hand", kind="label", source="label", samples_step=step),
    ])
    return ActivationSampleAnalyzer(path), first, saved


def test_console_feature_report_shows_explanation_staleness_and_neighbours(run):
    analyzer, first, _ = run
    console = Console(file=io.StringIO(), width=240, record=True)
    analyzer.print_feature_report(first, 2, console=console)
    text = console.export_text()
    assert (f"Explanation: {HOSTILE} (detection 0.80 (20 contexts, random explanation 0.50); embedding AUROC 0.91"
            " (40 contexts, random explanation 0.47))") in text
    assert "written from the samples of step" in text
    assert "Neighbours (decoder cosine)" in text and "partner latent" in text
    partner_line = next(line for line in text.splitlines() if "partner latent" in line)
    assert f" {first ^ 1} " in partner_line  # the partner is the closest, by construction of the decoder


def test_console_summary_has_explanation_and_label_columns(run):
    analyzer, first, saved = run
    console = Console(file=io.StringIO(), width=200, record=True)
    analyzer.print_summary(4, console=console)
    text = console.export_text()
    assert "Explanation" in text and "Detection" in text and "Embedding AUROC" in text
    assert "typed by hand" in text
    row = next(line for line in text.splitlines() if HOSTILE[:10] in line)
    assert [c.strip() for c in row.split("│")[-3:-1]] == ["0.80", "0.91"]  # each score in its own column


def test_markdown_report_escapes_explanations_and_lists_neighbours(run):
    analyzer, first, _ = run
    md = analyzer.render_markdown(4, 2)
    tokens = MarkdownIt().parse(md)
    assert not [t for t in tokens if t.type in ("html_inline", "html_block")]
    html = MarkdownIt().render(md)
    assert "&lt;b&gt;bold&lt;/b&gt; *words* | pipes" in html  # shown as typed, nothing interpreted
    assert "Neighbours (decoder cosine): " in md and "partner latent" in md
    assert "⚠ written from the samples of step" in md
    assert "| Explanation | Detection | Embedding AUROC |" in md and "| 0.80 | 0.91 |" in md
    assert "(detection 0.80 (20 contexts, random explanation 0.50); embedding AUROC 0.91" in md


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_html_report_escapes_explanations_and_links_neighbours_in_the_report(run):
    analyzer, first, saved = run
    page = analyzer.render_html(4, 2)
    parsed = _Collect()
    parsed.feed(page)
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page  # text, not markup
    assert HOSTILE in "".join(parsed.text)
    assert "Detection" in parsed.text and "Embedding AUROC" in parsed.text and "0.91" in parsed.text
    chips = [a for t, a in parsed.tags if t == "span" and "data-neighbour" in a]
    assert len(chips) == 4 * 5
    links = {a["href"] for t, a in parsed.tags if t == "a" and a.get("href", "").startswith("#feature-")}
    listed = {f"#feature-{i}" for i in saved}
    neighbour_ids = {int(a["data-neighbour"]) for a in chips}
    assert {f"#feature-{i}" for i in neighbour_ids if i in saved} <= links <= listed
