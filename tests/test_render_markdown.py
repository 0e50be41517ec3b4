import pytest
from markdown_it import MarkdownIt
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir

from lightning_sae_samples.analyzer import ActivationSampleAnalyzer, write_report
from lightning_sae_samples.render.escaping import visible
from lightning_sae_samples.storage import REPORT_NAME

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
