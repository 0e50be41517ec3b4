import io
import re

import pytest
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir
from rich.console import Console

from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.render.escaping import visible


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    path = write_fixture_dir(tmp_path_factory.mktemp("console") / "s", tokenizer=FakeTokenizer(hostile_vocab()))
    return ActivationSampleAnalyzer(path)


def record(analyzer, feature_idx, num_examples=5):
    console = Console(record=True, width=140, color_system="truecolor", file=io.StringIO())
    analyzer.print_feature_report(feature_idx=feature_idx, num_examples=num_examples, console=console)
    return console.export_text(styles=False, clear=False), console.export_html(inline_styles=True)


def test_feature_report_shows_statistics_histogram_and_examples(analyzer):
    idx = analyzer.saved_features[0]
    feature = analyzer.feature(idx, 5)
    text, _ = record(analyzer, idx)
    stats = feature.stats
    assert f"Feature {idx}" in text
    assert f"{stats.max_activation:.4g}" in text and f"{stats.activation_count}" in text
    assert f"{stats.mean_activation:.4g} ± {stats.std_activation:.4g}" in text
    bars = [line for line in text.splitlines() if "█" in line or "▏" in line]
    occupied = sum(1 for c in stats.histogram.counts if c)
    assert len(bars) >= occupied  # one bar line per occupied histogram bin
    assert f"Top {len(feature.samples)} examples" in text
    for sample in feature.samples:
        activating = visible(sample.activating_token.text)
        assert f"{activating}[{sample.activation_value:.4g}]" in text  # value right beside the token


def test_activating_token_is_bold_underlined_and_backgrounds_follow_activation(analyzer):
    idx = analyzer.saved_features[0]
    feature = analyzer.feature(idx, 5)
    _, html = record(analyzer, idx)
    spans = re.findall(r'<span style="([^"]*)">([^<]*)</span>', html)
    marked = [(style, t) for style, t in spans if "font-weight: bold" in style and "underline" in style]
    top = feature.samples[0]
    assert len(marked) == len(feature.samples)
    assert "background-color" in marked[0][0]
    # The strongest (activating) token has the darkest background; a token that did not fire has none.
    def lightness(style):
        r, g, b = (int(c, 16) for c in re.search(r"background-color: #(..)(..)(..)", style).groups())
        return r + g + b
    highlighted = [lightness(s) for s, _ in spans if "background-color" in s]
    assert lightness(marked[0][0]) == min(highlighted)
    weakest = feature.samples[-1].activation_value
    assert lightness(marked[0][0]) < lightness(marked[-1][0]) or top.activation_value == weakest


def test_hostile_token_text_is_literal_not_rich_markup(tmp_path):
    vocab = ["[bold red]x[/]", "[link=javascript:alert(1)]y[/link]", "\n", " ", "plain"] * 6
    path = write_fixture_dir(tmp_path / "s", tokenizer=FakeTokenizer(vocab))
    analyzer = ActivationSampleAnalyzer(path)
    console = Console(record=True, width=200, file=io.StringIO())
    for idx in analyzer.saved_features:
        analyzer.print_feature_report(idx, 8, console=console)
    html = console.export_html(inline_styles=True, clear=False)
    text = console.export_text(styles=False)
    assert "[bold red]x[/]" in text and "[link=javascript:alert(1)]y[/link]" in text
    assert "⏎" in text and "<a " not in html and "color: #ff0000; text-decoration-color: #ff0000\">x" not in html


def test_unknown_feature_message_gives_range_and_nearby_saved(analyzer):
    with pytest.raises(KeyError) as err:
        analyzer.print_feature_report(feature_idx=10_000, console=Console(file=io.StringIO()))
    message = str(err.value)
    assert "0 to 15" in message
    nearest = sorted(analyzer.saved_features, key=lambda i: abs(i - 10_000))[0]
    assert str(nearest) in message.split("near")[1]


def test_console_marks_leading_spaces_in_token_lists_and_spaces_undecoded_ids(analyzer):
    import dataclasses

    from lightning_sae_samples.analysis.records import ContextToken, LogitEffects, TokenEffect
    from lightning_sae_samples.render.console import print_feature

    feature = analyzer.feature(analyzer.saved_features[0], 1)
    sample = feature.samples[0]
    ids_context = (ContextToken(7, "cry", 0.1), ContextToken(12575, "[12575]", sample.activation_value),
                   ContextToken(9, "[9]", 0.0), ContextToken(3, " and", 0.0))
    feature = dataclasses.replace(
        feature,
        logit_effects=LogitEffects(feature.feature_idx, (TokenEffect(1, " of", 2.0), TokenEffect(2, "of", 1.0)), ()),
        samples=(dataclasses.replace(sample, context=ids_context, context_position=1),),
    )
    console = Console(record=True, width=140, color_system=None, file=io.StringIO())
    print_feature(feature, console=console)
    text = console.export_text(styles=False)
    (first,) = [line.split() for line in text.splitlines() if "+2" in line.split()]
    (second,) = [line.split() for line in text.splitlines() if "+1" in line.split()]
    assert first[0] == "·of" and second[0] == "of"  # " of" and "of" differ
    assert f"cry [12575][{sample.activation_value:.4g}] [9] and" in text
