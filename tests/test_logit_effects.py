import io
import json
from html.parser import HTMLParser

import lightning as L
import pytest
import torch
from helpers import SyntheticSAE, loader, trainer
from markdown_it import MarkdownIt
from render_support import FakeTokenizer, hostile_vocab, write_fixture_dir
from rich.console import Console

from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples.analysis.analyzer import ActivationSampleAnalyzer
from lightning_sae_samples.analysis.logit_effects import compute_logit_effects, top_logit_effects
from lightning_sae_samples.render.escaping import markdown_text, token_label

VOCAB, D_MODEL = 30, 8


def random_model(num_latents, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_latents, D_MODEL, generator=gen), torch.randn(D_MODEL, VOCAB, generator=gen)


def fixed_matrices(module):
    """(W_dec, W_U) of a 10-latent SAE; importable as 'test_logit_effects:fixed_matrices' from YAML."""
    return random_model(module.num_latents, seed=3)


def direct(w_dec, w_u, idx, k):
    logits = (w_dec[idx].double() @ w_u.double()).tolist()
    order = sorted(range(VOCAB), key=lambda t: -logits[t])
    return [(t, logits[t]) for t in order[:k]], [(t, logits[t]) for t in order[::-1][:k]]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tok = FakeTokenizer(hostile_vocab())
    analyzer = ActivationSampleAnalyzer(write_fixture_dir(tmp_path_factory.mktemp("le") / "s", tokenizer=tok))
    w_dec, w_u = random_model(16)
    effects = analyzer.logit_effects(w_dec, w_u, k=4, tokenizer=tok)
    return analyzer, effects, w_dec, w_u, tok


def test_matches_direct_computation_and_chunking(hostile):
    analyzer, effects, w_dec, w_u, tok = hostile
    assert list(effects) == analyzer.saved_features
    for idx, e in effects.items():
        promoted, suppressed = direct(w_dec, w_u, idx, 4)
        assert [t.token_id for t in e.promoted] == [t for t, _ in promoted]
        assert [t.token_id for t in e.suppressed] == [t for t, _ in suppressed]
        assert [t.value for t in e.promoted] == pytest.approx([v for _, v in promoted], rel=1e-5)
        assert [t.value for t in e.suppressed] == pytest.approx([v for _, v in suppressed], rel=1e-5)
        assert all(t.token == tok.vocab[t.token_id] for t in e.promoted + e.suppressed)
        assert analyzer.feature(idx).logit_effects == e  # attached for the reports
    everything = list(range(16))
    whole = top_logit_effects(w_dec, w_u, everything, k=5)
    chunked = top_logit_effects(w_dec, w_u, everything, k=5, chunk_elements=2 * VOCAB)  # 2 latents per chunk
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, rtol=1e-6)


def test_each_distinct_token_is_decoded_once():
    class Counting(FakeTokenizer):
        calls = 0

        def decode(self, ids):
            Counting.calls += 1
            return super().decode(ids)

    w_dec, w_u = random_model(16)
    compute_logit_effects(w_dec, w_u, range(16), k=10, tokenizer=Counting(hostile_vocab()))
    assert Counting.calls <= VOCAB


def test_reports_show_logit_effects_escaped(hostile):
    analyzer, effects, *_ = hostile
    idx = analyzer.saved_features[0]
    md = analyzer.render_markdown(top_k_features=3, examples_per_feature=2)
    section = md.split(f"## Feature {idx}\n")[1].split("\n## ")[0]
    expected = ", ".join(f"{markdown_text(token_label(t.token))} ({t.value:+.4g})" for t in effects[idx].promoted)
    assert f"Promotes: {expected}" in section
    assert "Suppresses: " + markdown_text(token_label(effects[idx].suppressed[0].token)) in section
    links = [t for t in MarkdownIt("commonmark").parse(md) if t.type in ("html_block", "html_inline")]
    assert links == []  # no hostile token became raw HTML

    html = analyzer.render_html(top_k_features=3, examples_per_feature=2)
    chips = []

    class Chips(HTMLParser):
        side, depth = None, 0

        def handle_starttag(self, tag, attrs):
            cls = dict(attrs).get("class", "")
            if tag == "p" and cls.startswith("logit-"):
                self.side = cls
            elif tag == "span" and self.depth:
                self.depth += 1
            elif tag == "span" and cls == "chip" and self.side:
                chips.append([self.side, ""])
                self.depth = 1

        def handle_endtag(self, tag):
            if tag == "span" and self.depth:
                self.depth -= 1
            elif tag == "p":
                self.side = None

        def handle_data(self, data):
            if self.depth:
                chips[-1][1] += data

    Chips(convert_charrefs=True).feed(html)
    first = [text for side, text in chips if side == "logit-promoted"][:4]
    assert first == [f"{token_label(t.token)} {t.value:+.4g}" for t in effects[idx].promoted]
    assert "<script>alert(1)</script>" not in html

    console = Console(record=True, width=160, file=io.StringIO())
    analyzer.print_feature_report(idx, 2, console=console)
    text = console.export_text()
    assert "Logit effects" in text
    for t in effects[idx].promoted + effects[idx].suppressed:
        assert token_label(t.token) in text and f"{t.value:+.4g}" in text


