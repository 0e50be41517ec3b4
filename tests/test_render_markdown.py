import pytest
from markdown_it import MarkdownIt
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.reports import write_report
from lightning_sae_samples.render.escaping import visible
from lightning_sae_samples.samples_dir.names import REPORT_NAME

MD = MarkdownIt("commonmark").enable("table")


def walk(tokens):
    for token in tokens:
        yield token
        if token.children:
            yield from walk(token.children)


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory):
    return write_fixture_dir(tmp_path_factory.mktemp("hostile") / "samples", tokenizer=FakeTokenizer(hostile_vocab()))


@pytest.fixture(scope="module")
def report(hostile_dir, tmp_path_factory):
    analyzer = ActivationSampleAnalyzer(hostile_dir)
    path = analyzer.generate_interpretability_report(
        tmp_path_factory.mktemp("out") / "report.md", top_k_features=14, examples_per_feature=6
    )
    return analyzer, path.read_text(encoding="utf-8")


def test_hostile_tokens_never_become_html_links_or_extra_cells(report):
    _, text = report
    tokens = list(walk(MD.parse(text)))
    assert not [t for t in tokens if t.type in ("html_inline", "html_block")]
    hrefs = [t.attrGet("href") for t in tokens if t.type == "link_open"]
    assert hrefs and all(h.startswith("#feature-") for h in hrefs)
    html = MD.render(text)
    assert "<script" not in html and "<img" not in html and 'href="javascript' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text, not dropped
    # Every table keeps the same cell count in each row as in its header.
    rows, header_cells = [], None
    for t in tokens:
        if t.type == "thead_open":
            header_cells = None
        if t.type == "tr_open":
            rows.append(0)
        if t.type in ("th_open", "td_open"):
            rows[-1] += 1
        if t.type == "table_close":
            header_cells, *body = rows
            assert body and all(n == header_cells for n in body), rows
            rows = []


def test_report_has_summary_top_table_and_feature_sections(report):
    analyzer, text = report
    summary = analyzer.summary
    assert f"| Tokens seen | {summary.tokens_seen:,} |" in text
    assert f"| Never-fired latents | {summary.never_fired_features} |" in text
    assert f"| Steps collected | {summary.steps_collected} " in text
    assert "### Firing frequency" in text and "█" in text
    ranked = [s.feature_idx for s in analyzer.features(limit=14)]
    positions = [text.index(f"\n## Feature {i}\n") for i in ranked]
    assert positions == sorted(positions), "feature sections follow the ranking"
    assert f"| 1 | [{ranked[0]}](#feature-{ranked[0]}) |" in text
    section = text[positions[0] : positions[1]]
    assert section.count("█") > 0 and "```text" in section  # activation histogram as text bars
    feature = analyzer.feature(ranked[0], 6)
    first = feature.samples[0]
    assert f"1. **{first.activation_value:.4g}** · step {first.step} ·" in section


def test_activating_token_is_the_bold_text_of_each_example(report):
    analyzer, text = report
    ranked = [s.feature_idx for s in analyzer.features(limit=14)]
    items = [t for t in MD.parse(text) if t.type == "inline" and t.content.startswith("**") and "· step" in t.content]
    expected = [s for idx in ranked for s in analyzer.feature(idx, 6).samples]
    assert len(items) == len(expected)
    for item, sample in zip(items, expected):
        strong = [c for i, c in enumerate(item.children) if i and item.children[i - 1].type == "strong_open"]
        assert strong[0].content == f"{sample.activation_value:.4g}"
        assert strong[1].content == visible(sample.activating_token.text).strip(" ")
        assert len(strong) == 2


def test_write_report_for_the_callback_reads_only_feature_files(hostile_dir, tmp_path):
    import shutil

    copy = shutil.copytree(hostile_dir, tmp_path / "copy")
    (copy / "full_state.pt").write_bytes(b"corrupt: must not be read")
    path = write_report(copy, tokenizer=FakeTokenizer(hostile_vocab()))
    assert path == copy / REPORT_NAME
    text = path.read_text(encoding="utf-8")
    saved = ActivationSampleAnalyzer(copy).saved_features
    assert f"## Top {len(saved)} features" in text
    assert all(f"\n## Feature {i}\n" in text for i in saved)
    assert not list(copy.glob(".*.tmp"))


def test_user_template_overrides_markdown_and_html_falls_back(hostile_dir, tmp_path):
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "report.md.j2").write_text(
        "custom {{ features|length }}{% for f in features %} {{ f.idx }}:{{ f.examples[0].context_md }}{% endfor %}\n"
    )
    analyzer = ActivationSampleAnalyzer(hostile_dir, template_dir=tmp_path / "tpl")
    text = analyzer.generate_interpretability_report(tmp_path / "r.md", top_k_features=2).read_text()
    assert text.startswith("custom 2 ") and "<script" not in MD.render(text)
    html = analyzer.generate_html_report(tmp_path / "r.html", top_k_features=2).read_text()
    assert html.startswith("<!DOCTYPE html>")


# ---------------------------------------------------------------- token text a reader sees in the file
def _sample(texts, position, activations=None):
    from lightning_sae_samples.analysis.records import ContextToken, Sample

    acts = activations or [1.0] * len(texts)
    context = tuple(ContextToken(i, t, a) for i, (t, a) in enumerate(zip(texts, acts)))
    return Sample(0, acts[position], 5, position, context, position, "".join(texts))


