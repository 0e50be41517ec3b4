"""The "through training" line of a latent whose meaning changed: its top tokens quoted and comma-separated, in the
console, Markdown and HTML reports (real Trainer run whose odd latents move to other tokens at step 3)."""

import html
import io

import pytest
from helpers import SwitchingSAE, TokenDataset, loader, make_callback, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from render_support import FakeTokenizer
from rich.console import Console

from lightning_sae_samples import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.history import quoted_tokens, story_line

#: Word pieces with and without a leading space, as BPE and WordPiece vocabularies have them.
VOCAB = [" of", "ries", " namely", " generations", " and", " in", "the", " Lord", " God", "s"] * 3


@pytest.fixture(scope="module")
def changed(tmp_path_factory):
    root = tmp_path_factory.mktemp("story")
    callback = make_callback(root / "samples", tokenizer=FakeTokenizer(VOCAB), history_windows_per_level=100,
                             top_features_to_save=10)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)
    run = trainer(root, [callback, checkpoints], max_steps=8, max_epochs=None, enable_checkpointing=True)
    sae = SwitchingSAE(drift_step=3, mode="sparse", num_latents=10)
    run.fit(sae, loader(TokenDataset(num_sequences=40, seq_len=64)))
    analyzer = ActivationSampleAnalyzer(root / "samples")
    latent = next(i for i in analyzer.saved_features if any(
        e.kind == "meaning_change" for e in analyzer.history.events(i)))
    change = next(e for e in analyzer.history.events(latent) if e.kind == "meaning_change")
    expected = f"({quoted_tokens(change.before[:3])} → {quoted_tokens(change.after[:3])})"
    return analyzer, latent, expected


def change_step(analyzer, latent):
    return next(e.step for e in analyzer.history.events(latent) if e.kind == "meaning_change")


def test_tokens_are_quoted_and_comma_separated():
    assert quoted_tokens((" of", "ries", " namely")) == '" of", "ries", " namely"'


def test_the_story_line_quotes_the_tokens_before_and_after_a_meaning_change(changed):
    analyzer, latent, expected = changed
    line = story_line(analyzer.history, latent)
    assert f"meaning changed at step {change_step(analyzer, latent):,} {expected}" in line
    assert expected.count('"') >= 4 and ", " in expected  # several tokens each side, each quoted


def test_console_markdown_and_html_reports_show_the_quoted_tokens(changed):
    analyzer, latent, expected = changed
    console = Console(file=io.StringIO(), width=400, record=True)
    analyzer.print_feature_report(latent, 2, console=console)
    assert expected in console.export_text()
    markdown = analyzer.render_markdown(10, 2)
    assert "Through training: " in markdown and expected in markdown
    page = analyzer.render_html(10, 2)
    assert expected in html.unescape(page)
