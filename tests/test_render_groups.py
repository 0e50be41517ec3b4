"""Interval samples, recent top samples and the drift flag: analyzer, Markdown, HTML and console.

The samples directory comes from a real ``lightning.Trainer`` run with the callback. Half of the latents
change meaning at step 2 (they fire, more weakly, on other tokens), so that their recent top samples share
few activating tokens with their all-time top ones.
"""

import io
import json
from html.parser import HTMLParser

import pytest
import torch
from helpers import DriftingSAE, loader, trainer
from markdown_it import MarkdownIt
from render_support import FakeTokenizer, hostile_vocab
from rich.console import Console

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.records import DRIFT_THRESHOLD, IntervalGroup
from lightning_sae_samples.callback import ActivationSampleCallback
from lightning_sae_samples.render.escaping import visible
from lightning_sae_samples.samples_dir.names import feature_filename
from lightning_sae_samples.samples_dir.writer import write_samples_dir

F, SAVED, PER_FILE, WINDOW, DRIFT_STEP = 12, 6, 3, 2, 2
VOCAB = hostile_vocab()
MD = MarkdownIt("commonmark").enable("table")
FLAG = "low recent overlap"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    cb = ActivationSampleCallback(
        collection_freq=1, max_samples_per_feature=5, context_size=4, activation_threshold=0.5,
        top_features_to_save=SAVED, samples_per_feature_to_save=PER_FILE, dirpath=root / "samples",
        tokenizer=FakeTokenizer(VOCAB), write_report=False, recent_window_steps=WINDOW, samples_per_interval=2,
    )
    trainer(root, [cb], max_epochs=1).fit(DriftingSAE(num_latents=F, drift_step=DRIFT_STEP), loader())
    return root / "samples"


@pytest.fixture(scope="module")
def analyzer(run_dir):
    return ActivationSampleAnalyzer(run_dir, tokenizer=FakeTokenizer(VOCAB))


@pytest.fixture(scope="module")
def reported(analyzer):
    """Every latent that fired, in report order, with up to PER_FILE examples."""
    return analyzer.top_features(F, PER_FILE)


def sample_tuple(sample):
    return (sample.activation_value, sample.step, sample.position, sample.context_position,
            tuple((t.token_id, t.text, t.activation) for t in sample.context))


def record_tuple(record):
    return (record["activation_value"], record["step"], record["position"], record["context_position"],
            tuple(zip(record["context_tokens"], record["context_token_strs"], record["context_activations"])))


def assert_matches_file(feature, record):
    groups = record["interval_samples"]
    assert len(feature.interval_groups) == len(groups) > 1
    for n, (group, raw) in enumerate(zip(feature.interval_groups, groups)):
        assert isinstance(group, IntervalGroup)
        assert (group.low, group.high, group.count) == (raw["interval"][0], raw["interval"][1], raw["count"])
        assert group.low_open == (n == 0)
        assert [sample_tuple(s) for s in group.samples] == [record_tuple(r) for r in raw["samples"]]
        assert all(group.low <= s.activation_value and (group.high is None or s.activation_value < group.high)
                   for s in group.samples)
    assert feature.interval_groups[-1].high is None
    assert sum(g.count for g in feature.interval_groups) == feature.stats.activation_count
    assert [sample_tuple(s) for s in feature.recent_samples] == [record_tuple(r) for r in record["recent_samples"]]
    assert feature.recent_overlap == record["statistics"]["recent_overlap"]
    assert feature.stats.recent_overlap == feature.recent_overlap
    assert feature.recent_drift == (feature.recent_overlap < DRIFT_THRESHOLD)