def _inline(source):
    (inline,) = [t for t in MD.parse(source) if t.type == "inline"]
    return inline.children


def test_bold_token_is_glued_to_its_word_pieces_and_plain_text_stays_plain():
    from lightning_sae_samples.render.markdown import context_markdown

    line = context_markdown(_sample(["She", " chem", "istry", " of", " my", " mother", "'s", " west", ","], 1))
    assert line == "She **chem**istry of my mother's west,"  # no added space, no entity, no backslash
    children = _inline("x " + line)
    assert [c.type for c in children] == ["text", "strong_open", "text", "strong_close", "text"]
    assert children[2].content == "chem" and children[4].content == "istry of my mother's west,"

    # Punctuation glued to a word is bold too, and only what Markdown needs is escaped.
    for texts, position, strong in [(["west", ",", "and"], 1, ","), (["a", "*", "b"], 1, "*"),
                                    (["Mr", ".", "Smith"], 1, "."), (["x", "|", "y"], 0, "x")]:
        line = context_markdown(_sample(texts, position))
        children = _inline("1. " + line)
        types = [c.type for c in children]
        assert types.count("strong_open") == 1 and "html_inline" not in types, (texts, line)
        assert children[types.index("strong_open") + 1].content == strong
        # A hair space only where CommonMark cannot open or close bold between a letter and punctuation.
        assert "".join(c.content for c in children if c.type == "text").replace("\u200a", "") == "".join(texts)
        assert line.count("\u200a") == sum(1 for n in (position - 1, position + 1) if 0 <= n < len(texts)
                                            and texts[n][-1 if n < position else 0].isalnum()
                                            and not texts[position].isalnum())


def test_token_lists_show_a_leading_space_and_byte_tokens_stay_distinct(hostile_dir):
    import dataclasses

    from lightning_sae_samples.analysis.records import LogitEffects, TokenEffect
    from lightning_sae_samples.render.markdown import feature_context

    analyzer = ActivationSampleAnalyzer(hostile_dir)
    feature = analyzer.feature(analyzer.saved_features[0], 2)
    effects = LogitEffects(feature.feature_idx, (TokenEffect(1, " of", 2.0), TokenEffect(2, "of", 1.5)),
                           (TokenEffect(3, "<0xE8>", -1.0), TokenEffect(4, "<0xE9>", -2.0)))
    view = feature_context(dataclasses.replace(feature, logit_effects=effects))
    assert view["logit_effects"]["promoted_md"] == "·of (+2), of (+1.5)"
    rendered = MD.render("Suppresses: " + view["logit_effects"]["suppressed_md"])
    assert "&lt;0xE8&gt; (-1), &lt;0xE9&gt; (-2)" in rendered


def test_byte_fallback_tokens_decode_to_their_bytes_not_replacement_characters():
    from lightning_sae_samples.tokens import TokenDecoder

    class SentencePieceLike:  # decodes a lone byte token to U+FFFD, as SentencePiece tokenizers do
        pieces = ["▁the", "<0xE8>", "<0xA9>", "<0xE9>"]

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

        def decode(self, ids):
            return "".join(" the" if i == 0 else "\ufffd" for i in ids)

    class ByteLevelLike:  # GPT-2 style: "Ġ" is a space, "ç" the byte 0xE7
        pieces = ["Ġthe", "Ġç", "è"]

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

        def decode(self, ids):
            return "".join(" the" if i == 0 else "\ufffd" for i in ids)

    decoder = TokenDecoder(SentencePieceLike())
    decoder.prepare([0, 1, 2, 3])
    assert [decoder.token_str(i) for i in range(4)] == [" the", "<0xE8>", "<0xA9>", "<0xE9>"]
    decoder = TokenDecoder(ByteLevelLike())
    decoder.prepare([0, 1, 2])
    assert [decoder.token_str(i) for i in range(3)] == [" the", " <0xE7>", "<0xE8>"]


def test_example_program_limits_the_markdown_report_to_report_top_k(tmp_path):
    import importlib
    import sys
    from pathlib import Path

    from helpers import SyntheticSAE, loader, trainer

    from lightning_sae_samples.callback import ActivationSampleCallback

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        train_sae = importlib.import_module("train_sae")
    finally:
        sys.path.pop(0)
    cb = ActivationSampleCallback(collection_freq=1, max_samples_per_feature=4, context_size=4,
                                  activation_threshold=0.5, top_features_to_save=6, samples_per_feature_to_save=2,
                                  dirpath=tmp_path / "samples", tokenizer=FakeTokenizer(hostile_vocab()))
    fitted = trainer(tmp_path, [cb])
    fitted.fit(SyntheticSAE(num_latents=10), loader())
    md = tmp_path / "samples" / REPORT_NAME
    assert md.read_text(encoding="utf-8").count("\n## Feature ") == 6  # the callback's: every saved feature
    train_sae.report(fitted, top_k_features=2, examples_per_feature=2)
    text = md.read_text(encoding="utf-8")
    assert "## Top 2 features" in text and text.count("\n## Feature ") == 2
    assert (tmp_path / "samples" / "report.html").read_text(encoding="utf-8").count('class="card feature"') == 2
