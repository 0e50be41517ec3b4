"""Property test: whatever the collector accepts, every reader accepts the samples directory it writes.

Hypothesis draws shapes, dense or TopK latents, values (random, all equal, firing on every token, never firing),
padding, excluded ids, settings, tokenizers, decoders and one to three saves (so the history thins). The analyzer,
the console and file reports, the export, `serve`'s loader and the history reader then read every part of each
directory the collector wrote. Profiles (tests/conftest.py): ``default`` is small and seeded, ``long`` searches more.
"""

from __future__ import annotations

import io
import os
import warnings

import pytest
import torch
from render_support import FakeTokenizer, hostile_vocab

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCollector
from lightning_sae_samples.analysis.export import export_samples
from lightning_sae_samples.analysis.history import FeatureHistory, story_line
from lightning_sae_samples.state.statistics import RANK_CHOICES

hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("starlette")
st = hypothesis.strategies

VOCAB = 8
VALUE_KINDS = ("random", "all_equal", "every_token", "never")
EXAMPLES = 15 if os.environ.get("HYPOTHESIS_PROFILE", "default") == "default" else None


@st.composite
def collections(draw):
    num_latents = draw(st.integers(1, 6))
    seq = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(VALUE_KINDS))
    firing = draw(st.lists(st.booleans(), min_size=num_latents, max_size=num_latents))  # of "every_token"
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        rows = draw(st.sampled_from((1, 2, 3, 0)))  # a step without rows too, but mostly some
        n = rows * seq
        if kind == "random":
            values = torch.tensor(draw(st.lists(st.integers(-2, 6), min_size=n * num_latents,
                                                max_size=n * num_latents)), dtype=torch.float32) / 2
            latents = values.view(rows, seq, num_latents)
        elif kind == "all_equal":
            latents = torch.full((rows, seq, num_latents), 1.5)
        elif kind == "every_token":
            latents = torch.tensor(firing, dtype=torch.float32).expand(rows, seq, num_latents) * 2.0
        else:
            latents = torch.zeros(rows, seq, num_latents)
        tokens = torch.tensor(draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n)),
                              dtype=torch.int64).view(rows, seq)
        padded = draw(st.booleans())
        mask = (torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).view(rows, seq)
                if padded else None)
        steps.append((tokens, mask, latents.contiguous()))
    max_samples = draw(st.integers(1, 4))
    return dict(
        num_latents=num_latents, steps=steps, kind=kind,
        mode=draw(st.sampled_from(("dense", "sparse"))),
        k=draw(st.integers(1, num_latents)),
        saves=draw(st.integers(1, 3)),
        full_state=draw(st.booleans()),
        decoder=draw(st.booleans()),
        tokenizer=draw(st.booleans()),
        settings=dict(
            max_samples_per_feature=max_samples,
            context_size=draw(st.integers(0, 4)),
            activation_threshold=draw(st.sampled_from((0.0, 0.5, 1.0))),
            top_features_to_save=draw(st.integers(1, num_latents + 1)),
            samples_per_feature_to_save=draw(st.integers(1, max_samples)),
            rank_features_by=draw(st.sampled_from(RANK_CHOICES)),
            samples_per_interval=draw(st.integers(0, 2)),
            recent_window_steps=draw(st.sampled_from((None, 1, 2))),
            exclude_token_ids=tuple(draw(st.sets(st.integers(0, VOCAB - 1), max_size=2))),
            history_samples_per_feature=draw(st.integers(0, 2)),
            history_top_tokens=draw(st.integers(1, 3)),
            history_windows_per_level=draw(st.integers(1, 2)),
        ),
    )


def collect_and_save(case: dict, dirpath, tokenizer) -> bool:
    """Run the case through a collector and save it ``saves`` times; whether anything was written."""
    collector = ActivationSampleCollector(num_latents=case["num_latents"], **case["settings"])
    decoder = torch.randn(case["num_latents"], 3, generator=torch.Generator().manual_seed(0)) if case["decoder"] \
        else None
    saves_after = {len(case["steps"]) - 1 - i for i in range(case["saves"])}
    try:
        for step, (tokens, mask, latents) in enumerate(case["steps"]):
            given = {} if mask is None else {"attention_mask": mask}
            if case["mode"] == "sparse":
                top = torch.topk(latents, case["k"], dim=-1)
                given.update(latent_indices=top.indices, latent_values=top.values)
            else:
                given["latents"] = latents
            collector.update(tokens, step=step, **given)
            if step in saves_after:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    collector.save(dirpath, tokenizer, full_state=case["full_state"], decoder=decoder)
                failed = [str(w.message) for w in caught if "could not write" in str(w.message)]
                assert not failed, failed  # a report the save could not write is only a warning
    finally:
        collector.close()
    return (dirpath / "sae_samples_manifest.json").exists()