def test_analyzer_groups_are_those_of_the_feature_files(analyzer, run_dir):
    summary = json.loads((run_dir / "collection_summary.json").read_text())
    assert analyzer.summary.recent_window_steps == WINDOW and analyzer.summary.recent_window == (2, 5)
    entries = {e["feature_idx"]: e for e in summary["top_features_by_activation"]}
    for idx in analyzer.saved_features:
        record = json.loads((run_dir / feature_filename(idx)).read_text())
        feature = analyzer.feature(idx)
        assert feature.saved
        assert_matches_file(feature, record)
        assert entries[idx]["recent_overlap"] == feature.recent_overlap
        assert all(2 <= s.step <= 5 for s in feature.recent_samples)
    # num_examples caps the recent samples as it caps the top ones.
    plain = analyzer.feature(analyzer.saved_features[0], 1)
    assert len(plain.samples) == 1 and len(plain.recent_samples) == 1


def test_full_state_features_get_the_groups_the_writer_would_write(analyzer, run_dir, tmp_path):
    state = torch.load(run_dir / "full_state.pt", weights_only=True)
    config = analyzer.summary.config
    write_samples_dir(tmp_path / "all", state, config=config, tokenizer=FakeTokenizer(VOCAB), top_features=F,
                      samples_per_feature=PER_FILE, rank_by=config["rank_features_by"], global_step=6)
    unsaved = [s.feature_idx for s in analyzer.features() if s.feature_idx not in analyzer.saved_features]
    assert unsaved
    for idx in unsaved:
        feature = analyzer.feature(idx)
        assert not feature.saved
        assert_matches_file(feature, json.loads((tmp_path / "all" / feature_filename(idx)).read_text()))


def test_the_drifting_latents_are_flagged(reported):
    flagged = {f.feature_idx for f in reported if f.recent_drift}
    assert flagged and flagged != {f.feature_idx for f in reported}, "the fixture needs both kinds"
    assert all(idx % 2 == 1 for idx in flagged)  # only the latents that changed meaning


def walk(tokens):
    for token in tokens:
        yield token
        if token.children:
            yield from walk(token.children)


def sections(text):
    """Feature index to its Markdown section."""
    parts = text.split("\n## Feature ")[1:]
    return {int(p.split("\n", 1)[0].split()[0]): p for p in parts}


def list_items(md_text):
    """``(strong texts, inline content)`` of each list item that shows an example."""
    out = []
    for token in MD.parse(md_text):
        if token.type == "inline" and "· step" in token.content and token.content.startswith("**"):
            kids = token.children
            strong = [c.content for i, c in enumerate(kids) if i and kids[i - 1].type == "strong_open"]
            out.append((strong, token.content))
    return out


def test_markdown_shows_groups_with_escaped_tokens_and_the_flag(analyzer, reported):
    text = analyzer.render_markdown(top_k_features=F, examples_per_feature=PER_FILE)
    tokens = list(walk(MD.parse(text)))
    assert not [t for t in tokens if t.type in ("html_inline", "html_block")]
    html = MD.render(text)
    assert "<script" not in html and "<img" not in html and 'href="javascript' not in html
    by_idx = sections(text)
    assert list(by_idx) == [f.feature_idx for f in reported]
    for feature in reported:
        section = by_idx[feature.feature_idx]
        ranges = section.split("\n### Samples across the activation range\n")
        assert len(ranges) == 2
        top_part, rest = ranges
        interval_part, recent_part = rest.split("\n### Recent top samples (steps 2–5)\n")
        groups = [g for g in feature.interval_groups if g.count]
        inlines = [t.content for t in MD.parse(interval_part) if t.type == "inline"]
        headings = [c for c in inlines if c.startswith("Interval")]
        assert len(headings) == len(groups)
        expected = []
        for heading, group in zip(headings, groups):
            high = "∞" if group.high is None else f"{group.high:.4g}"
            bracket = "(" if group.low_open else "["
            assert heading.startswith(f"Interval {bracket}{group.low:.4g}, {high}): {group.count:,} activations")
            expected += group.samples
        for samples, part in ((expected, interval_part), (feature.recent_samples, recent_part)):
            items = list_items(part)
            assert len(items) == len(samples)
            for (strong, content), sample in zip(items, samples):
                assert strong == [f"{sample.activation_value:.4g}", visible(sample.activating_token.text).strip(" ")]
                assert f"· step {sample.step} · position {sample.position}:" in content
        assert (FLAG in recent_part) == feature.recent_drift
        assert FLAG not in top_part and FLAG not in interval_part
    # The summary lists the flagged features, linked, and the table has the recent overlap.
    summary_part = text.split("\n## Feature ")[0]
    flagged_line = next((line for line in summary_part.splitlines() if line.startswith("Flagged features")), "")
    flagged = [f.feature_idx for f in reported if f.recent_drift]
    assert [int(h[len("#feature-"):]) for h in (t.attrGet("href") for t in walk(MD.parse(flagged_line))
                                                  if t.type == "link_open")] == flagged
    assert "| Recent overlap |" in summary_part
    for feature in reported:
        assert f"| {feature.recent_overlap:.2f}{' ⚠' if feature.recent_drift else ''} |" in summary_part