def test_shape_errors_name_the_fix(hostile):
    analyzer, _, w_dec, w_u, _ = hostile
    with pytest.raises(ValueError, match=r"lm_head.weight.T"):
        analyzer.logit_effects(w_dec, w_u.T)
    with pytest.raises(ValueError, match=r"pass `W_dec.T`"):
        analyzer.logit_effects(w_dec.T, w_u)
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        analyzer.logit_effects(w_dec, w_u, k=0)


@pytest.mark.parametrize("spec", [fixed_matrices, "test_logit_effects:fixed_matrices"])
def test_callback_writes_logit_effects_into_feature_files(tmp_path, spec):
    tok = FakeTokenizer(hostile_vocab())
    cb = ActivationSampleCallback(collection_freq=1, max_samples_per_feature=3, context_size=2,
                                  samples_per_feature_to_save=2, top_features_to_save=4, activation_threshold=0.5,
                                  dirpath=tmp_path / "s", tokenizer=tok, logit_effects=spec, logit_effects_k=3,
                                  log_feature_health=False)
    module = SyntheticSAE(num_latents=10)
    trainer(tmp_path, [cb], max_steps=3).fit(module, loader())
    w_dec, w_u = fixed_matrices(module)
    files = sorted((tmp_path / "s").glob("feature_*_samples.json"))
    assert len(files) == 4
    for path in files:
        record = json.loads(path.read_text())
        idx = record["statistics"]["feature_idx"]
        promoted, suppressed = direct(w_dec, w_u, idx, 3)
        got = record["logit_effects"]
        assert [e["token_id"] for e in got["promoted"]] == [t for t, _ in promoted]
        assert [e["token_id"] for e in got["suppressed"]] == [t for t, _ in suppressed]
        assert [e["token"] for e in got["promoted"]] == [tok.vocab[t] for t, _ in promoted]
        assert [e["value"] for e in got["suppressed"]] == pytest.approx([v for _, v in suppressed], rel=1e-5)
    report = (tmp_path / "s" / "interpretability_report.md").read_text(encoding="utf-8")
    assert report.count("Promotes: ") == 4
    assert ActivationSampleAnalyzer(tmp_path / "s").feature(idx).logit_effects is not None


def test_callback_warns_and_saves_without_effects_when_the_function_fails(tmp_path):
    def wrong(module):
        w_dec, w_u = fixed_matrices(module)
        return w_dec, w_u.T  # lm_head.weight layout by mistake

    cb = ActivationSampleCallback(collection_freq=1, max_samples_per_feature=3, context_size=2,
                                  samples_per_feature_to_save=2, activation_threshold=0.5, dirpath=tmp_path / "s",
                                  logit_effects=wrong)
    with pytest.warns(UserWarning, match=r"could not compute logit effects.*lm_head.weight.T"):
        trainer(tmp_path, [cb], max_steps=2).fit(SyntheticSAE(num_latents=10), loader())
    record = json.loads(next((tmp_path / "s").glob("feature_*_samples.json")).read_text())
    assert "logit_effects" not in record and record["top_samples"]


def test_bad_import_path_is_reported_at_construction():
    with pytest.raises(ValueError, match="cannot be resolved"):
        ActivationSampleCallback(logit_effects="no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="`logit_effects_k` must be an integer >= 1"):
        ActivationSampleCallback(logit_effects_k=0)


def test_lightning_cli_yaml_takes_an_import_path(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
trainer:
  accelerator: cpu
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: lightning_sae_samples.ActivationSampleCallback
      init_args:
        collection_freq: 1
        max_samples_per_feature: 3
        samples_per_feature_to_save: 2
        activation_threshold: 0.5
        dirpath: {tmp_path / "yaml_samples"}
        logit_effects: test_logit_effects.fixed_matrices
        logit_effects_k: 2
"""
    )

    class DataModule(L.LightningDataModule):
        def train_dataloader(self):
            return loader()

    cli = LightningCLI(SyntheticSAE, DataModule, args=["fit", "--config", str(config)], save_config_callback=None)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, ActivationSampleCallback))
    assert cb.logit_effects is fixed_matrices or cb.logit_effects.__name__ == "fixed_matrices"
    record = json.loads(next((tmp_path / "yaml_samples").glob("feature_*_samples.json")).read_text())
    assert len(record["logit_effects"]["promoted"]) == 2