def read_with_every_reader(dirpath, out, tokenizer) -> None:
    from rich.console import Console

    from lightning_sae_samples.serve.runs import RunSet

    analyzer = ActivationSampleAnalyzer(dirpath, tokenizer=tokenizer)
    summary = analyzer.summary
    assert sum(summary.frequency_histogram.counts) == summary.alive_features
    for rank_by in RANK_CHOICES:
        analyzer.features(rank_by=rank_by, limit=None)
    latents = range(analyzer.num_features) if analyzer.directory.full_state_path else analyzer.saved_features
    for idx in latents:
        analyzer.feature(idx, num_examples=3)
    console = Console(file=io.StringIO(), width=100)
    analyzer.print_summary(console=console)
    for idx in analyzer.saved_features[:2]:
        analyzer.print_feature_report(idx, num_examples=2, console=console)
    analyzer.generate_interpretability_report(out / "report.md", top_k_features=3, examples_per_feature=2)
    analyzer.generate_html_report(out / "report.html", top_k_features=3, examples_per_feature=2)
    export_samples(analyzer, out / "export", format="jsonl")

    run = RunSet(dirpath, tokenizer=tokenizer).get(None)  # serve's loader (no watcher thread is started)
    assert run is not None and run.error is None and run.current is not None, run and run.error
    index = run.current
    index.summary_json()
    for sort in ("max_activation", "activation_count", "frequency", "mean_activation"):
        index.feature_list(sort=sort, kind="alive")
    for idx in index.analyzer.saved_features[:3]:
        index.feature_page(idx, 3)
        if index.directions is not None:
            index.neighbours(idx, 2)
    index.token_search(index.token_ids_for("1"))
    index.context_search("a", 0, 5)

    history = FeatureHistory.from_dir(dirpath)
    if history is not None:
        history.events(), history.rows(), history.run_series()
        for latent in range(history.num_latents):
            story_line(history, latent)
            for window in range(len(history.windows)):
                for sample in history.samples(latent, window):
                    assert isinstance(sample.text, str)


@hypothesis.settings(max_examples=EXAMPLES, deadline=None) if EXAMPLES else hypothesis.settings(deadline=None)
@hypothesis.given(collections())
def test_every_reader_accepts_what_the_collector_writes(tmp_path_factory, case):
    root = tmp_path_factory.mktemp("written")
    dirpath = root / "samples"
    tokenizer = FakeTokenizer(hostile_vocab(VOCAB)) if case["tokenizer"] else None
    if not collect_and_save(case, dirpath, tokenizer):
        return  # nothing collected (only padding or no rows): nothing to read
    assert (dirpath / "interpretability_report.md").is_file(), "the save wrote no report"
    (root / "out").mkdir()
    read_with_every_reader(dirpath, root / "out", tokenizer)


def test_latents_that_fire_on_every_token_give_a_summary_every_reader_accepts(tmp_path):
    """The reproduction of issue 33 (item 3): frequency 1.0 everywhere gave bin edges [0.0, 0.0]."""
    case = dict(num_latents=3, kind="every_token", mode="dense", k=3, saves=1, full_state=True, decoder=False,
                tokenizer=False, steps=[(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]), None,
                                         torch.tensor([2.0, 0.0, 2.0]).expand(2, 4, 3).contiguous())],
                settings=dict(context_size=2))
    assert collect_and_save(case, tmp_path / "samples", None)
    (tmp_path / "out").mkdir()
    read_with_every_reader(tmp_path / "samples", tmp_path / "out", None)
    edges = ActivationSampleAnalyzer(tmp_path / "samples").summary.frequency_histogram.bin_edges
    assert edges[-1] == 0.0 and edges[0] < 0.0
