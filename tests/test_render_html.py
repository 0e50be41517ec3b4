from html.parser import HTMLParser

import pytest
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.render.escaping import visible


class Collector(HTMLParser):
    """Elements with their attributes, and the text of every `.tok` span."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements, self.tokens, self._in_tok, self.scripts = [], [], 0, []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "span" and "tok" in attrs.get("class", "").split():
            self._in_tok = 1
            self.tokens.append({"text": "", **attrs})
        elif self._in_tok and tag == "span":
            self._in_tok += 1
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        if self._in_tok and tag == "span":
            self._in_tok -= 1
        self._in_script = False

    def handle_data(self, data):
        if self._in_tok:
            self.tokens[-1]["text"] += data
        if self._in_script:
            self.scripts.append(data)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    path = write_fixture_dir(tmp_path_factory.mktemp("html") / "s", tokenizer=FakeTokenizer(hostile_vocab()))
    analyzer = ActivationSampleAnalyzer(path)
    html = analyzer.render_html(top_k_features=14, examples_per_feature=6)
    parser = Collector()
    parser.feed(html)
    return analyzer, html, parser


def test_hostile_tokens_are_text_never_markup(parsed):
    analyzer, html, parser = parsed
    tags = [tag for tag, _ in parser.elements]
    assert tags.count("script") == 1 and "img" not in tags and "iframe" not in tags
    assert not any(k.startswith("on") for _, attrs in parser.elements for k in attrs)
    assert "javascript:" not in " ".join(v or "" for _, a in parser.elements for k, v in a.items() if k == "href")
    expected = [t for i in (s.feature_idx for s in analyzer.features(limit=14))
                for s in analyzer.feature(i, 6).samples for t in s.context]
    assert [t["text"] for t in parser.tokens] == [visible(t.text) for t in expected]
    shown = {t["text"] for t in parser.tokens}
    assert {"<script>alert(1)</script>", "<img src=x onerror=alert(2)>"} <= shown  # present, as text
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_tokens_carry_exact_value_on_hover_and_the_activating_one_is_marked(parsed):
    analyzer, _, parser = parsed
    ranked = [s.feature_idx for s in analyzer.features(limit=14)]
    samples = [s for i in ranked for s in analyzer.feature(i, 6).samples]
    active = [t for t in parser.tokens if "act" in t["class"].split()]
    assert len(active) == len(samples)
    for span, sample in zip(active, samples):
        assert span["title"].startswith(f"activation {sample.activation_value:.6g} ")
        assert span["text"] == visible(sample.activating_token.text)
    assert all("background-color: rgb(" in t["style"] or "transparent" in t["style"] for t in parser.tokens)


def test_self_contained_with_anchors_histograms_and_a_locked_down_policy(parsed):
    analyzer, html, parser = parsed
    ranked = [s.feature_idx for s in analyzer.features(limit=14)]
    ids = {attrs.get("id") for _, attrs in parser.elements}
    links = [attrs["href"] for tag, attrs in parser.elements if tag == "a"]
    for idx in ranked:
        assert f"feature-{idx}" in ids and f"#feature-{idx}" in links
    assert all(link.startswith("#") for link in links)
    assert not any(k in ("src",) for _, a in parser.elements for k in a)  # nothing loaded from anywhere
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    svgs = [a for tag, a in parser.elements if tag == "svg"]
    assert len(svgs) == len(ranked) + 1  # one per feature plus the frequency histogram
    csp = next(a["content"] for tag, a in parser.elements if tag == "meta" and a.get("http-equiv"))
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp.split("script-src")[1]
    assert any(tag == "input" and a.get("id") == "feature-filter" for tag, a in parser.elements)


def test_undecoded_ids_are_spaced_in_html_and_markdown(tmp_path, monkeypatch):
    import re

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_fixture_dir(tmp_path / "s", tokenizer=None, top_features=1, recorded_tokenizer="no-such/tokenizer")
    analyzer = ActivationSampleAnalyzer(path)
    html = analyzer.render_html(top_k_features=4, examples_per_feature=2)
    without_badges = re.sub(r'<span class="val"[^>]*>[^<]*</span>', "", html)
    contexts = [re.sub(r"<[^>]+>", "", c)
                for c in re.findall(r'<span class="ctx">(.*?)</span></li>', without_badges, re.S)]
    assert contexts and all(re.fullmatch(r"\[\d+\]( \[\d+\])*", c.split("\n")[0].strip()) for c in contexts), contexts
    md = analyzer.render_markdown(top_k_features=4, examples_per_feature=2)
    lines = [line.split(": ", 1)[1] for line in md.splitlines() if re.match(r"\d+\. \*\*.*· position \d+: ", line)]
    assert lines and all(re.fullmatch(r"(\\\[\d+\]|\*\*\\\[\d+\]\*\*)( (\\\[\d+\]|\*\*\\\[\d+\]\*\*))*", x)
                         for x in lines), lines