VOID = {"meta", "input", "br", "img", "hr", "link", "col", "area", "base", "source", "wbr"}


class Tree(HTMLParser):
    """Each `.tok` span with its feature and sample group, each example's meta text, and every element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.elements, self.tokens, self.metas = [], [], [], []

    def where(self):
        feature = group = None
        for tag, attrs in self.stack:
            classes = (attrs.get("class") or "").split()
            if tag == "section" and "feature" in classes:
                feature, group = int(attrs["data-feature"]), "top"
            if tag == "details":
                group = "intervals" if "intervals" in classes else "recent"
        return feature, group

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs, self.where()))
        if tag in VOID:
            return
        self.stack.append((tag, attrs))
        classes = (attrs.get("class") or "").split()
        if tag == "span" and "tok" in classes:
            self.tokens.append({"text": "", "where": self.where(), **attrs})
        if tag == "span" and "meta" in classes:
            self.metas.append({"text": "", "where": self.where()})

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        tags = [(t, (a.get("class") or "").split()) for t, a in self.stack]
        if any(t == "span" and "tok" in c for t, c in tags):
            self.tokens[-1]["text"] += data
        if any(t == "span" and "meta" in c for t, c in tags):
            self.metas[-1]["text"] += data


def test_html_shows_groups_with_hover_values_and_the_flag(analyzer, reported):
    html = analyzer.render_html(top_k_features=F, examples_per_feature=PER_FILE)
    tree = Tree()
    tree.feed(html)
    tags = [tag for tag, _, _ in tree.elements]
    assert tags.count("script") == 1 and "img" not in tags
    assert not any(k.startswith("on") for _, attrs, _ in tree.elements for k in attrs)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    csp = next(a["content"] for tag, a, _ in tree.elements if tag == "meta" and a.get("http-equiv"))
    assert "default-src 'none'" in csp
    for feature in reported:
        idx = feature.feature_idx
        groups = {
            "top": feature.samples,
            "intervals": [s for g in feature.interval_groups for s in g.samples],
            "recent": feature.recent_samples,
        }
        for group, samples in groups.items():
            spans = [t for t in tree.tokens if t["where"] == (idx, group)]
            assert [t["text"] for t in spans] == [visible(t.text) for s in samples for t in s.context]
            active = [t for t in spans if "act" in t["class"].split()]
            assert len(active) == len(samples)
            for span, sample in zip(active, samples):
                assert span["title"].startswith(f"activation {sample.activation_value:.6g} ")
            metas = [m["text"] for m in tree.metas if m["where"] == (idx, group)]
            assert metas == [f"{s.activation_value:.4g} · step {s.step} · pos {s.position}" for s in samples]
        details = [(a, w) for tag, a, w in tree.elements if tag == "details" and w[0] == idx]
        assert len(details) == 2
        recent = next(a for a, _ in details if "recent" in a["class"].split())
        assert ("drifted" in recent["class"].split()) == feature.recent_drift
        assert ("open" in recent) == feature.recent_drift
        badges = [a for tag, a, w in tree.elements if w[0] == idx and "drift-badge" in (a.get("class") or "")]
        assert len(badges) == int(feature.recent_drift)
        headings = [a for tag, a, w in tree.elements if tag == "h3" and w == (idx, "intervals")]
        assert len(headings) == sum(1 for g in feature.interval_groups if g.count)
        row = [a for tag, a, _ in tree.elements if tag == "td" and "overlap" in (a.get("class") or "")]
        assert len(row) == len(reported)
    drift_cells = [a for tag, a, _ in tree.elements if tag == "td" and "drift" in (a.get("class") or "").split()]
    assert len(drift_cells) == sum(f.recent_drift for f in reported)
    flagged_links = [a["href"] for tag, a, _ in tree.elements if tag == "a" and "flag" in (a.get("class") or "")]
    assert flagged_links == [f"#feature-{f.feature_idx}" for f in reported if f.recent_drift]
    assert "Recent overlap</th>" in html


def test_console_shows_interval_table_recent_samples_and_the_flag(analyzer, reported):
    for feature in reported:
        console = Console(record=True, width=180, file=io.StringIO())
        analyzer.print_feature_report(feature.feature_idx, PER_FILE, console=console)
        text = console.export_text(styles=False)
        intervals, recent = text.split("Samples across the activation range")[1].split("Recent top samples (steps 2–5)")
        for group in feature.interval_groups:
            high = "∞" if group.high is None else f"{group.high:.4g}"
            label = f"{'(' if group.low_open else '['}{group.low:.4g}, {high})"
            assert (label in intervals) == bool(group.count)
            for sample in group.samples:
                assert f"{visible(sample.activating_token.text)}[{sample.activation_value:.4g}]" in intervals
        rows = [line for line in recent.splitlines() if "│" in line and "[" in line]
        assert len(rows) == len(feature.recent_samples)
        for row, sample in zip(rows, feature.recent_samples):
            cells = [c.strip() for c in row.split("│")]
            assert cells[2:4] == [f"{sample.activation_value:.4g}", str(sample.step)]
        assert (FLAG in text) == feature.recent_drift
        assert f"recent overlap {feature.recent_overlap:.2f}" in recent
    console = Console(record=True, width=180, file=io.StringIO())
    analyzer.print_summary(top_k=F, console=console)
    text = console.export_text(styles=False)
    flagged = ", ".join(str(f.feature_idx) for f in reported if f.recent_drift)
    assert "Recent overlap" in text and f"recent overlap < 0.25): {flagged}\n" in text


def test_edited_overlap_is_flagged_and_no_recent_window_shows_no_recent_section(run_dir, tmp_path):
    import shutil

    copy = shutil.copytree(run_dir, tmp_path / "copy")
    analyzer = ActivationSampleAnalyzer(copy)
    calm = next(i for i in analyzer.saved_features if not analyzer.feature(i).recent_drift)
    path = copy / feature_filename(calm)
    record = json.loads(path.read_text())
    record["statistics"]["recent_overlap"] = 0.2
    path.write_text(json.dumps(record))
    edited = ActivationSampleAnalyzer(copy)
    assert edited.feature(calm).recent_drift
    assert FLAG in sections(edited.render_markdown(examples_per_feature=2))[calm]
    # Without the groups in the files and the recent window in the config, no group section is shown.
    summary = json.loads((copy / "collection_summary.json").read_text())
    summary["config"]["recent_window_steps"] = None
    (copy / "collection_summary.json").write_text(json.dumps(summary))
    for idx in edited.saved_features:
        path = copy / feature_filename(idx)
        record = json.loads(path.read_text())
        for key in ("interval_samples", "recent_samples"):
            record.pop(key)
        record["statistics"].pop("recent_overlap")
        path.write_text(json.dumps(record))
    (copy / "full_state.pt").unlink()
    bare = ActivationSampleAnalyzer(copy)
    feature = bare.feature(bare.saved_features[0])
    assert feature.interval_groups == () and feature.recent_samples == () and feature.recent_overlap is None
    text = bare.render_markdown(examples_per_feature=2)
    assert "Samples across the activation range" not in text and "Recent" not in text
    html = bare.render_html(examples_per_feature=2)
    assert "<details" not in html and "Recent overlap" not in html
